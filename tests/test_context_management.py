"""Compaction inside create (`context_management`): past the threshold, Relay compacts the
context before the model's turn, the response opens with the sealed compaction item, and later
turns (previous_response_id, a conversation, a WebSocket, a client replaying its items from the
compaction item on) read the short window. A scripted coding agent's 200-turn session through
the loopback chat upstream stays within the threshold and keeps what a late question needs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from chat_upstream import SUMMARISE, UPSTREAM_KEY, ChatUpstream
from conformance import assert_valid_item
from relay_fixtures import (
    checked_client,
    logged_responses,
    relay_on_sqlite,
    sdk_client,
    sse_events,
)

KEY_ENV = "RELAY_TEST_CONTEXT_KEY"
THRESHOLD = 3000  # tokens, about 12 kB of context
EXEC = {
    "type": "function",
    "name": "exec_command",
    "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
}
COMPACTING = [{"type": "compaction", "compact_threshold": THRESHOLD}]
FILLER = "lorem ipsum dolor sit amet " * 20  # a command's output beside its fact, 540 bytes


@pytest.fixture(scope="module")
def url(
    chat_upstream: ChatUpstream,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Iterator[str]:
    monkeypatch_module.setenv(KEY_ENV, UPSTREAM_KEY)
    chat = {"base_url": chat_upstream.base_url, "api_key_env": KEY_ENV, "retries": 0}
    routes = [
        {"model": "coder", **chat, "upstream_model": "coder"},
        # Text, then an error chunk: a summarising turn that fails after it began.
        {"model": "breaking", **chat, "upstream_model": "error_chunk"},
    ]
    with relay_on_sqlite(tmp_path_factory, "context", routes) as relay:
        yield relay


@pytest.fixture
def http(url: str) -> Iterator[httpx.Client]:
    with checked_client(url) as client:
        yield client


def create(http: httpx.Client, **body: Any) -> dict[str, Any]:
    answer = http.post("/v1/responses", json={"model": "coder", "tools": [EXEC], **body})
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    for item in result["output"]:
        assert_valid_item(item)
    return result


def output(call: dict[str, Any], number: int) -> dict[str, Any]:
    """What the agent's command printed: a fact to remember, and noise."""
    text = f"FACT-{number}: file_{number} holds value-{number * 7}\n{FILLER}"
    return {"type": "function_call_output", "call_id": call["call_id"], "output": text}


def upstream_tokens(request: dict[str, Any]) -> int:
    return len(orjson.dumps(request["messages"])) // 4


def is_summary(request: dict[str, Any]) -> bool:
    return request["messages"][-1].get("content") == SUMMARISE


def test_a_long_agent_session_stays_within_the_threshold(
    http: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    chat_upstream.reset()
    first = create(http, input="Start the refactor.", context_management=COMPACTING)
    previous, call = first["id"], first["output"][-1]
    compactions = 0
    for number in range(1, 200):
        answer = create(
            http,
            input=[output(call, number)],
            previous_response_id=previous,
            context_management=COMPACTING,
        )
        assert answer["status"] == "completed"
        kinds = [item["type"] for item in answer["output"]]
        assert kinds in (["function_call"], ["compaction", "function_call"]), kinds
        compactions += kinds[0] == "compaction"
        previous, call = answer["id"], answer["output"][-1]
    question = {"type": "message", "role": "user", "content": "Question: what does file_7 hold?"}
    final = create(
        http,
        input=[output(call, 200), question],
        previous_response_id=previous,
        context_management=COMPACTING,
    )
    assert final["output_text"] == "Answered."
    # 200 outputs of 600 bytes are 30,000 tokens: without compaction the context would be
    # ten times the threshold. Each model turn read at most about the threshold.
    assert compactions >= 5
    turns = [request for request in chat_upstream.requests if not is_summary(request)]
    assert max(upstream_tokens(request) for request in turns) <= THRESHOLD * 1.2
    # The facts survive every compaction: the early one asked about reaches the model.
    last = orjson.dumps(turns[-1]["messages"]).decode()
    assert "FACT-7: file_7 holds value-49" in last
    assert "FACT-150: file_150 holds value-1050" in last


def test_the_stream_opens_with_the_compaction_and_usage_adds_its_turn(
    http: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    first = create(http, input="Start.", store=True)
    transcript: list[dict[str, Any]] = [
        {"type": "message", "role": "user", "content": "Start."},
        first["output"][-1],
    ]
    for number in range(1, 30):  # about 4,500 tokens of transcript
        transcript.append(output(transcript[-1], number))
        transcript.append({**transcript[-2], "call_id": f"call_{number}", "id": f"fc_{number}"})
    transcript.pop()
    chat_upstream.reset()
    body = {
        "model": "coder",
        "tools": [EXEC],
        "input": transcript,
        "store": False,
        "context_management": COMPACTING,
    }
    events = sse_events(http, body)
    kinds = [event["type"] for event in events]
    assert kinds[2:5] == [
        "response.output_item.added",
        "response.compaction.compacting",
        "response.output_item.done",
    ]
    final = events[-1]["response"]
    item = final["output"][0]
    assert item["type"] == "compaction" and item["encrypted_content"]
    summary, turn = chat_upstream.requests
    assert is_summary(summary) and not is_summary(turn)
    # The model's turn read the window: the summary, then the fresh output and its call.
    assert upstream_tokens(turn) < THRESHOLD
    assert "FACT-3: file_3" in orjson.dumps(turn["messages"]).decode()
    assert turn["messages"][-1]["role"] == "tool"
    # Both turns are in the usage (the chat upstream counts a token a word).
    assert final["usage"]["input_tokens"] > upstream_tokens(summary) // 10
    # A client that keeps no state replays from the compaction item on.
    chat_upstream.reset()
    call = final["output"][-1]
    replay = [item, call, output(call, 99)]
    again = create(http, input=replay, store=False, context_management=COMPACTING)
    assert [i["type"] for i in again["output"]] == ["function_call"]
    (turn,) = chat_upstream.requests
    text = orjson.dumps(turn["messages"]).decode()
    assert "FACT-3: file_3" in text and "FACT-99" in text


def test_below_the_threshold_nothing_is_compacted(
    http: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    chat_upstream.reset()
    answer = create(http, input="Start.", context_management=COMPACTING)
    assert [item["type"] for item in answer["output"]] == ["function_call"]
    assert len(chat_upstream.requests) == 1


def test_a_threshold_below_the_minimum_is_a_400(http: httpx.Client) -> None:
    answer = http.post(
        "/v1/responses",
        json={
            "model": "coder",
            "input": "hi",
            "context_management": [{"type": "compaction", "compact_threshold": 10}],
        },
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "context_management[0].compact_threshold"


def test_a_websocket_session_compacts_without_store(url: str, chat_upstream: ChatUpstream) -> None:
    with sdk_client(url) as sdk, sdk.responses.connect() as connection:
        previous = None
        compacted = 0
        call: Any = None
        for number in range(40):
            turn_input: Any = "Start." if call is None else [output(call.model_dump(), number)]
            connection.response.create(
                model="coder",
                input=turn_input,
                tools=[EXEC],  # type: ignore[list-item]
                store=False,
                previous_response_id=previous,
                context_management=COMPACTING,  # type: ignore[arg-type]
            )
            for event in connection:
                if event.type == "response.completed":
                    response = event.response
                    break
                assert event.type != "error", event
            kinds = [item.type for item in response.output]
            compacted += kinds[0] == "compaction"
            previous, call = response.id, response.output[-1]
    assert compacted >= 1
    turns = [request for request in chat_upstream.requests if not is_summary(request)]
    assert max(upstream_tokens(request) for request in turns[-10:]) <= THRESHOLD * 1.2


def test_the_openai_client_sends_context_management(url: str, chat_upstream: ChatUpstream) -> None:
    with sdk_client(url) as sdk:
        first = sdk.responses.create(model="coder", input="Start.", tools=[EXEC])  # type: ignore[list-item]
        assert isinstance(first, openai.types.responses.Response)
        created = sdk.responses.create(
            model="coder",
            input=[output(first.output[-1].model_dump(), 1)],  # type: ignore[list-item]
            tools=[EXEC],  # type: ignore[list-item]
            previous_response_id=first.id,
            context_management=[{"type": "compaction", "compact_threshold": 1000}],
        )
    assert created.output[-1].type == "function_call"


def responses_counted(url: str, model: str, status: str) -> float:
    metrics = httpx.get(f"{url}/metrics").text
    return sum(
        float(line.rpartition(" ")[2])
        for line in metrics.splitlines()
        if line.startswith("relay_responses_total{")
        and f'model="{model}"' in line
        and f'status="{status}"' in line
    )


def test_a_compaction_that_fails_is_still_billed_counted_and_logged(
    url: str, http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    """The summarising turn spent tokens although no response came of the request: it is
    settled as the response it is (a failed one), counted and logged."""
    long = {"type": "message", "role": "user", "content": "background " * 1500}
    said = {"type": "message", "role": "assistant", "content": "Understood."}
    before = responses_counted(url, "breaking", "failed")
    with caplog.at_level(logging.INFO, logger="relay.engine"):
        answer = http.post(
            "/v1/responses",
            json={
                "model": "breaking",
                "input": [long, said, {"type": "message", "role": "user", "content": "go"}],
                "context_management": COMPACTING,
            },
        )
    assert answer.status_code == 502, answer.text
    assert "could not compact" in answer.json()["error"]["message"]
    assert responses_counted(url, "breaking", "failed") == before + 1
    lines = [f for f in logged_responses(caplog.records, "failed") if f["model"] == "breaking"]
    assert len(lines) == 1 and lines[0]["input_tokens"] > 0


def test_a_tool_policy_refusal_comes_before_any_compaction(
    url: str, http: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    """An MCP server this Relay does not allow is refused before the summarising turn, so
    a refused request spends nothing upstream."""
    long = {"type": "message", "role": "user", "content": "background " * 1500}
    said = {"type": "message", "role": "assistant", "content": "Understood."}
    mcp = {"type": "mcp", "server_label": "x", "server_url": "https://mcp.example/mcp"}
    chat_upstream.reset()
    before = responses_counted(url, "coder", "completed")
    answer = http.post(
        "/v1/responses",
        json={
            "model": "coder",
            "input": [long, said, {"type": "message", "role": "user", "content": "go"}],
            "tools": [mcp],
            "context_management": COMPACTING,
        },
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "mcp_server_not_allowed"
    assert chat_upstream.requests == []
    assert responses_counted(url, "coder", "completed") == before
