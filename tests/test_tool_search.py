"""Tool search as Codex uses it: a `tool_search` tool (run by the client), functions and
namespaces with `defer_loading`, and `tool_search_call` / `tool_search_output` items given
back. Upstreams without tool search (chat, Anthropic, a Responses upstream that does not list
it) are offered every deferred tool and every tool a search loaded, in full; a search the
client runs as a function (its calls come back as tool_search_call items, its items go back
as that function's call and output), a search the server runs never. A Responses upstream
that runs it gets all of it as sent. Shapes are checked against the openai SDK's types
(conformance.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from anthropic_upstream import ANTHROPIC_KEY, AnthropicUpstream
from chat_upstream import UPSTREAM_KEY, ChatUpstream
from conformance import INPUT_ITEMS, assert_valid_item
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
# The same with a search the server ran: upstreams without tool search never see it.
SERVER_TOOLS = [EXEC, DOCS, {"type": "tool_search"}]
SERVER_TRANSCRIPT = [
    {**item, "execution": "server"} if item.get("type") in SEARCH_TYPES else item
    for item in TRANSCRIPT
    for SEARCH_TYPES in [("tool_search_call", "tool_search_output")]
]
# What a model that called the search as a function reads as its result.
LISTING = "Tools loaded, callable from now on:\n- mcp__calendar____create_event: Creates an event."


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
    claude = {
        "provider": "anthropic",
        "base_url": anthropic_upstream.base_url,
        "api_key_env": CLAUDE_KEY_ENV,
        "retries": 0,
    }
    routes = [
        {"model": "chat-tools", **chat, "upstream_model": "tools"},
        {"model": "chat-echo", **chat, "upstream_model": "echo"},
        {"model": "chat-searcher", **chat, "upstream_model": "searcher"},
        {"model": "chat-parallel", **chat, "upstream_model": "parallel"},
        {"model": "claude-tools", **claude, "upstream_model": "tools"},
        {"model": "claude-searcher", **claude, "upstream_model": "searcher"},
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


def ask_chat(
    http: httpx.Client,
    upstream: ChatUpstream,
    tools: list[dict[str, Any]],
    transcript: list[dict[str, Any]],
) -> tuple[httpx.Response, dict[str, Any]]:
    """The answer to one more turn after `transcript` on the chat route, and what the chat
    upstream was sent for it."""
    upstream.reset()
    body = {
        "model": "chat-echo",
        "tools": tools,
        "input": [*transcript, {"role": "user", "content": "and another"}],
    }
    answer = http.post("/v1/responses", json=body)
    assert answer.status_code == 200, answer.text
    return answer, upstream.requests[-1]


def test_a_chat_upstream_gets_every_deferred_and_loaded_tool_and_no_server_search(
    http: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    answer, sent = ask_chat(http, chat_upstream, SERVER_TOOLS, SERVER_TRANSCRIPT)
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
    assert response["tools"][1]["tools"][0]["defer_loading"] is True
    items = http.get(f"/v1/responses/{response['id']}/input_items", params={"order": "asc"})
    stored = items.json()["data"]
    assert stored[1:3] == SERVER_TRANSCRIPT[1:3]


def test_a_chat_upstream_is_offered_a_client_search_as_a_function(
    http: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    answer, sent = ask_chat(http, chat_upstream, TOOLS, TRANSCRIPT)
    offered = {tool["function"]["name"]: tool["function"] for tool in sent["tools"]}
    assert list(offered) == [
        "exec_command",
        "mcp__docs____lookup",
        "tool_search",
        "mcp__calendar____create_event",
    ]
    assert offered["tool_search"]["description"] == SEARCH["description"]
    assert offered["tool_search"]["parameters"] == SEARCH["parameters"]
    # The search is the model's call of that function, its output the tools it loaded.
    messages = sent["messages"]
    assert [message["role"] for message in messages] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "user",
    ]
    search = messages[1]["tool_calls"][0]
    assert search["id"] == "call_search_1" and search["function"]["name"] == "tool_search"
    assert json.loads(search["function"]["arguments"]) == SEARCH_CALL["arguments"]
    assert messages[2] == {"role": "tool", "tool_call_id": "call_search_1", "content": LISTING}
    response = answer.json()
    assert response["tools"][2] == SEARCH
    items = http.get(f"/v1/responses/{response['id']}/input_items", params={"order": "asc"})
    stored = items.json()["data"]
    assert stored[1] == SEARCH_CALL and stored[2] == SEARCH_OUTPUT


def test_the_search_function_takes_no_name_of_the_clients(
    sdk: openai.OpenAI, chat_upstream: ChatUpstream
) -> None:
    chat_upstream.reset()
    own = {"type": "function", "name": "tool_search", "parameters": {"type": "object"}}
    response = sdk.responses.create(
        model="chat-searcher",
        tools=[{"type": "tool_search", "execution": "client"}, own],  # type: ignore[list-item]
        input="add a standup",
    )
    offered = chat_upstream.requests[-1]["tools"]
    assert [tool["function"]["name"] for tool in offered] == ["tool_search_2", "tool_search"]
    assert offered[0]["function"]["parameters"]["required"] == ["query"]  # the default schema
    call = response.output[-1].model_dump()
    assert call["type"] == "tool_search_call" and call["arguments"] == {"query": "calendar"}


def test_tool_choice_treats_a_client_search_as_a_function(
    sdk: openai.OpenAI, chat_upstream: ChatUpstream
) -> None:
    chat_upstream.reset()
    required = sdk.responses.create(
        model="chat-searcher",
        tools=[SEARCH],  # type: ignore[list-item]
        tool_choice="required",
        input="add a standup",
    )
    assert required.output[-1].type == "tool_search_call"
    forced = sdk.responses.create(
        model="chat-tools",
        tools=[SEARCH, EXEC],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "exec_command"},
        input="run it",
    )
    assert [tool["function"]["name"] for tool in chat_upstream.requests[-1]["tools"]] == [
        "exec_command"
    ]
    assert forced.output[-1].type == "function_call"
    # Two calls of the search, cut to one by either setting.
    for limit in ({"max_tool_calls": 1}, {"parallel_tool_calls": False}):
        one = sdk.responses.create(
            model="chat-parallel",
            tools=[SEARCH],  # type: ignore[list-item]
            input="add a standup",
            **limit,  # type: ignore[arg-type]
        )
        assert [item.type for item in one.output] == ["tool_search_call"]


@pytest.mark.parametrize("model", ["chat-searcher", "claude-searcher"])
@pytest.mark.parametrize("stored", [True, False], ids=["chained", "replayed"])
def test_codexs_loop_with_a_client_search_on_an_upstream_without_tool_search(
    sdk: openai.OpenAI, http: httpx.Client, model: str, stored: bool
) -> None:
    # 1. Only the search is declared: the model calls it, and the response ends there.
    question = {"role": "user", "content": "add a standup to my calendar"}
    body = {"model": model, "tools": [SEARCH], "input": [question], "store": stored}
    events = sse_events(http, body)
    first = events[-1]["response"]
    searched = first["output"][-1]
    assert searched["type"] == "tool_search_call"
    assert searched["execution"] == "client" and searched["status"] == "completed"
    assert list(searched["arguments"]) == ["query"]  # the object the model's JSON held
    assert first["status"] == "completed"
    # OpenAI streams nothing of a search's own between its added and done events.
    item_events = [event["type"] for event in events if event.get("item_id") == searched["id"]]
    assert item_events == []
    assert [
        event["type"] for event in events if event.get("item", {}).get("id") == searched["id"]
    ] == ["response.output_item.added", "response.output_item.done"]
    # 2. The client ran the search: the tools it loaded are offered, and the model calls one,
    # which comes back as the client named it.
    loaded = {
        "type": "tool_search_output",
        "call_id": searched["call_id"],
        "execution": "client",
        "status": "completed",
        "tools": [CALENDAR],
    }
    context: list[Any] = [question, searched] if not stored else []
    more = {"previous_response_id": first["id"]} if stored else {"store": False}
    second = sdk.responses.create(
        model=model,
        tools=[SEARCH],  # type: ignore[list-item]
        input=[*context, loaded],
        **more,  # type: ignore[arg-type]
    )
    call = second.output[-1].model_dump(exclude_none=True)
    assert_valid_item(call)
    assert (call["type"], call["namespace"], call["name"]) == (
        "function_call",
        "mcp__calendar__",
        "create_event",
    )
    # 3. The tool's output: the model says what it gave.
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "created"}
    if stored:
        context, more = [], {"previous_response_id": second.id}
    else:
        context = [*context, loaded, call]
    third = sdk.responses.create(
        model=model,
        tools=[SEARCH],  # type: ignore[list-item]
        input=[*context, output],
        **more,  # type: ignore[arg-type]
    )
    assert third.output_text == "The tool said: created"


def test_anthropic_gets_a_client_search_as_tool_use_and_tool_result(
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
    assert names == [
        "exec_command",
        "mcp__docs____lookup",
        "tool_search",
        "mcp__calendar____create_event",
    ]
    messages = sent["messages"]
    blocks = [[block["type"] for block in message["content"]] for message in messages]
    assert blocks == [["text"], ["tool_use"], ["tool_result"], ["tool_use"], ["tool_result"]]
    assert messages[1]["content"][0] == {
        "type": "tool_use",
        "id": "call_search_1",
        "name": "tool_search",
        "input": SEARCH_CALL["arguments"],
    }
    assert messages[2]["content"][0]["content"] == LISTING


def test_anthropic_gets_the_transcript_without_a_server_search(
    sdk: openai.OpenAI, anthropic_upstream: AnthropicUpstream
) -> None:
    anthropic_upstream.reset()
    response = sdk.responses.create(
        model="claude-tools",
        tools=SERVER_TOOLS,  # type: ignore[arg-type]
        input=SERVER_TRANSCRIPT,  # type: ignore[arg-type]
    )
    assert response.status == "completed"
    sent = anthropic_upstream.requests[-1]
    names = [tool["name"] for tool in sent["tools"]]
    assert names == ["exec_command", "mcp__docs____lookup", "mcp__calendar____create_event"]
    blocks = [[block["type"] for block in message["content"]] for message in sent["messages"]]
    assert blocks == [["text"], ["tool_use"], ["tool_result"]]


@pytest.mark.parametrize(
    ("tools", "transcript", "offered", "sent_items"),
    [
        (
            SERVER_TOOLS,
            SERVER_TRANSCRIPT,
            ["exec_command", "mcp__docs____lookup", "mcp__calendar____create_event"],
            ["message", "function_call", "function_call_output"],
        ),
        (
            TOOLS,
            TRANSCRIPT,
            [
                "exec_command",
                "mcp__docs____lookup",
                "tool_search",
                "mcp__calendar____create_event",
            ],
            ["message", *["function_call", "function_call_output"] * 2],
        ),
    ],
    ids=["server", "client"],
)
def test_a_responses_upstream_without_tool_search_gets_a_client_search_as_a_function(
    http: httpx.Client,
    responses_upstream: ResponsesUpstream,
    tools: list[dict[str, Any]],
    transcript: list[dict[str, Any]],
    offered: list[str],
    sent_items: list[str],
) -> None:
    # The mock refuses deferred tools and search items without the search tool, as their
    # meaning depends on it.
    responses_upstream.reset()
    answer = http.post(
        "/v1/responses", json={"model": "rsp-plain", "tools": tools, "input": transcript}
    )
    assert answer.status_code == 200, answer.text
    sent = responses_upstream.requests[-1]
    assert [tool["name"] for tool in sent["tools"]] == offered
    assert [item["type"] for item in sent["input"]] == sent_items


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
