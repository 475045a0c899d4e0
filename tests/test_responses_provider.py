"""Relay in front of upstreams that speak the Responses API (the loopback mock in
responses_upstream), driven by the official openai SDK: Relay keeps the state and sends
each turn whole with store: false; events are re-sequenced; the upstream's encrypted
reasoning goes back to that upstream only; hosted tools pass through where the route allows
them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from relay_fixtures import checked_client, relay_on_sqlite, sdk_client, sse_events
from responses_upstream import RESPONSES_KEY, ResponsesUpstream

KEY_ENV = "RELAY_TEST_RESPONSES_KEY"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def deployment(upstream: ResponsesUpstream, name: str, script: str, **more: Any) -> dict[str, Any]:
    return {
        "name": name,
        "provider": "openai_responses",
        "base_url": upstream.base_url,
        "api_key_env": KEY_ENV,
        "upstream_model": script,
        "retries": 0,
        **more,
    }


@pytest.fixture(scope="module")
def second_upstream() -> Iterator[ResponsesUpstream]:
    """Another Responses upstream, with its own secret: it refuses the first's reasoning."""
    with ResponsesUpstream(api_key=RESPONSES_KEY) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def responses_url(
    responses_upstream: ResponsesUpstream,
    second_upstream: ResponsesUpstream,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Iterator[str]:
    monkeypatch_module.setenv(KEY_ENV, RESPONSES_KEY)
    one, two = responses_upstream, second_upstream
    spec: list[dict[str, Any]] = [
        *(
            {"model": f"rsp-{script}", **deployment(one, "one", script)}
            for script in ("echo", "tools", "length", "fail_mid", "http_429", "http_500")
        ),
        {"model": "rsp-web", **deployment(one, "one", "web_search", hosted_tools=["web_search"])},
        {
            # An upstream that fails right after announcing the response: nothing of the
            # answer came yet, so the next deployment serves it.
            "model": "rsp-early-error",
            "deployments": [
                deployment(one, "flaky", "error_event", weight=1000),
                {"name": "spare", "provider": "fake", "upstream_model": "text", "weight": 0.001},
            ],
        },
        {
            # Two upstreams, each with its own encrypted reasoning.
            "model": "rsp-reasoning",
            "deployments": [
                deployment(one, "one", "reasoning", weight=1000),
                deployment(two, "two", "reasoning", weight=0.001),
            ],
        },
    ]
    with relay_on_sqlite(tmp_path_factory, "responses", spec) as url:
        yield url


@pytest.fixture
def sdk(responses_url: str) -> Iterator[openai.OpenAI]:
    with sdk_client(responses_url) as client:
        yield client


@pytest.fixture
def http(responses_url: str) -> Iterator[httpx.Client]:
    with checked_client(responses_url) as client:
        yield client


@pytest.fixture
def upstream(responses_upstream: ResponsesUpstream) -> ResponsesUpstream:
    responses_upstream.reset()
    return responses_upstream


def test_each_turn_goes_whole_with_store_false(
    sdk: openai.OpenAI, upstream: ResponsesUpstream
) -> None:
    first = sdk.responses.create(model="rsp-echo", input="alpha beta", instructions="Be kind.")
    assert first.output_text == "alpha beta"
    assert first.id.startswith("resp_") and first.model == "rsp-echo"
    second = sdk.responses.create(model="rsp-echo", previous_response_id=first.id, input="gamma")
    assert second.output_text == "gamma"
    sent = upstream.last
    assert sent["store"] is False and "previous_response_id" not in sent
    kinds = [(item.get("type"), item.get("role")) for item in sent["input"]]
    assert kinds == [("message", "user"), ("message", "assistant"), ("message", "user")]
    assert all("id" not in item for item in sent["input"])  # Relay's ids stay with Relay
    assert upstream.headers[-1]["authorization"] == f"Bearer {RESPONSES_KEY}"
    # Stored by Relay, readable from Relay.
    assert sdk.responses.retrieve(second.id).output_text == "gamma"


def test_sampling_fields_go_upstream(sdk: openai.OpenAI, upstream: ResponsesUpstream) -> None:
    sdk.responses.create(
        model="rsp-echo", input="hi", temperature=0.3, extra_body={"top_k": 5, "seed": 7}
    )
    sent = upstream.last
    assert (sent["temperature"], sent["top_k"], sent["seed"]) == (0.3, 5, 7)


def test_stream_is_resequenced_and_valid(http: httpx.Client) -> None:
    events = sse_events(http, {"model": "rsp-echo", "input": "one two three"})
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == (
        "one two three"
    )
    relay_id = events[0]["response"]["id"]
    assert all(e["response"]["id"] == relay_id for e in events if "response" in e)


def test_tool_loop(sdk: openai.OpenAI, upstream: ResponsesUpstream) -> None:
    first = sdk.responses.create(model="rsp-tools", input="weather?", tools=[WEATHER])
    call = first.output[-1]
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
    second = sdk.responses.create(
        model="rsp-tools",
        previous_response_id=first.id,
        tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )
    assert second.output_text == "The tool said: sunny"
    assert upstream.last["tools"][0]["name"] == "get_weather"


def test_encrypted_reasoning_goes_back_to_its_upstream(
    sdk: openai.OpenAI, upstream: ResponsesUpstream
) -> None:
    first = sdk.responses.create(
        model="rsp-reasoning",
        input="weather in Oslo?",
        tools=[WEATHER],
        reasoning={"effort": "low", "summary": "auto"},
    )
    reasoning = first.output[0]
    assert reasoning.type == "reasoning" and reasoning.encrypted_content
    assert not reasoning.encrypted_content.startswith("rsenc_")  # sealed by Relay
    call = first.output[-1]
    second = sdk.responses.create(
        model="rsp-reasoning",
        previous_response_id=first.id,
        tools=[WEATHER],
        reasoning={"effort": "low", "summary": "auto"},
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "snow"}],
    )
    assert second.output_text == "The tool said: snow"
    given_back = [item for item in upstream.last["input"] if item["type"] == "reasoning"]
    assert len(given_back) == 1 and given_back[0]["encrypted_content"].startswith("rsenc_")
    assert upstream.unseal(given_back[0]["encrypted_content"]) is not None


def test_failover_to_another_upstream_strips_encrypted_reasoning(
    sdk: openai.OpenAI, upstream: ResponsesUpstream, second_upstream: ResponsesUpstream
) -> None:
    first = sdk.responses.create(
        model="rsp-reasoning",
        input="weather in Lima?",
        tools=[WEATHER],
        reasoning={"effort": "low"},
    )
    call = first.output[-1]
    second_upstream.reset()
    second = sdk.responses.create(
        model="rsp-reasoning",
        previous_response_id=first.id,
        tools=[WEATHER],
        reasoning={"effort": "low"},
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "fog"}],
        extra_body={"provider": {"order": ["two"]}},
    )
    assert second.status == "completed", second.error
    assert second.output_text == "The tool said: fog"
    assert all(item["type"] != "reasoning" for item in second_upstream.last["input"])


def test_hosted_web_search_passes_through(http: httpx.Client, upstream: ResponsesUpstream) -> None:
    body = {"model": "rsp-web", "input": "relay news", "tools": [{"type": "web_search"}]}
    answer = http.post("/v1/responses", json=body)
    assert answer.status_code == 200, answer.text
    output = answer.json()["output"]
    assert [item["type"] for item in output] == ["web_search_call", "message"]
    assert output[0]["action"]["query"] == "relay news"
    assert output[1]["content"][0]["annotations"][0]["type"] == "url_citation"
    assert upstream.last["tools"] == [{"type": "web_search"}]
    events = sse_events(http, body)
    kinds = [e["type"] for e in events]
    assert "response.web_search_call.searching" in kinds
    assert "response.output_text.annotation.added" in kinds


def test_hosted_tools_elsewhere_follow_the_server_setting(
    http: httpx.Client, upstream: ResponsesUpstream
) -> None:
    answer = http.post(
        "/v1/responses",
        json={"model": "rsp-echo", "input": "hi", "tools": [{"type": "web_search"}]},
    )
    assert answer.status_code == 200
    assert answer.headers["x-relay-omitted-tools"] == "web_search"
    assert "tools" not in upstream.last


def test_incomplete_and_failed(sdk: openai.OpenAI, http: httpx.Client) -> None:
    cut = sdk.responses.create(model="rsp-length", input="tell me all")
    assert cut.status == "incomplete"
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    events = sse_events(http, {"model": "rsp-fail_mid", "input": "hi"})
    assert events[-1]["type"] == "response.failed"
    assert "crashed" in events[-1]["response"]["error"]["message"]


@pytest.mark.parametrize(("model", "status"), [("rsp-http_429", 429), ("rsp-http_500", 502)])
def test_upstream_errors(http: httpx.Client, model: str, status: int) -> None:
    answer = http.post("/v1/responses", json={"model": model, "input": "hi"})
    assert answer.status_code == status
    assert RESPONSES_KEY not in answer.text


def test_input_tokens_are_counted_upstream(sdk: openai.OpenAI) -> None:
    count = sdk.responses.input_tokens.count(model="rsp-echo", input="three words here")
    assert count.input_tokens == 3


def test_custom_and_namespaced_calls_go_back_as_declared(
    sdk: openai.OpenAI, upstream: ResponsesUpstream
) -> None:
    patch = {"type": "custom", "name": "apply_patch", "description": "Apply a patch."}
    first = sdk.responses.create(model="rsp-tools", input="fix it", tools=[patch])
    call = first.output[-1]
    assert call.type == "custom_tool_call"
    second = sdk.responses.create(
        model="rsp-tools",
        previous_response_id=first.id,
        tools=[patch],
        input=[{"type": "custom_tool_call_output", "call_id": call.call_id, "output": "done"}],
    )
    assert second.output_text == "The tool said: done"
    kinds = [item["type"] for item in upstream.last["input"]]
    assert kinds == ["message", "function_call", "function_call_output"]
    assert upstream.last["input"][1]["name"] == "apply_patch"


def test_background_runs_and_conversations_on_a_responses_upstream(
    sdk: openai.OpenAI, upstream: ResponsesUpstream
) -> None:
    queued = sdk.responses.create(model="rsp-echo", input="in the background", background=True)
    assert queued.status in ("queued", "in_progress", "completed")
    deadline = time.monotonic() + 10
    done = queued
    while done.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
        done = sdk.responses.retrieve(queued.id)
    assert done.status == "completed" and done.output_text == "in the background"
    conversation = sdk.conversations.create()
    sdk.responses.create(model="rsp-echo", conversation=conversation.id, input="first turn")
    second = sdk.responses.create(model="rsp-echo", conversation=conversation.id, input="second")
    assert second.output_text == "second"
    texts = [item["content"][0]["text"] for item in upstream.last["input"]]
    assert texts == ["first turn", "first turn", "second"]
    assert upstream.last["store"] is False


def test_a_failure_before_any_output_fails_over(http: httpx.Client) -> None:
    answer = http.post("/v1/responses", json={"model": "rsp-early-error", "input": "hi"})
    assert answer.status_code == 200
    assert answer.headers["x-relay-deployment"] == "spare"
    events = sse_events(http, {"model": "rsp-early-error", "input": "hi"})
    assert events[-1]["type"] == "response.completed"
