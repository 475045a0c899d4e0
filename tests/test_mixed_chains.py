"""One stored chain across provider kinds: turns that alternate between an Anthropic
upstream, a chat-completions upstream and a Responses upstream, each sent the whole context
in its own wire format; and a failover from a Responses upstream to Anthropic in the middle
of a tool loop, where the Responses upstream's encrypted reasoning must not follow."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from anthropic_upstream import ANTHROPIC_KEY, AnthropicUpstream
from chat_upstream import UPSTREAM_KEY, ChatUpstream
from relay_fixtures import relay_on_sqlite, sdk_client
from responses_upstream import RESPONSES_KEY, ResponsesUpstream

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@pytest.fixture(scope="module")
def mixed_url(
    anthropic_upstream: AnthropicUpstream,
    chat_upstream: ChatUpstream,
    responses_upstream: ResponsesUpstream,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Iterator[str]:
    monkeypatch_module.setenv("RELAY_TEST_MIX_ANTHROPIC", ANTHROPIC_KEY)
    monkeypatch_module.setenv("RELAY_TEST_MIX_CHAT", UPSTREAM_KEY)
    monkeypatch_module.setenv("RELAY_TEST_MIX_RESPONSES", RESPONSES_KEY)

    def claude(script: str, **more: Any) -> dict[str, Any]:
        return {
            "provider": "anthropic",
            "base_url": anthropic_upstream.base_url,
            "api_key_env": "RELAY_TEST_MIX_ANTHROPIC",
            "upstream_model": script,
            **more,
        }

    def chat(script: str) -> dict[str, Any]:
        return {
            "provider": "openai_chat",
            "base_url": chat_upstream.base_url,
            "api_key_env": "RELAY_TEST_MIX_CHAT",
            "upstream_model": script,
        }

    def responses(script: str, **more: Any) -> dict[str, Any]:
        return {
            "provider": "openai_responses",
            "base_url": responses_upstream.base_url,
            "api_key_env": "RELAY_TEST_MIX_RESPONSES",
            "upstream_model": script,
            **more,
        }

    spec: list[dict[str, Any]] = [
        {"model": "claude-echo", **claude("echo")},
        {"model": "claude-tools", **claude("tools")},
        {"model": "chat-echo", **chat("echo")},
        {"model": "chat-tools", **chat("tools")},
        {"model": "rsp-echo", **responses("echo")},
        {"model": "rsp-tools", **responses("tools")},
        {"model": "rsp-reasoning", **responses("reasoning", name="openai")},
        {"model": "rsp-web", **responses("web_search", hosted_tools=["web_search"])},
        {
            # The same Responses upstream, failing now (a 503 before the first byte), with
            # Anthropic as the other deployment.
            "model": "reasoning-failover",
            "deployments": [
                responses("http_503", name="openai", weight=1000, retries=0),
                claude("tools", name="claude", weight=0.001),
            ],
        },
    ]
    with relay_on_sqlite(tmp_path_factory, "mixed", spec) as url:
        yield url


@pytest.fixture
def sdk(mixed_url: str) -> Iterator[openai.OpenAI]:
    with sdk_client(mixed_url) as client:
        yield client


def test_a_chain_alternating_between_three_provider_kinds(
    sdk: openai.OpenAI,
    anthropic_upstream: AnthropicUpstream,
    chat_upstream: ChatUpstream,
    responses_upstream: ResponsesUpstream,
) -> None:
    one = sdk.responses.create(model="claude-echo", input="alpha", instructions="Be brief.")
    two = sdk.responses.create(
        model="chat-tools", previous_response_id=one.id, input="weather?", tools=[WEATHER]
    )
    call = two.output[-1]
    assert call.type == "function_call"
    three = sdk.responses.create(
        model="rsp-tools",
        previous_response_id=two.id,
        tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "warm"}],
    )
    assert three.output_text == "The tool said: warm"
    four = sdk.responses.create(model="claude-echo", previous_response_id=three.id, input="omega")
    assert four.output_text == "omega"

    # Chat got turn one's exchange as messages.
    chat_sent = chat_upstream.last["messages"]
    assert [m["role"] for m in chat_sent] == ["user", "assistant", "user"]
    # The Responses upstream got everything as items, the chat turn's call included.
    kinds = [item["type"] for item in responses_upstream.last["input"]]
    assert kinds == ["message"] * 3 + ["function_call", "function_call_output"]
    # Anthropic got the whole chain as alternating turns, the tool call answered.
    messages = anthropic_upstream.last["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3 + ["user"]
    blocks = [block["type"] for m in messages for block in m["content"]]
    assert "tool_use" in blocks and "tool_result" in blocks
    assert messages[-1]["content"][-1]["text"] == "omega"


def test_failover_from_a_responses_upstream_to_anthropic_mid_chain(
    sdk: openai.OpenAI, anthropic_upstream: AnthropicUpstream
) -> None:
    first = sdk.responses.create(
        model="rsp-reasoning",
        input="weather in Kyiv?",
        tools=[WEATHER],
        reasoning={"effort": "low"},
    )
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    call = first.output[-1]
    anthropic_upstream.reset()
    second = sdk.responses.with_raw_response.create(
        model="reasoning-failover",
        previous_response_id=first.id,
        tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "cold"}],
    )
    assert second.headers["x-relay-deployment"] == "claude"
    answer = second.parse()
    assert answer.status == "completed", answer.error
    assert answer.output_text == "The tool said: cold"
    # The OpenAI reasoning stayed behind: Anthropic takes no thinking it did not sign.
    sent = anthropic_upstream.last["messages"]
    assert all(block["type"] != "thinking" for m in sent for block in m["content"])


def test_a_hosted_search_stays_with_the_upstream_that_ran_it(
    sdk: openai.OpenAI,
    anthropic_upstream: AnthropicUpstream,
    chat_upstream: ChatUpstream,
    responses_upstream: ResponsesUpstream,
) -> None:
    search = sdk.responses.create(
        model="rsp-web", input="relay news", tools=[{"type": "web_search"}]
    )
    assert [item.type for item in search.output] == ["web_search_call", "message"]
    # Stateless: the client gives the search back; the Responses upstream reads it.
    replay = [item.model_dump(exclude_none=True) for item in search.output]
    again = sdk.responses.create(
        model="rsp-web",
        input=[
            {"role": "user", "content": "relay news"},
            *replay,
            {"role": "user", "content": "more"},
        ],
        tools=[{"type": "web_search"}],
        store=False,
    )
    assert again.status == "completed"
    assert "web_search_call" in [item["type"] for item in responses_upstream.last["input"]]
    # Chains continued elsewhere: the answer's text goes, the call does not.
    on_claude = sdk.responses.create(
        model="claude-echo", previous_response_id=search.id, input="ok"
    )
    assert on_claude.output_text == "ok"
    assert [m["role"] for m in anthropic_upstream.last["messages"]] == ["user", "assistant", "user"]
    on_chat = sdk.responses.create(model="chat-echo", previous_response_id=search.id, input="ok")
    assert on_chat.output_text == "ok"
    assert [m["role"] for m in chat_upstream.last["messages"]] == ["user", "assistant", "user"]
