"""The loopback Anthropic upstream itself: the wire shapes other tests rely on."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from anthropic_upstream import (
    ANTHROPIC_KEY,
    AnthropicUpstream,
    sign_thinking,
)

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
THINKING = {"type": "enabled", "budget_tokens": 1024}


@pytest.fixture
def upstream(anthropic_upstream: AnthropicUpstream) -> AnthropicUpstream:
    anthropic_upstream.reset()
    return anthropic_upstream


@pytest.fixture
def client(upstream: AnthropicUpstream) -> Iterator[httpx.Client]:
    headers = {"x-api-key": ANTHROPIC_KEY, "anthropic-version": "2023-06-01"}
    with httpx.Client(base_url=upstream.base_url, headers=headers, timeout=5) as c:
        yield c


def body(model: str, text: str = "hello there world", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 2048,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    assert response.headers["content-type"].startswith("text/event-stream")
    parsed = []
    for frame in response.text.split("\n\n"):
        if not frame.strip():
            continue
        kind, data = frame.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: ")
        payload = orjson.loads(data.removeprefix("data: "))
        assert payload["type"] == kind.removeprefix("event: ")
        parsed.append((payload["type"], payload))
    return parsed


def test_echo_stream_event_order(client: httpx.Client) -> None:
    response = client.post("/v1/messages", json=body("echo", stream=True))
    assert response.status_code == 200
    stream = events(response)
    kinds = [kind for kind, _ in stream]
    assert kinds == [
        "message_start",
        "ping",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = stream[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {
        "input_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    text = "".join(e["delta"]["text"] for k, e in stream if k == "content_block_delta")
    assert text == "hello there world"
    delta = stream[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"] == {"output_tokens": 3}


def test_tool_use_stream_and_message(client: httpx.Client) -> None:
    response = client.post("/v1/messages", json=body("tools", tools=[WEATHER], stream=True))
    stream = events(response)
    start = next(e for k, e in stream if k == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    pieces = [e["delta"]["partial_json"] for k, e in stream if k == "content_block_delta"]
    assert len(pieces) == 3
    assert orjson.loads("".join(pieces)) == {"city": "Paris"}
    assert stream[-2][1]["delta"]["stop_reason"] == "tool_use"

    message = client.post("/v1/messages", json=body("tools", tools=[WEATHER])).json()
    assert message["type"] == "message" and message["id"].startswith("msg_")
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None
    call = message["content"][0]
    assert call["name"] == "get_weather" and call["input"] == {"city": "Paris"}


def test_thinking_round_trip(client: httpx.Client) -> None:
    first = body("thinking", "weather in Paris?", tools=[WEATHER], thinking=THINKING)
    message = client.post("/v1/messages", json=first).json()
    thought, call = message["content"]
    assert thought["thinking"] == "Let me think about weather in Paris?."
    assert thought["signature"] == sign_thinking(thought["thinking"])
    result = {"type": "tool_result", "tool_use_id": call["id"], "content": "sunny, 21C"}

    def turn(assistant: list[dict[str, Any]]) -> httpx.Response:
        messages = [
            *first["messages"],
            {"role": "assistant", "content": assistant},
            {"role": "user", "content": [result]},
        ]
        return client.post("/v1/messages", json={**first, "messages": messages})

    answer = turn(message["content"])
    assert answer.status_code == 200
    assert answer.json()["content"][-1]["text"] == "The tool said: sunny, 21C"

    tampered = {**thought, "thinking": thought["thinking"] + " Or not."}
    refused = turn([tampered, call])
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error" and "signature" in error["message"]

    dropped = turn([call])
    assert dropped.status_code == 400
    assert "thinking" in dropped.json()["error"]["message"]
    assert "signature" in dropped.json()["error"]["message"]


def test_redacted_thinking_round_trip(client: httpx.Client) -> None:
    first = body("redacted", tools=[WEATHER], thinking=THINKING)
    content = client.post("/v1/messages", json=first).json()["content"]
    assert [b["type"] for b in content] == ["redacted_thinking", "thinking", "tool_use"]
    result = {"type": "tool_result", "tool_use_id": content[2]["id"], "content": "ok"}
    messages = [
        *first["messages"],
        {"role": "assistant", "content": content},
        {"role": "user", "content": [result]},
    ]
    assert client.post("/v1/messages", json={**first, "messages": messages}).status_code == 200
    forged = base64.b64encode(b"x" * 56).decode()
    messages[1] = {"role": "assistant", "content": [{**content[0], "data": forged}, *content[1:]]}
    assert client.post("/v1/messages", json={**first, "messages": messages}).status_code == 400


def test_overloaded_body_shape(client: httpx.Client) -> None:
    response = client.post("/v1/messages", json=body("overloaded"))
    assert response.status_code == 529
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"] == {"type": "overloaded_error", "message": "Overloaded"}
    limited = client.post("/v1/messages", json=body("http_429"))
    assert limited.status_code == 429 and limited.headers["retry-after"] == "7"
    assert limited.json()["error"]["type"] == "rate_limit_error"


def test_error_mid_stream(client: httpx.Client) -> None:
    stream = events(client.post("/v1/messages", json=body("error_mid", stream=True)))
    assert [k for k, _ in stream][-3:] == ["content_block_delta", "content_block_delta", "error"]
    assert stream[-1][1]["error"]["type"] == "overloaded_error"


def test_auth_version_and_validation(client: httpx.Client) -> None:
    wrong = client.post("/v1/messages", json=body("echo"), headers={"x-api-key": "nope"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"
    del client.headers["anthropic-version"]
    assert client.post("/v1/messages", json=body("echo")).status_code == 400
    client.headers["anthropic-version"] = "2023-06-01"
    for bad in (
        {**body("echo"), "max_tokens": 0},
        {**body("echo"), "messages": [{"role": "assistant", "content": "hi"}]},
        {**body("echo"), "tools": [{**WEATHER, "name": "get weather"}]},
        body("echo", thinking={"type": "enabled", "budget_tokens": 512}),
        body("echo", thinking=THINKING, temperature=0.5),
        body("echo", thinking=THINKING, tools=[WEATHER], tool_choice={"type": "any"}),
        body("thinking"),
    ):
        response = client.post("/v1/messages", json=bad)
        assert response.status_code == 400, bad
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert client.post("/v1/messages", json=body("nope")).status_code == 404


def test_count_tokens_and_cache(client: httpx.Client, upstream: AnthropicUpstream) -> None:
    request = {"model": "echo", "system": "be brief", "messages": body("echo")["messages"]}
    counted = client.post("/v1/messages/count_tokens", json=request)
    assert counted.json() == {"input_tokens": 5}
    assert upstream.paths[-1] == "/v1/messages/count_tokens"

    system = [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}]
    cached = body("echo", system=system)
    usages = [client.post("/v1/messages", json=cached).json()["usage"] for _ in range(2)]
    assert usages[0]["cache_creation_input_tokens"] == 4 and usages[0]["input_tokens"] == 1
    assert (
        usages[1]["cache_read_input_tokens"] == 4 and usages[1]["cache_creation_input_tokens"] == 0
    )
