"""POST /v1/responses end to end: the official SDK and raw SSE against a real server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pydantic
import pytest
from conformance import assert_valid_response, check_stream
from relay_fixtures import checked_client, sse_events
from sqlalchemy import Connection, func, select

from relay.log_lines import TextFormatter
from relay.storage.sql import open_store
from relay.storage.tables import responses, runs

VOLATILE = {"id", "created_at", "completed_at"}


def strip_volatile(response: dict[str, Any]) -> dict[str, Any]:
    """A response without what differs between two runs of the same request."""
    out = {k: v for k, v in response.items() if k not in VOLATILE}
    out["output"] = [
        {k: v for k, v in item.items() if k not in ("id", "call_id")} for item in response["output"]
    ]
    return out


def test_text_response_has_every_key(client: openai.OpenAI, http: httpx.Client) -> None:
    answer = http.post("/v1/responses", json={"model": "fake-text", "input": "hello there"})
    assert answer.status_code == 200
    body = answer.json()
    assert_valid_response(body)
    assert body["id"].startswith("resp_") and body["status"] == "completed"
    message = body["output"][0]
    assert message["id"].startswith("msg_") and message["role"] == "assistant"
    assert message["content"][0]["text"] == "You said: hello there"
    assert body["output_text"] == "You said: hello there"
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["input_tokens"] + body["usage"]["output_tokens"]
    )
    assert body["usage"]["output_tokens"] > 0
    # Defaults are echoed, nulls written out.
    assert body["temperature"] == 1.0 and body["top_p"] == 1.0 and body["tool_choice"] == "auto"
    assert body["truncation"] == "disabled" and body["text"]["format"] == {"type": "text"}
    assert body["previous_response_id"] is None and body["instructions"] is None
    sdk = client.responses.create(model="fake-text", input="hi again")
    assert sdk.output_text == "You said: hi again"


def test_request_id_is_echoed_or_made(http: httpx.Client) -> None:
    echoed = http.get("/healthz", headers={"x-request-id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    made = http.post("/v1/responses", json={"model": "nope", "input": "x"})
    assert made.status_code == 404 and made.headers["x-request-id"].startswith("req_")


def test_stream_folds_to_json_answer_and_stored_copy(
    client: openai.OpenAI, http: httpx.Client
) -> None:
    request = {"model": "fake-text", "input": "one two three", "metadata": {"k": "v"}}
    events = sse_events(http, request)
    kinds = [e["type"] for e in events]
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    folded = check_stream(events)
    assert http.get(f"/v1/responses/{folded['id']}").json() == folded
    answer = http.post("/v1/responses", json=request).json()
    assert strip_volatile(answer) == strip_volatile(folded)


def test_sdk_stream_helper_gets_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model="fake-text", input="streamed words") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "You said: streamed words" == final.output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_function_call_streams_arguments(http: httpx.Client) -> None:
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        }
    ]
    events = sse_events(http, {"model": "fake-tool_call", "input": "weather?", "tools": tools})
    folded = check_stream(events)
    call = folded["output"][0]
    assert call["type"] == "function_call" and call["id"].startswith("fc_")
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"location": "Paris"}
    assert call["status"] == "completed"
    kinds = [e["type"] for e in events]
    assert kinds.count("response.function_call_arguments.delta") >= 2
    assert "response.content_part.added" not in kinds
    assert folded["tools"][0] == {**tools[0], "strict": None}


def test_parallel_tool_calls_and_their_limit(client: openai.OpenAI) -> None:
    tools: Any = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    both = client.responses.create(model="fake-parallel_tool_calls", input="x", tools=tools)
    assert [item.type for item in both.output] == ["function_call", "function_call"]
    assert both.output[0].call_id != both.output[1].call_id  # type: ignore[union-attr]
    one = client.responses.create(
        model="fake-parallel_tool_calls", input="x", tools=tools, parallel_tool_calls=False
    )
    assert [item.type for item in one.output] == ["function_call"]
    capped = client.responses.create(
        model="fake-parallel_tool_calls", input="x", tools=tools, max_tool_calls=1
    )
    assert len(capped.output) == 1


def test_tool_choice_none_gets_text(client: openai.OpenAI) -> None:
    tools: Any = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]
    answer = client.responses.create(
        model="fake-tool_call", input="x", tools=tools, tool_choice="none"
    )
    assert [item.type for item in answer.output] == ["message"]
    assert answer.tool_choice == "none"


def test_reasoning_items_as_content_or_summary(http: httpx.Client) -> None:
    plain = check_stream(sse_events(http, {"model": "fake-reasoning", "input": "think"}))
    reasoning = plain["output"][0]
    assert reasoning["type"] == "reasoning" and reasoning["id"].startswith("rs_")
    assert reasoning["content"][0]["type"] == "reasoning_text"
    assert reasoning["content"][0]["text"] == "Let me think."
    assert plain["output"][1]["type"] == "message"
    assert plain["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
    summarised = check_stream(
        sse_events(
            http, {"model": "fake-reasoning", "input": "think", "reasoning": {"summary": "auto"}}
        )
    )
    assert summarised["output"][0]["summary"] == [{"type": "summary_text", "text": "Let me think."}]
    assert summarised["reasoning"] == {"effort": None, "summary": "auto"}


def test_max_output_tokens_gives_incomplete(http: httpx.Client) -> None:
    events = sse_events(http, {"model": "fake-length", "input": "go", "max_output_tokens": 16})
    folded = check_stream(events)
    assert events[-1]["type"] == "response.incomplete"
    assert folded["status"] == "incomplete"
    assert folded["incomplete_details"] == {"reason": "max_output_tokens"}
    assert folded["output"][-1]["status"] == "incomplete"


def test_failure_before_first_byte_is_an_http_error(http: httpx.Client) -> None:
    for stream in (False, True):
        answer = http.post(
            "/v1/responses", json={"model": "fake-error_before", "input": "x", "stream": stream}
        )
        assert answer.status_code == 503
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.json()["error"]["code"] == "upstream_error"


async def test_a_stored_stream_that_never_opens_leaves_no_record(
    http: httpx.Client, database_url: str
) -> None:
    """A stored stream is recorded as in_progress beside its upstream's opening (its id is in
    response.created); when the opening fails, the client gets the HTTP error and the record
    is taken back: no in_progress response of that model, and no run record without a
    response (other tests' streams may be in flight meanwhile)."""
    store = await open_store(database_url)
    never_opens = "fake-error_before"

    def left(conn: Connection) -> tuple[int, int]:
        in_progress = conn.execute(
            select(func.count())
            .select_from(responses)
            .where(responses.c.status == "in_progress", responses.c.model == never_opens)
        ).scalar_one()
        orphans = conn.execute(
            select(func.count())
            .select_from(runs)
            .where(runs.c.response_id.not_in(select(responses.c.id)))
        ).scalar_one()
        return in_progress, orphans

    try:
        async with httpx.AsyncClient(base_url=http.base_url, timeout=30) as client:
            for _ in range(3):
                answer = await client.post(
                    "/v1/responses", json={"model": never_opens, "input": "x", "stream": True}
                )
                assert answer.status_code == 503
        deadline = time.monotonic() + 10  # taken back by a task of the engine's
        while await store.db.read(left) != (0, 0):
            assert time.monotonic() < deadline, await store.db.read(left)
            await asyncio.sleep(0.05)
    finally:
        await store.close()


def test_a_stored_stream_answered_by_a_fallback_is_stored_with_its_model(
    http: httpx.Client,
) -> None:
    """Recorded as it starts with the model asked for; the fallback that answered is what
    its final save stores."""
    events = sse_events(
        http,
        {"model": "fake-error_before", "models": ["fake-text"], "input": "hi", "stream": True},
    )
    folded = check_stream(events)
    assert folded["model"] == "fake-text"
    assert http.get(f"/v1/responses/{folded['id']}").json()["model"] == "fake-text"


def test_fallback_models_are_tried_in_order(client: openai.OpenAI) -> None:
    via_list = client.responses.create(
        model="fake-error_before", input="hello", extra_body={"models": ["fake-text"]}
    )
    assert via_list.model == "fake-text" and via_list.output_text == "You said: hello"
    via_route = client.responses.create(model="fake-flaky", input="hello")
    assert via_route.model == "fake-text"


def test_failure_mid_stream_ends_in_response_failed(http: httpx.Client) -> None:
    events = sse_events(http, {"model": "fake-error_after", "input": "x"})
    folded = check_stream(events)
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert folded["status"] == "failed" and folded["error"]["code"] == "server_error"
    stored = http.get(f"/v1/responses/{folded['id']}").json()
    assert stored["status"] == "failed" and stored["output"] == folded["output"]
    answer = http.post("/v1/responses", json={"model": "fake-error_after", "input": "x"}).json()
    assert answer["status"] == "failed"


def test_client_disconnect_never_leaves_in_progress(relay_url: str, http: httpx.Client) -> None:
    with (
        httpx.Client(base_url=relay_url, timeout=30) as own,
        own.stream(
            "POST", "/v1/responses", json={"model": "fake-slow", "input": "x", "stream": True}
        ) as answer,
    ):
        lines = answer.iter_lines()
        response_id = None
        for line in lines:
            if line.startswith("data: ") and '"response.output_text.delta"' in line:
                break
            if line.startswith("data: ") and response_id is None:
                response_id = json.loads(line[6:])["response"]["id"]
    assert response_id is not None
    deadline = time.monotonic() + 10
    while True:
        # Recorded from its start (in_progress: its id was given out), settled as it stops.
        stored = http.get(f"/v1/responses/{response_id}")
        assert stored.status_code == 200
        if stored.json()["status"] != "in_progress" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    body = stored.json()
    assert body["status"] == "cancelled"
    assert body["output"][0]["status"] == "incomplete"
    partial = body["output"][0]["content"][0]["text"]
    assert partial and body["output_text"] == partial
    assert body["usage"] is not None
    assert_valid_response(body)


class Weather(pydantic.BaseModel):
    city: str
    celsius: int


def test_parse_with_pydantic_model(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(model="fake-json", input="weather", text_format=Weather)
    assert isinstance(parsed.output_parsed, Weather)
    stored = client.responses.retrieve(parsed.id)
    assert stored.text.format.type == "json_schema"  # type: ignore[union-attr]


def test_unknown_top_level_fields_are_ignored(http: httpx.Client) -> None:
    answer = http.post(
        "/v1/responses",
        json={"model": "fake-text", "input": "x", "client_metadata": {"a": 1}, "zzz": True},
    )
    assert answer.status_code == 200


@pytest.mark.parametrize(
    "item",
    [
        {"role": "user", "content": "typeless"},
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "d"}]},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "look"},
                {
                    "type": "input_image",
                    "image_url": "data:image/png;base64,iVBORw0KGgo=",
                    "detail": "low",
                },
                {
                    "type": "input_file",
                    "filename": "a.txt",
                    "file_data": "data:text/plain;base64,aGk=",
                },
            ],
        },
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_prev",
            "status": "completed",
            "phase": "final_answer",
            "content": [
                {"type": "output_text", "text": "earlier", "annotations": [], "logprobs": []}
            ],
        },
        {
            "type": "reasoning",
            "id": "rs_prev",
            "summary": [{"type": "summary_text", "text": "s"}],
            "encrypted_content": "opaque",
        },
    ],
)
def test_input_item_shapes_are_accepted_and_stored(
    http: httpx.Client, item: dict[str, Any]
) -> None:
    items = [item, {"role": "user", "content": "and now?"}]
    answer = http.post("/v1/responses", json={"model": "fake-text", "input": items})
    assert answer.status_code == 200, answer.text
    listed = http.get(
        f"/v1/responses/{answer.json()['id']}/input_items", params={"order": "asc"}
    ).json()
    assert len(listed["data"]) == 2
    first = listed["data"][0]
    assert first["type"] == item.get("type", "message") and first["id"]
    if "id" in item:
        assert first["id"] == item["id"]


def test_stream_obfuscation_is_on_by_default_and_can_be_refused(http: httpx.Client) -> None:
    padded = sse_events(http, {"model": "fake-text", "input": "pad me"})
    deltas = [e for e in padded if e["type"] == "response.output_text.delta"]
    assert deltas and all(e["obfuscation"] for e in deltas)
    plain = sse_events(
        http,
        {"model": "fake-text", "input": "pad me", "stream_options": {"include_obfuscation": False}},
    )
    assert not any("obfuscation" in e for e in plain)


def test_trace_and_session_reach_the_log(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="relay.access"):
        answer = http.post(
            "/v1/responses",
            headers={"x-session-id": "from-header"},
            json={"model": "fake-text", "input": "x", "trace": {"trace_id": "t-123"}},
        )
        forged = http.post(
            "/v1/responses",
            json={"model": "fake-text", "input": "x", "session_id": "a\nERROR forged line"},
        ).json()
    body = answer.json()
    assert body["session_id"] == "from-header"
    fields = next(r.fields for r in caplog.records if r.fields["response_id"] == body["id"])
    assert fields["session_id"] == "from-header" and fields["trace_id"] == "t-123"
    record = next(r for r in caplog.records if r.fields["response_id"] == forged["id"])
    line = TextFormatter().format(record)
    assert "\n" not in line, "client text must not start a new log line"
    assert 'session_id="a\\nERROR forged line"' in line
    won = http.post(
        "/v1/responses",
        headers={"x-session-id": "from-header"},
        json={"model": "fake-text", "input": "x", "session_id": "from-body"},
    )
    assert won.json()["session_id"] == "from-body"
    codex = http.post(
        "/v1/responses",
        headers={"session-id": "codex-7"},
        json={"model": "fake-text", "input": "x"},
    )
    assert codex.json()["session_id"] == "codex-7"  # Codex CLI's own header


def test_answer_is_stored_before_the_terminal_event(relay_url: str) -> None:
    """A client that fetches the id the moment response.completed arrives must find it."""
    with checked_client(relay_url) as own:
        for _ in range(5):
            with own.stream(
                "POST",
                "/v1/responses",
                json={"model": "fake-text", "input": "race", "stream": True},
            ) as s:
                for line in s.iter_lines():
                    if line.startswith("data: ") and '"response.completed"' in line:
                        response_id = json.loads(line[6:])["response"]["id"]
                        assert own.get(f"/v1/responses/{response_id}").status_code == 200
                        break
