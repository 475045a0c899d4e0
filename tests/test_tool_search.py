"""Tool search as Codex uses it: a `tool_search` tool (run by the client), functions and
namespaces with `defer_loading`, and `tool_search_call` / `tool_search_output` items given
back. Upstreams without tool search (chat, Anthropic, a Responses upstream that does not list
it) are offered every deferred tool and every tool a search loaded, in full, and never see the
search; a Responses upstream that runs it gets all of it as sent. Shapes are checked against
the openai SDK's types (conformance.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from anthropic_upstream import ANTHROPIC_KEY, AnthropicUpstream
from chat_upstream import UPSTREAM_KEY, ChatUpstream
from conformance import INPUT_ITEMS
from relay_fixtures import checked_client, relay_on_sqlite, sdk_client, sse_events
from responses_upstream import RESPONSES_KEY, ResponsesUpstream

CHAT_KEY_ENV = "RELAY_TEST_SEARCH_CHAT_KEY"
CLAUDE_KEY_ENV = "RELAY_TEST_SEARCH_CLAUDE_KEY"
RESPONSES_KEY_ENV = "RELAY_TEST_SEARCH_RESPONSES_KEY"

EXEC = {
    "type": "function",
    "name": "exec_command",
    "description": "Runs a command.",
    "strict": False,
    "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
}
# What Codex sends with its tool search on (codex-rs: ToolSpec::ToolSearch, execution client).
SEARCH = {
    "type": "tool_search",
    "execution": "client",
    "description": "Searches the tools of the MCP servers.",
    "parameters": {
        "type": "object",
        "properties": {"query": {"type": "string"}, "limit": {"type": "number"}},
        "required": ["query"],
    },
}
DOCS = {
    "type": "namespace",
    "name": "mcp__docs__",
    "description": "The docs server.",
    "tools": [
        {
            "type": "function",
            "name": "lookup",
            "description": "Looks a page up.",
            "strict": False,
            "defer_loading": True,
            "parameters": {"type": "object", "properties": {"page": {"type": "string"}}},
        }
    ],
}
CALENDAR = {
    "type": "namespace",
    "name": "mcp__calendar__",
    "description": "Tools in the mcp__calendar__ namespace.",
    "tools": [
        {
            "type": "function",
            "name": "create_event",
            "description": "Creates an event.",
            "strict": False,
            "defer_loading": True,
            "parameters": {"type": "object", "properties": {"title": {"type": "string"}}},
        }
    ],
}
TOOLS = [EXEC, DOCS, SEARCH]
SEARCH_CALL = {
    "type": "tool_search_call",
    "id": "tsc_1",
    "call_id": "call_search_1",
    "execution": "client",
    "status": "completed",
    "arguments": {"query": "calendar", "limit": 8},
}
SEARCH_OUTPUT = {
    "type": "tool_search_output",
    "id": "tso_1",
    "call_id": "call_search_1",
    "execution": "client",
    "status": "completed",
    "tools": [CALENDAR],
}
EVENT_CALL = {
    "type": "function_call",
    "call_id": "call_event_1",
    "namespace": "mcp__calendar__",
    "name": "create_event",
    "arguments": '{"title": "standup"}',
}
# A transcript that searched, loaded the calendar tools and called one.
TRANSCRIPT = [
    {"role": "user", "content": "add a standup to my calendar"},
    SEARCH_CALL,
    SEARCH_OUTPUT,
    EVENT_CALL,
    {"type": "function_call_output", "call_id": "call_event_1", "output": "created"},
]


def test_the_items_are_the_sdks_input_shapes() -> None:
    for item in (SEARCH_CALL, SEARCH_OUTPUT):
        INPUT_ITEMS[item["type"]].validate_python(item)


@pytest.fixture(scope="module")
def search_url(
    chat_upstream: ChatUpstream,
    anthropic_upstream: AnthropicUpstream,
    responses_upstream: ResponsesUpstream,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Iterator[str]:
    monkeypatch_module.setenv(CHAT_KEY_ENV, UPSTREAM_KEY)
    monkeypatch_module.setenv(CLAUDE_KEY_ENV, ANTHROPIC_KEY)
    monkeypatch_module.setenv(RESPONSES_KEY_ENV, RESPONSES_KEY)

    def responses(script: str, **more: Any) -> dict[str, Any]:
        return {
            "provider": "openai_responses",
            "base_url": responses_upstream.base_url,
            "api_key_env": RESPONSES_KEY_ENV,
            "upstream_model": script,
            "retries": 0,
            **more,
        }

    chat = {"base_url": chat_upstream.base_url, "api_key_env": CHAT_KEY_ENV, "retries": 0}
    routes = [
        {"model": "chat-tools", **chat, "upstream_model": "tools"},
        {"model": "chat-echo", **chat, "upstream_model": "echo"},
        {
            "model": "claude-tools",
            "provider": "anthropic",
            "base_url": anthropic_upstream.base_url,
            "api_key_env": CLAUDE_KEY_ENV,
            "upstream_model": "tools",
            "retries": 0,
        },
        {"model": "rsp-search", **responses("tool_search", hosted_tools=["tool_search"])},
        {"model": "rsp-plain", **responses("tools")},
    ]
    with relay_on_sqlite(tmp_path_factory, "tool-search", routes) as url:
        yield url


@pytest.fixture
def sdk(search_url: str) -> Iterator[openai.OpenAI]:
    with sdk_client(search_url) as client:
        yield client


@pytest.fixture
def http(search_url: str) -> Iterator[httpx.Client]:
    with checked_client(search_url) as client:
        yield client


def test_a_chat_upstream_gets_every_deferred_and_loaded_tool(
    http: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    chat_upstream.reset()
    body = {"model": "chat-echo", "tools": TOOLS, "input": [*TRANSCRIPT, "and another"]}
    body["input"][-1] = {"role": "user", "content": "and another"}
    answer = http.post("/v1/responses", json=body)
    assert answer.status_code == 200, answer.text
    sent = chat_upstream.requests[-1]
    offered = [tool["function"]["name"] for tool in sent["tools"]]
    # The deferred docs tool in full, the calendar tool the search loaded; no search.
    assert offered == ["exec_command", "mcp__docs____lookup", "mcp__calendar____create_event"]
    assert "defer_loading" not in str(sent["tools"])
    roles = [message["role"] for message in sent["messages"]]
    assert roles == ["user", "assistant", "tool", "user"]
    call = sent["messages"][1]["tool_calls"][0]["function"]
    assert call["name"] == "mcp__calendar____create_event"
    # The echo keeps what the client declared, and the items are stored as sent.
    response = answer.json()
    assert [tool["type"] for tool in response["tools"]] == ["function", "namespace", "tool_search"]
    assert response["tools"][2] == SEARCH
    assert response["tools"][1]["tools"][0]["defer_loading"] is True
    items = http.get(f"/v1/responses/{response['id']}/input_items", params={"order": "asc"})
    stored = items.json()["data"]
    assert stored[1] == SEARCH_CALL and stored[2] == SEARCH_OUTPUT


def test_the_model_calls_a_loaded_tool_as_the_client_named_it(
    sdk: openai.OpenAI, chat_upstream: ChatUpstream
) -> None:
    # The chat mock calls the first tool it is offered: here only the loaded one.
    response = sdk.responses.create(
        model="chat-tools",
        tools=[SEARCH],  # type: ignore[list-item]
        input=[
            {"role": "user", "content": "add a standup"},
            SEARCH_CALL,  # type: ignore[list-item]
            SEARCH_OUTPUT,  # type: ignore[list-item]
        ],
    )
    call = response.output[-1].model_dump()
    assert call["type"] == "function_call"
    assert (call["namespace"], call["name"]) == ("mcp__calendar__", "create_event")


def test_anthropic_gets_the_transcript_without_the_search(
    sdk: openai.OpenAI, anthropic_upstream: AnthropicUpstream
) -> None:
    anthropic_upstream.reset()
    response = sdk.responses.create(
        model="claude-tools",
        tools=TOOLS,  # type: ignore[arg-type]
        input=TRANSCRIPT,  # type: ignore[arg-type]
    )
    assert response.status == "completed"
    sent = anthropic_upstream.requests[-1]
    names = [tool["name"] for tool in sent["tools"]]
    assert names == ["exec_command", "mcp__docs____lookup", "mcp__calendar____create_event"]
    blocks = [[block["type"] for block in message["content"]] for message in sent["messages"]]
    assert blocks == [["text"], ["tool_use"], ["tool_result"]]


def test_a_responses_upstream_without_tool_search_never_sees_it(
    http: httpx.Client, responses_upstream: ResponsesUpstream
) -> None:
    # The mock refuses deferred tools and search items without the search tool, as their
    # meaning depends on it.
    responses_upstream.reset()
    answer = http.post(
        "/v1/responses", json={"model": "rsp-plain", "tools": TOOLS, "input": TRANSCRIPT}
    )
    assert answer.status_code == 200, answer.text
    sent = responses_upstream.requests[-1]
    assert [tool["name"] for tool in sent["tools"]] == [
        "exec_command",
        "mcp__docs____lookup",
        "mcp__calendar____create_event",
    ]
    assert [item["type"] for item in sent["input"]] == [
        "message",
        "function_call",
        "function_call_output",
    ]


def test_a_responses_upstream_with_tool_search_runs_codexs_loop(
    sdk: openai.OpenAI, http: httpx.Client, responses_upstream: ResponsesUpstream
) -> None:
    responses_upstream.reset()
    # 1. The model searches: the upstream's tool_search_call comes back as it made it.
    events = sse_events(
        http, {"model": "rsp-search", "tools": TOOLS, "input": "add a standup to my calendar"}
    )
    first = events[-1]["response"]
    searched = first["output"][-1]
    assert searched["type"] == "tool_search_call" and searched["execution"] == "client"
    sent = responses_upstream.requests[-1]
    assert sent["tools"][-1] == SEARCH
    assert sent["tools"][1] == {**DOCS["tools"][0], "name": "mcp__docs____lookup"}
    # 2. The client ran the search: the loaded tools go up with the output item, under the
    # names calls come back by, and the call to one comes back as the client named it.
    loaded = {**SEARCH_OUTPUT, "call_id": searched["call_id"]}
    second = sdk.responses.create(
        model="rsp-search",
        tools=TOOLS,  # type: ignore[arg-type]
        previous_response_id=first["id"],
        input=[loaded],  # type: ignore[list-item]
    )
    call = second.output[-1].model_dump()
    assert (call["namespace"], call["name"]) == ("mcp__calendar__", "create_event")
    sent = responses_upstream.requests[-1]
    assert [item["type"] for item in sent["input"]] == [
        "message",
        "tool_search_call",
        "tool_search_output",
    ]
    assert sent["input"][-1]["tools"] == [
        {**CALENDAR["tools"][0], "name": "mcp__calendar____create_event"}
    ]
    assert "mcp__calendar____create_event" not in [tool.get("name") for tool in sent["tools"]]
    # 3. The tool's output, on the same chain.
    third = sdk.responses.create(
        model="rsp-search",
        tools=TOOLS,  # type: ignore[arg-type]
        previous_response_id=second.id,
        input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "done"}],
    )
    assert third.output_text == "The tool said: done"
