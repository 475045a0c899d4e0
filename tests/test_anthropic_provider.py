"""Relay in front of an Anthropic Messages upstream (the loopback mock in anthropic_upstream),
driven by the official openai SDK: every item kind, tools and tool_choice, JSON output,
thinking whose signature round-trips through Relay-sealed encrypted_content, stop reasons,
usage with prompt caching, and errors."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from anthropic_upstream import ANTHROPIC_KEY, AnthropicUpstream
from relay_fixtures import checked_client, relay_on_sqlite, sdk_client, sse_events

from relay.config import RouteConfig

KEY_ENV = "RELAY_TEST_ANTHROPIC_KEY"
WRONG_KEY_ENV = "RELAY_TEST_ANTHROPIC_WRONG_KEY"
WRONG_KEY = "sk-ant-wrong-9Xq4Lm2Vb7Nc1Zt8Rw5Ky3Hd6Fp0Gs"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
TIME = {
    "type": "function",
    "name": "get_time",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
}
PIXEL = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()


def anthropic_routes(upstream: AnthropicUpstream) -> list[RouteConfig]:
    def route(model: str, script: str, **more: Any) -> RouteConfig:
        return RouteConfig.model_validate(
            {
                "model": model,
                "provider": "anthropic",
                "base_url": upstream.base_url,
                "api_key_env": KEY_ENV,
                "upstream_model": script,
                "retries": 0,
                **more,
            }
        )

    scripts = ["echo", "tools", "parallel", "thinking", "redacted", "length", "refusal"]
    scripts += ["error_mid", "overloaded", "http_429", "http_400", "prompt_too_long"]
    return [
        *(route(f"claude-{script}", script) for script in scripts),
        route("claude-native-json", "echo", json_output="native"),
        route("claude-uncached", "echo", prompt_caching="off"),
        route("claude-wrong-key", "echo", api_key_env=WRONG_KEY_ENV),
    ]


@pytest.fixture(scope="module")
def claude_url(
    anthropic_upstream: AnthropicUpstream,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Iterator[str]:
    monkeypatch_module.setenv(KEY_ENV, ANTHROPIC_KEY)
    monkeypatch_module.setenv(WRONG_KEY_ENV, WRONG_KEY)
    with relay_on_sqlite(
        tmp_path_factory, "anthropic", anthropic_routes(anthropic_upstream)
    ) as url:
        yield url


@pytest.fixture
def sdk(claude_url: str) -> Iterator[openai.OpenAI]:
    with sdk_client(claude_url) as client:
        yield client


@pytest.fixture
def http(claude_url: str) -> Iterator[httpx.Client]:
    with checked_client(claude_url) as client:
        yield client


@pytest.fixture
def upstream(anthropic_upstream: AnthropicUpstream) -> AnthropicUpstream:
    anthropic_upstream.reset()
    return anthropic_upstream


def sent(upstream: AnthropicUpstream) -> dict[str, Any]:
    """The last /v1/messages body (not a count_tokens one)."""
    for path, body in zip(reversed(upstream.paths), reversed(upstream.requests), strict=True):
        if path == "/v1/messages":
            return body
    raise AssertionError("no /v1/messages request")


def test_text_with_system_and_developer_instructions(
    sdk: openai.OpenAI, upstream: AnthropicUpstream
) -> None:
    response = sdk.responses.create(
        model="claude-echo",
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": "hello from relay"},
        ],
        max_output_tokens=300,
        temperature=0.5,
        user="user-7",
    )
    assert response.output_text == "hello from relay"
    body = sent(upstream)
    assert body["system"][0]["text"] == "Be brief.\n\nAnswer in English."
    assert body["messages"][0]["role"] == "user"
    assert body["max_tokens"] == 300 and body["temperature"] == 0.5
    # An opaque id: Messages refuses ids that look like an email address.
    assert body["metadata"]["user_id"] == hashlib.sha256(b"user-7").hexdigest()[:32]
    headers = upstream.headers[-1]
    assert headers["x-api-key"] == ANTHROPIC_KEY and headers["anthropic-version"]
    assert response.usage is not None and response.usage.output_tokens == 3


def test_stream_is_valid_and_sequenced(http: httpx.Client) -> None:
    events = sse_events(http, {"model": "claude-echo", "input": "one two three"})
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == "one two three"
    assert events[-1]["type"] == "response.completed"


def test_prompt_caching_reports_reads_and_writes(
    sdk: openai.OpenAI, upstream: AnthropicUpstream
) -> None:
    question = "a long and stable prompt worth caching for the next turn"
    first = sdk.responses.create(model="claude-echo", instructions="Cache me.", input=question)
    second = sdk.responses.create(model="claude-echo", instructions="Cache me.", input=question)
    assert first.usage is not None and second.usage is not None
    written = first.model_dump()["usage"]["input_tokens_details"]
    assert written["cache_write_tokens"] > 0 and written["cached_tokens"] == 0
    assert second.usage.input_tokens_details.cached_tokens > 0
    # input_tokens counts the cached part too, as the Responses API does.
    assert second.usage.input_tokens == first.usage.input_tokens
    assert sent(upstream)["system"][-1]["cache_control"] == {"type": "ephemeral"}
    sdk.responses.create(model="claude-uncached", input=question)
    assert "cache_control" not in json.dumps(sent(upstream))


def test_images_and_files(sdk: openai.OpenAI, upstream: AnthropicUpstream) -> None:
    pdf = base64.b64encode(b"%PDF-1.4 tiny").decode()
    sdk.responses.create(
        model="claude-echo",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "describe these"},
                    {"type": "input_image", "image_url": f"data:image/png;base64,{PIXEL}"},
                    {"type": "input_image", "image_url": "https://example.com/cat.png"},
                    {"type": "input_file", "filename": "a.pdf", "file_data": pdf},
                    {"type": "input_file", "file_url": "https://example.com/b.pdf"},
                ],
            }
        ],
    )
    blocks = sent(upstream)["messages"][0]["content"]
    assert blocks[1]["source"] == {"type": "base64", "media_type": "image/png", "data": PIXEL}
    assert blocks[2]["source"] == {"type": "url", "url": "https://example.com/cat.png"}
    assert blocks[3]["type"] == "document"
    assert blocks[3]["source"]["media_type"] == "application/pdf"
    assert blocks[4]["source"] == {"type": "url", "url": "https://example.com/b.pdf"}


def test_tool_call_and_result_through_a_chain(
    sdk: openai.OpenAI, upstream: AnthropicUpstream
) -> None:
    first = sdk.responses.create(model="claude-tools", input="weather in Paris?", tools=[WEATHER])
    call = first.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert sent(upstream)["tool_choice"] == {"type": "auto"}
    second = sdk.responses.create(
        model="claude-tools",
        previous_response_id=first.id,
        tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )
    assert second.output_text == "The tool said: sunny"
    messages = sent(upstream)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"][-1]["type"] == "tool_use"
    assert messages[2]["content"][0]["tool_use_id"] == call.call_id


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("required", {"type": "any"}),
        ({"type": "function", "name": "get_time"}, {"type": "tool", "name": "get_time"}),
    ],
)
def test_tool_choice(
    sdk: openai.OpenAI, upstream: AnthropicUpstream, choice: Any, expected: dict[str, Any]
) -> None:
    response = sdk.responses.create(
        model="claude-tools", input="go", tools=[WEATHER, TIME], tool_choice=choice
    )
    assert sent(upstream)["tool_choice"] == expected
    assert response.output[-1].type == "function_call"


def test_tool_choice_none(sdk: openai.OpenAI, upstream: AnthropicUpstream) -> None:
    response = sdk.responses.create(
        model="claude-tools", input="just talk", tools=[WEATHER], tool_choice="none"
    )
    assert sent(upstream)["tool_choice"] == {"type": "none"}
    assert response.output_text == "no tools"


def test_parallel_tool_calls(sdk: openai.OpenAI, upstream: AnthropicUpstream) -> None:
    both = sdk.responses.create(model="claude-parallel", input="go", tools=[WEATHER, TIME])
    assert [item.type for item in both.output] == ["function_call", "function_call"]
    one = sdk.responses.create(
        model="claude-parallel", input="go", tools=[WEATHER, TIME], parallel_tool_calls=False
    )
    assert sent(upstream)["tool_choice"]["disable_parallel_tool_use"] is True
    assert [item.type for item in one.output] == ["function_call"]


def test_json_schema_through_a_forced_tool(sdk: openai.OpenAI, upstream: AnthropicUpstream) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "temperature": {"type": "number"}},
        "required": ["city", "temperature"],
        "additionalProperties": False,
    }
    response = sdk.responses.create(
        model="claude-tools",
        input="weather as JSON",
        text={"format": {"type": "json_schema", "name": "weather", "schema": schema}},
    )
    assert json.loads(response.output_text) == {"city": "Paris", "temperature": 21}
    assert [item.type for item in response.output] == ["message"]
    body = sent(upstream)
    assert body["tool_choice"] == {"type": "tool", "name": "json_output"}
    assert body["tools"][-1]["input_schema"] == schema


def test_json_schema_natively(sdk: openai.OpenAI, upstream: AnthropicUpstream) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    sdk.responses.create(
        model="claude-native-json",
        input="x y",
        text={"format": {"type": "json_schema", "name": "a", "schema": schema}},
    )
    assert sent(upstream)["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


def test_multi_turn_tool_use_with_thinking_in_a_chain(
    sdk: openai.OpenAI, upstream: AnthropicUpstream
) -> None:
    first = sdk.responses.create(
        model="claude-thinking",
        input="weather in Paris?",
        tools=[WEATHER],
        reasoning={"effort": "low"},
    )
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    reasoning = first.output[0]
    assert reasoning.encrypted_content  # the signature, sealed by Relay
    assert reasoning.content and "Let me think about" in reasoning.content[0].text
    assert sent(upstream)["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    call = first.output[1]
    second = sdk.responses.create(
        model="claude-thinking",
        previous_response_id=first.id,
        tools=[WEATHER],
        reasoning={"effort": "low"},
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "rain"}],
    )
    assert second.status == "completed", second.error
    assert second.output_text == "The tool said: rain"
    # The upstream verified the signature of the thinking block Relay gave back.
    assistant = sent(upstream)["messages"][1]["content"]
    assert assistant[0]["type"] == "thinking" and assistant[0]["signature"]


def test_thinking_round_trips_without_storage(
    sdk: openai.OpenAI, upstream: AnthropicUpstream
) -> None:
    first = sdk.responses.create(
        model="claude-thinking",
        input="weather in Rome?",
        tools=[WEATHER],
        reasoning={"effort": "low"},
        store=False,
        include=["reasoning.encrypted_content"],
    )
    replay = [item.model_dump(exclude_none=True) for item in first.output]
    call = first.output[-1]
    turn = [
        {"role": "user", "content": "weather in Rome?"},
        *replay,
        {"type": "function_call_output", "call_id": call.call_id, "output": "hail"},
    ]
    second = sdk.responses.create(
        model="claude-thinking",
        input=turn,
        tools=[WEATHER],
        reasoning={"effort": "low"},
        store=False,
    )
    assert second.output_text == "The tool said: hail"
    # Tampered with, the sealed content opens to nothing: the thinking block is not sent,
    # and the upstream refuses the turn.
    replay[0]["encrypted_content"] = replay[0]["encrypted_content"][:-8] + "AAAAAAA="
    turn[1] = replay[0]
    with pytest.raises(openai.BadRequestError):
        sdk.responses.create(
            model="claude-thinking",
            input=turn,
            tools=[WEATHER],
            reasoning={"effort": "low"},
            store=False,
        )


def test_redacted_thinking_is_kept(sdk: openai.OpenAI, upstream: AnthropicUpstream) -> None:
    first = sdk.responses.create(
        model="claude-redacted", input="secret?", tools=[WEATHER], reasoning={"effort": "low"}
    )
    assert [item.type for item in first.output] == ["reasoning", "reasoning", "function_call"]
    call = first.output[-1]
    second = sdk.responses.create(
        model="claude-redacted",
        previous_response_id=first.id,
        tools=[WEATHER],
        reasoning={"effort": "low"},
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "ok"}],
    )
    assert second.output_text == "The tool said: ok"
    blocks = [block["type"] for block in sent(upstream)["messages"][1]["content"]]
    assert blocks == ["redacted_thinking", "thinking", "tool_use"]


def test_stop_reasons(sdk: openai.OpenAI) -> None:
    cut = sdk.responses.create(model="claude-length", input="tell me everything")
    assert cut.status == "incomplete"
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    refused = sdk.responses.create(model="claude-refusal", input="something bad")
    parts = refused.output[0].content  # type: ignore[union-attr]
    assert [part.type for part in parts] == ["output_text", "refusal"]


@pytest.mark.parametrize(
    ("model", "status", "code"),
    [
        ("claude-overloaded", 503, "upstream_overloaded"),
        ("claude-http_429", 429, "rate_limit_exceeded"),
        ("claude-http_400", 400, "upstream_invalid_request"),
        ("claude-prompt_too_long", 400, "context_length_exceeded"),
    ],
)
def test_errors_in_the_envelope(http: httpx.Client, model: str, status: int, code: str) -> None:
    answer = http.post("/v1/responses", json={"model": model, "input": "hi"})
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code
    assert ANTHROPIC_KEY not in answer.text
    if status == 429:
        assert answer.headers["retry-after"] == "7"


def test_error_mid_stream_fails_the_response(http: httpx.Client) -> None:
    events = sse_events(http, {"model": "claude-error_mid", "input": "hi"})
    assert events[-1]["type"] == "response.failed"
    assert "Overloaded" in events[-1]["response"]["error"]["message"]


def test_unsupported_parameters_are_refused(http: httpx.Client) -> None:
    answer = http.post("/v1/responses", json={"model": "claude-echo", "input": "hi", "seed": 7})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "seed"


def test_input_tokens_are_counted_upstream(sdk: openai.OpenAI, upstream: AnthropicUpstream) -> None:
    count = sdk.responses.input_tokens.count(model="claude-echo", input="four words right here")
    assert count.input_tokens == 4
    assert upstream.paths[-1] == "/v1/messages/count_tokens"


def test_tool_choice_none_after_tool_calls_keeps_the_definitions(
    sdk: openai.OpenAI, upstream: AnthropicUpstream
) -> None:
    first = sdk.responses.create(model="claude-tools", input="weather?", tools=[WEATHER])
    call = first.output[-1]
    assert call.type == "function_call"
    second = sdk.responses.create(
        model="claude-tools",
        previous_response_id=first.id,
        tools=[WEATHER],
        tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "dry"}],
    )
    assert second.status == "completed"
    body = sent(upstream)
    assert body["tool_choice"] == {"type": "none"}
    assert [tool["name"] for tool in body["tools"]] == ["get_weather"]


def test_thinking_round_trips_when_shown_as_a_summary(
    sdk: openai.OpenAI, upstream: AnthropicUpstream
) -> None:
    """Codex asks for reasoning summaries: the thinking text is then the item's summary."""
    reasoning: Any = {"effort": "low", "summary": "auto"}
    first = sdk.responses.create(
        model="claude-thinking", input="weather in Bern?", tools=[WEATHER], reasoning=reasoning
    )
    assert first.output[0].type == "reasoning" and first.output[0].summary
    call = first.output[-1]
    second = sdk.responses.create(
        model="claude-thinking",
        previous_response_id=first.id,
        tools=[WEATHER],
        reasoning=reasoning,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "mild"}],
    )
    assert second.output_text == "The tool said: mild"
    thinking = sent(upstream)["messages"][1]["content"][0]
    assert thinking["type"] == "thinking" and "Bern" in thinking["thinking"]


def test_a_tool_loop_begun_without_thinking_continues_without_it(
    sdk: openai.OpenAI, upstream: AnthropicUpstream
) -> None:
    first = sdk.responses.create(model="claude-tools", input="weather?", tools=[WEATHER])
    call = first.output[-1]
    second = sdk.responses.create(
        model="claude-tools",
        previous_response_id=first.id,
        tools=[WEATHER],
        reasoning={"effort": "low"},
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "wet"}],
    )
    assert second.output_text == "The tool said: wet"
    assert "thinking" not in sent(upstream)
    # A new question starts a new loop: thinking is back.
    sdk.responses.create(
        model="claude-tools", previous_response_id=second.id, input="and now?",
        reasoning={"effort": "low"},
    )  # fmt: skip
    assert sent(upstream)["thinking"]["type"] == "enabled"


def test_json_schema_with_thinking_is_offered_not_forced(
    sdk: openai.OpenAI, upstream: AnthropicUpstream
) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    response = sdk.responses.create(
        model="claude-thinking",
        input="weather as JSON",
        reasoning={"effort": "low"},
        text={"format": {"type": "json_schema", "name": "weather", "schema": schema}},
    )
    assert sent(upstream)["tool_choice"] == {"type": "auto"}
    assert json.loads(response.output_text) == {"city": "Paris"}
    assert [item.type for item in response.output] == ["reasoning", "message"]


def test_tool_results_open_the_user_turn(sdk: openai.OpenAI, upstream: AnthropicUpstream) -> None:
    first = sdk.responses.create(model="claude-tools", input="weather?", tools=[WEATHER])
    call = first.output[-1]
    sdk.responses.create(
        model="claude-tools",
        previous_response_id=first.id,
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "here is the result"},
            {"type": "function_call_output", "call_id": call.call_id, "output": "calm"},
        ],
    )
    last = sent(upstream)["messages"][-1]["content"]
    assert [block["type"] for block in last] == ["tool_result", "text"]


def test_a_history_that_opens_with_the_assistant(
    sdk: openai.OpenAI, upstream: AnthropicUpstream
) -> None:
    # The official suite's assistant-phase test, and any client replaying a transcript: the
    # mock refuses a first message that is not the user's, as Messages does.
    response = sdk.responses.create(
        model="claude-echo",
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Answer in English."},
            {"role": "assistant", "content": "Looking into it.", "phase": "commentary"},
            {"role": "user", "content": "and now?"},
        ],
    )
    assert response.status == "completed" and response.output_text == "and now?"
    messages = sent(upstream)["messages"]
    assert [message["role"] for message in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == [{"type": "text", "text": "Looking into it."}]
    # Streamed and chained the same way: the stored chain opens with the assistant too.
    with sdk.responses.stream(
        model="claude-echo", previous_response_id=response.id, input="again"
    ) as stream:
        assert stream.get_final_response().output_text == "again"
    assert sent(upstream)["messages"][0]["role"] == "user"


def test_a_refused_key_never_reaches_the_client(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    """The mock's 401 repeats the x-api-key it got, as some upstreams do."""
    answer = http.post("/v1/responses", json={"model": "claude-wrong-key", "input": "hi"})
    assert answer.status_code == 502
    assert answer.json()["error"]["code"] == "upstream_auth_failed"
    assert WRONG_KEY not in answer.text and WRONG_KEY[:12] not in answer.text
    assert all(WRONG_KEY not in record.getMessage() for record in caplog.records)


def test_a_thinking_tool_loop_on_a_websocket(claude_url: str) -> None:
    """WebSocket mode with store: false: the socket keeps the chain, thinking included."""
    from test_websocket import completed, socket_url, turn
    from websockets.sync.client import connect

    with connect(socket_url(claude_url)) as socket:
        first = completed(
            turn(
                socket,
                model="claude-thinking",
                input="weather in Quito?",
                tools=[WEATHER],
                reasoning={"effort": "low"},
                store=False,
            )
        )
        call = first["output"][-1]
        assert [item["type"] for item in first["output"]] == ["reasoning", "function_call"]
        answer = {"type": "function_call_output", "call_id": call["call_id"], "output": "ok"}
        second = completed(
            turn(
                socket,
                model="claude-thinking",
                previous_response_id=first["id"],
                input=[answer],
                tools=[WEATHER],
                reasoning={"effort": "low"},
                store=False,
            )
        )
    assert second["output_text"] == "The tool said: ok"
