"""The loopback Responses upstream itself: what tests of Relay in front of it rely on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from conformance import check_stream
from responses_upstream import RESPONSES_KEY, ResponsesUpstream

USER = [{"type": "message", "role": "user", "content": "What is the weather in Paris"}]
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture
def client(responses_upstream: ResponsesUpstream) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {RESPONSES_KEY}"}
    with httpx.Client(base_url=responses_upstream.base_url, headers=headers) as session:
        yield session


def create(client: httpx.Client, model: str, **fields: Any) -> httpx.Response:
    body = {"model": model, "input": USER, "store": False, **fields}
    return client.post("/responses", json=body)


def events(response: httpx.Response) -> list[dict[str, Any]]:
    """The SSE frames, checking that each `event:` line names its data's type."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    found = []
    for frame in response.text.split("\n\n"):
        if not frame:
            continue
        name, data = frame.split("\n")
        event = orjson.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        found.append(event)
    return found


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_echo_stream_order_and_sequence(
    client: httpx.Client, responses_upstream: ResponsesUpstream
) -> None:
    stream = events(create(client, "echo", stream=True, instructions="Be brief."))
    assert [e["type"] for e in stream] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 6,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    folded = check_stream(stream)  # sequence numbers 0.., nesting, schema
    assert stream[0]["response"]["usage"] is None
    assert folded["output"][0]["content"][0]["text"] == "What is the weather in Paris"
    assert folded["usage"]["input_tokens"] == 8
    assert folded["usage"]["output_tokens"] == 6
    assert folded["store"] is False
    assert responses_upstream.last["instructions"] == "Be brief."
    assert responses_upstream.headers[-1]["authorization"] == f"Bearer {RESPONSES_KEY}"

    plain = create(client, "echo").json()
    assert plain["object"] == "response" and plain["id"].startswith("resp_")
    assert plain["output"][0]["content"][0]["text"] == "What is the weather in Paris"
    counted = client.post("/responses/input_tokens", json={"model": "echo", "input": "a b c"})
    assert counted.json() == {"object": "response.input_tokens", "input_tokens": 3}


def test_refusals(client: httpx.Client, responses_upstream: ResponsesUpstream) -> None:
    anonymous = httpx.post(f"{responses_upstream.base_url}/responses", json={"model": "echo"})
    assert error_of(anonymous, 401)["code"] == "invalid_api_key"
    stored = error_of(create(client, "echo", store=True), 400)
    assert stored["message"] == "this mock keeps no state; send store: false"
    assert stored["param"] == "store"
    assert (
        error_of(client.post("/responses", json={"model": "echo", "input": "hi"}), 400)["param"]
        == "store"
    )  # store left out means true
    chained = error_of(create(client, "echo", previous_response_id="resp_1"), 400)
    assert chained["code"] == "previous_response_not_found"
    assert error_of(create(client, "nope"), 404)["code"] == "model_not_found"
    assert error_of(create(client, ""), 400)["param"] == "model"
    assert error_of(create(client, "echo", input=7), 400)["param"] == "input"
    limited = create(client, "http_429")
    assert error_of(limited, 429)["type"] == "rate_limit_exceeded"
    assert limited.headers["retry-after"] == "7"


def test_reasoning_round_trip(client: httpx.Client) -> None:
    include = ["reasoning.encrypted_content"]
    stream = events(create(client, "reasoning", stream=True, tools=[WEATHER], include=include))
    kinds = [e["type"] for e in stream]
    assert kinds[2:14] == [
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        *["response.reasoning_summary_text.delta"] * 8,
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
    ]
    first = check_stream(stream)
    reasoning, call = first["output"]
    assert reasoning["id"].startswith("rs_") and "content" not in reasoning
    assert reasoning["summary"] == [
        {"type": "summary_text", "text": "Thinking about What is the weather in Paris."}
    ]
    assert reasoning["encrypted_content"].startswith("rsenc_")
    assert call["name"] == "get_weather" and call["arguments"] == '{"city": "Paris"}'
    assert kinds.count("response.function_call_arguments.delta") == 2
    assert first["usage"]["output_tokens_details"]["reasoning_tokens"] > 0

    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
    second = create(client, "reasoning", input=[*USER, reasoning, call, output], tools=[WEATHER])
    assert second.status_code == 200, second.text
    assert second.json()["output"][1]["content"][0]["text"] == "The tool said: sunny"
    bare = {k: v for k, v in reasoning.items() if k != "encrypted_content"}
    assert create(client, "echo", input=[*USER, bare]).status_code == 200
    assert "encrypted_content" not in create(client, "reasoning").json()["output"][0]

    text = reasoning["summary"][0]["text"]
    foreign = ResponsesUpstream().seal(text)  # another server's secret
    tampered = reasoning["encrypted_content"][:-4] + "AAA="
    for token in (foreign, tampered, "gAAAAABsealed-by-relay"):
        refused = create(client, "echo", input=[*USER, {**reasoning, "encrypted_content": token}])
        error = error_of(refused, 400)
        assert (error["code"], error["param"]) == ("invalid_encrypted_content", "input")


def test_web_search(client: httpx.Client) -> None:
    stream = events(create(client, "web_search", stream=True, tools=[{"type": "web_search"}]))
    kinds = [e["type"] for e in stream]
    assert [e["sequence_number"] for e in stream] == list(range(len(stream)))
    assert kinds[2:7] == [
        "response.output_item.added",
        "response.web_search_call.in_progress",
        "response.web_search_call.searching",
        "response.web_search_call.completed",
        "response.output_item.done",
    ]
    assert kinds.index("response.output_text.annotation.added") < kinds.index(
        "response.output_text.done"
    )
    search, message = stream[-1]["response"]["output"]
    assert search["action"] == {"type": "search", "query": "What is the weather in Paris"}
    part = message["content"][0]
    (citation,) = part["annotations"]
    assert citation["url"] == "https://example.com/result"
    assert part["text"][citation["start_index"] : citation["end_index"]] == citation["title"]
    refused = error_of(create(client, "web_search"), 400)
    assert refused["message"] == "web_search tool required"


def test_endings(client: httpx.Client) -> None:
    cut = check_stream(events(create(client, "length", stream=True)))
    assert cut["status"] == "incomplete"
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["output"][0]["content"][0]["text"] == "partial"
    failed = events(create(client, "fail_mid", stream=True))
    assert failed[-1]["type"] == "response.failed"
    assert failed[-1]["response"]["error"] == {
        "code": "server_error",
        "message": "The model crashed.",
    }
    errored = events(create(client, "error_event", stream=True))
    assert [e["type"] for e in errored] == ["response.created", "response.in_progress", "error"]
    assert errored[-1]["code"] == "server_error" and errored[-1]["sequence_number"] == 2
    assert [e["type"] for e in events(create(client, "tools", stream=True))][-1] == (
        "response.completed"
    )
