"""Server-side tools through a chat upstream: remote MCP servers (real ones, built with the MCP
SDK, over streamable HTTP and HTTP+SSE) and web search (a fake SearXNG), run by Relay's tool
loop for a model that only knows functions. Every answer and stream is validated (the Open
Responses contract, and the openai SDK's types for the MCP and web search shapes)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
import sqlalchemy
from anthropic_upstream import ANTHROPIC_KEY, AnthropicUpstream
from chat_upstream import UPSTREAM_KEY, ChatUpstream
from conformance import INPUT_ITEMS, assert_valid_item
from cryptography.fernet import Fernet
from db_fixtures import PgServer
from fake_search import FakeSearxng, Page
from live_server import relay_server
from mcp_servers import McpTestServer
from relay_fixtures import (
    checked_client,
    logged_responses,
    relay_on_sqlite,
    sdk_client,
    sse_events,
)

from relay.config import RouteConfig, Settings
from relay.engine import server_tools
from relay.sealing import Sealer
from relay.storage import tables

KEY_ENV = "RELAY_TEST_SERVER_TOOLS_KEY"
CLAUDE_KEY_ENV = "RELAY_TEST_SERVER_TOOLS_CLAUDE_KEY"
SECRET = "mcp-secret-7Qm2xV9pK4rT8wZ3"
HEADER_SECRET = "hdr-secret-5Bn8Lq1Wv6Xc"


@pytest.fixture(scope="module")
def tools_url(
    chat_upstream: ChatUpstream,
    anthropic_upstream: AnthropicUpstream,
    searxng_server: FakeSearxng,
    _mcp_streamable_server: McpTestServer,
    _mcp_sse_server: McpTestServer,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Iterator[str]:
    monkeypatch_module.setenv(KEY_ENV, UPSTREAM_KEY)
    monkeypatch_module.setenv(CLAUDE_KEY_ENV, ANTHROPIC_KEY)
    chat = {"base_url": chat_upstream.base_url, "api_key_env": KEY_ENV, "retries": 0}
    claude = {
        "provider": "anthropic",
        "base_url": anthropic_upstream.base_url,
        "api_key_env": CLAUDE_KEY_ENV,
        "retries": 0,
    }
    routes = [
        {"model": "directed", **chat, "upstream_model": "directed"},
        {"model": "insistent", **chat, "upstream_model": "insistent"},
        {"model": "claude-tools", **claude, "upstream_model": "tools"},
        {"model": "claude-thinking", **claude, "upstream_model": "thinking"},
        # The embedded model, loaded when first asked.
        {"model": "local", "provider": "llama_cpp", "load": "first_use"},
    ]
    tools = {
        "max_steps": 4,
        "mcp": {
            "allowed_servers": [
                f"127.0.0.1:{_mcp_streamable_server.port}",
                f"{_mcp_sse_server.base_url}/",
            ],
            "private_networks": ["127.0.0.0/8"],
            "call_timeout_s": 20,
            "price_per_call_usd": 0.01,
        },
        "web_search": {"backend": "searxng", "url": searxng_server.base_url},
    }
    with relay_on_sqlite(tmp_path_factory, "server-tools", routes, tools=tools) as url:
        yield url


@pytest.fixture
def http(tools_url: str) -> Iterator[httpx.Client]:
    with checked_client(tools_url) as client:
        yield client


@pytest.fixture
def sdk(tools_url: str) -> Iterator[openai.OpenAI]:
    with sdk_client(tools_url) as client:
        yield client


def directed_route(upstream: ChatUpstream) -> dict[str, Any]:
    """The model "directed" on the chat upstream (its key in KEY_ENV)."""
    return {
        "model": "directed",
        "base_url": upstream.base_url,
        "api_key_env": KEY_ENV,
        "upstream_model": "directed",
    }


def mcp_tool(server: McpTestServer, **more: Any) -> dict[str, Any]:
    return {
        "type": "mcp",
        "server_label": "demo",
        "server_url": server.url,
        "require_approval": "never",
        **more,
    }


def ask(http: httpx.Client, prompt: str, tools: list[dict[str, Any]], **more: Any) -> Any:
    answer = http.post(
        "/v1/responses", json={"model": "directed", "input": prompt, "tools": tools, **more}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    for item in body["output"]:
        assert_valid_item(item)
    return body


def types(response: dict[str, Any]) -> list[str]:
    return [item["type"] for item in response["output"]]


@pytest.mark.parametrize("transport", ["streamable", "sse"])
def test_a_model_calls_an_mcp_tool_and_answers_with_its_output(
    http: httpx.Client,
    chat_upstream: ChatUpstream,
    transport: str,
    request: pytest.FixtureRequest,
) -> None:
    server: McpTestServer = request.getfixturevalue(f"mcp_{transport}")
    chat_upstream.reset()
    body = ask(http, 'call demo__add {"a": 2, "b": 3}', [mcp_tool(server)])
    assert body["status"] == "completed"
    assert types(body) == ["mcp_list_tools", "mcp_call", "message"]
    listed, call, _message = body["output"]
    assert listed["server_label"] == "demo"
    assert {tool["name"] for tool in listed["tools"]} >= {"add", "echo", "fail", "slow"}
    add = next(tool for tool in listed["tools"] if tool["name"] == "add")
    assert add["input_schema"]["properties"].keys() == {"a", "b"}
    assert call["name"] == "add" and call["server_label"] == "demo"
    assert orjson.loads(call["arguments"]) == {"a": 2, "b": 3}
    assert call["output"] == "5" and call["status"] == "completed"
    assert body["output_text"] == "Tools said: 5"
    # Two model turns: the second read the call and its output as a function's.
    first, second = chat_upstream.requests
    offered = {tool["function"]["name"] for tool in first["tools"]}
    assert {"demo__add", "demo__echo"} <= offered
    tool_message = second["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["content"] == "5"
    # Usage is both turns'.
    usage = body["usage"]
    assert usage["input_tokens"] > 0 and usage["total_tokens"] == (
        usage["input_tokens"] + usage["output_tokens"]
    )
    # The echoed tool has no secrets and the response is stored as answered.
    stored = http.get(f"/v1/responses/{body['id']}").json()
    assert stored["output"] == body["output"]


def test_the_stream_tells_each_step(http: httpx.Client, mcp_streamable: McpTestServer) -> None:
    body = {
        "model": "directed",
        "input": 'call demo__echo {"text": "hi there"}',
        "tools": [mcp_tool(mcp_streamable)],
    }
    events = sse_events(http, body)
    kinds = [event["type"] for event in events]
    call_kinds = [kind for kind in kinds if "mcp" in kind]
    assert call_kinds == [
        "response.mcp_list_tools.in_progress",
        "response.mcp_list_tools.completed",
        "response.mcp_call.in_progress",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.mcp_call.completed",
    ]
    final = events[-1]["response"]
    assert final["output_text"] == "Tools said: hi there"


def test_a_tool_error_reaches_the_model_and_the_item(
    http: httpx.Client, mcp_streamable: McpTestServer
) -> None:
    body = ask(http, 'call demo__fail {"message": "disk full"}', [mcp_tool(mcp_streamable)])
    call = body["output"][1]
    assert (call["status"] == "failed" and "output" not in call) or call.get("output") is None
    assert call["error"]["type"] == "mcp_tool_execution_error"
    assert "disk full" in orjson.dumps(call["error"]).decode()
    assert body["output_text"].startswith("Tools said: The tool failed")
    assert "disk full" in body["output_text"]


def test_parallel_calls_run_at_once(http: httpx.Client, mcp_streamable: McpTestServer) -> None:
    prompt = 'call demo__slow {"seconds": 0.6}\ncall demo__slow {"seconds": 0.6}'
    started = time.monotonic()
    body = ask(http, prompt, [mcp_tool(mcp_streamable)])
    assert time.monotonic() - started < 1.1
    assert types(body) == ["mcp_list_tools", "mcp_call", "mcp_call", "message"]
    assert body["output_text"] == "Tools said: slept ; slept"


def test_allowed_tools_limit_what_is_listed_and_offered(
    http: httpx.Client, chat_upstream: ChatUpstream, mcp_streamable: McpTestServer
) -> None:
    chat_upstream.reset()
    tool = mcp_tool(mcp_streamable, allowed_tools=["echo"])
    body = ask(http, 'call demo__echo {"text": "only"}', [tool])
    assert [tool["name"] for tool in body["output"][0]["tools"]] == ["echo"]
    offered = [tool["function"]["name"] for tool in chat_upstream.requests[0]["tools"]]
    assert offered == ["demo__echo"]
    read_only = mcp_tool(mcp_streamable, allowed_tools={"read_only": True})
    body = ask(http, "hello", [read_only])
    assert [tool["name"] for tool in body["output"][0]["tools"]] == ["echo"]


def test_a_client_function_in_the_same_turn_ends_the_response(
    http: httpx.Client, chat_upstream: ChatUpstream, mcp_streamable: McpTestServer
) -> None:
    weather = {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    chat_upstream.reset()
    prompt = 'call demo__add {"a": 1, "b": 1}\ncall get_weather {"city": "Paris"}'
    body = ask(http, prompt, [mcp_tool(mcp_streamable), weather])
    assert types(body) == ["mcp_list_tools", "mcp_call", "function_call"]
    assert body["output"][1]["output"] == "2"
    assert len(chat_upstream.requests) == 1  # no second turn: the client has a call to run
    call = body["output"][2]
    # The client answers; the chain goes on without listing the tools again.
    mcp_streamable.state.reset()
    answer = {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}
    follow = ask(http, [answer], [mcp_tool(mcp_streamable)], previous_response_id=body["id"])  # type: ignore[arg-type]
    assert types(follow) == ["message"]
    assert follow["output_text"] == "Tools said: sunny"
    assert mcp_streamable.state.requests == []


def test_approval_round_trip(http: httpx.Client, mcp_streamable: McpTestServer) -> None:
    tool = mcp_tool(mcp_streamable, require_approval={"never": {"tool_names": ["echo"]}})
    body = ask(http, 'call demo__add {"a": 20, "b": 22}', [tool])
    assert body["status"] == "completed"
    assert types(body) == ["mcp_list_tools", "mcp_approval_request"]
    request = body["output"][1]
    assert request["name"] == "add" and orjson.loads(request["arguments"]) == {"a": 20, "b": 22}
    approval = {
        "type": "mcp_approval_response",
        "approval_request_id": request["id"],
        "approve": True,
    }
    INPUT_ITEMS["mcp_approval_response"].validate_python(approval)
    approved = ask(http, [approval], [tool], previous_response_id=body["id"])  # type: ignore[arg-type]
    assert types(approved) == ["mcp_call", "message"]
    call = approved["output"][0]
    assert call["approval_request_id"] == request["id"] and call["output"] == "42"
    assert approved["output_text"] == "Tools said: 42"
    # Declined: nothing runs; the model hears it was declined.
    body = ask(http, 'call demo__add {"a": 1, "b": 2}', [tool])
    declined = {
        "type": "mcp_approval_response",
        "approval_request_id": body["output"][1]["id"],
        "approve": False,
    }
    answer = ask(http, [declined], [tool], previous_response_id=body["id"])  # type: ignore[arg-type]
    assert types(answer) == ["message"]
    assert "declined" in answer["output_text"]


def test_an_approval_for_nothing_is_a_400(
    http: httpx.Client, mcp_streamable: McpTestServer
) -> None:
    approval = {
        "type": "mcp_approval_response",
        "approval_request_id": "mcpr_nope",
        "approve": True,
    }
    answer = http.post(
        "/v1/responses",
        json={"model": "directed", "input": [approval], "tools": [mcp_tool(mcp_streamable)]},
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "input[0].approval_request_id"


def test_the_loop_stops_at_max_tool_calls(
    http: httpx.Client, mcp_streamable: McpTestServer
) -> None:
    tool = mcp_tool(mcp_streamable, allowed_tools=["echo"])
    answer = http.post(
        "/v1/responses",
        json={"model": "insistent", "input": "go", "tools": [tool], "max_tool_calls": 2},
    )
    body = answer.json()
    assert types(body) == ["mcp_list_tools", "mcp_call", "mcp_call", "message"]
    assert body["output_text"] == "Out of tools."


def test_the_loop_stops_at_max_steps(http: httpx.Client, mcp_streamable: McpTestServer) -> None:
    tool = mcp_tool(mcp_streamable, allowed_tools=["echo"])
    body = http.post(
        "/v1/responses", json={"model": "insistent", "input": "go", "tools": [tool]}
    ).json()
    # max_steps = 4: three turns call, the fourth is offered nothing and answers.
    assert types(body) == ["mcp_list_tools", *["mcp_call"] * 3, "message"]


def test_cancel_mid_call_stops_the_call(tools_url: str, mcp_streamable: McpTestServer) -> None:
    body = {
        "model": "directed",
        "input": 'call demo__slow {"seconds": 30}',
        "tools": [mcp_tool(mcp_streamable)],
        "stream": True,
    }
    with (
        httpx.Client(base_url=tools_url, timeout=30) as client,
        client.stream("POST", "/v1/responses", json=body) as answer,
    ):
        for line in answer.iter_lines():
            if "response.mcp_call_arguments.done" in line:
                break
        mcp_streamable.state.wait_for(lambda: mcp_streamable.state.slow_started == 1)
    mcp_streamable.state.wait_for(lambda: mcp_streamable.state.slow_cancelled == 1, timeout=10)
    assert mcp_streamable.state.slow_finished == 0


def test_secrets_reach_the_server_and_nothing_else(
    http: httpx.Client, mcp_streamable: McpTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    tool = mcp_tool(mcp_streamable, authorization=SECRET, headers={"X-Team-Key": HEADER_SECRET})
    with caplog.at_level(logging.DEBUG):
        body = ask(http, 'call demo__add {"a": 1, "b": 2}', [tool])
        assert body["output"][1]["output"] == "3"
        assert f"Bearer {SECRET}" in mcp_streamable.state.header_values("authorization")
        assert HEADER_SECRET in mcp_streamable.state.header_values("x-team-key")
        stored = http.get(f"/v1/responses/{body['id']}").text
        items = http.get(f"/v1/responses/{body['id']}/input_items").text
        broken = {**tool, "server_url": mcp_streamable.base_url + "/nowhere"}
        failed = http.post(
            "/v1/responses", json={"model": "directed", "input": "hi", "tools": [broken]}
        )
    assert failed.status_code == 424, failed.text
    assert "demo" in failed.json()["error"]["message"]
    everything = [orjson.dumps(body).decode(), stored, items, failed.text, caplog.text]
    for secret in (SECRET, HEADER_SECRET):
        assert not any(secret in text for text in everything)
    echoed = body["tools"][0]
    assert "authorization" not in echoed and "headers" not in echoed


def test_servers_the_operator_did_not_allow_are_refused(
    http: httpx.Client, mcp_streamable: McpTestServer
) -> None:
    for url in ("http://localhost:9/mcp", "http://169.254.169.254/mcp", "http://10.0.0.1/mcp"):
        tool = {"type": "mcp", "server_label": "x", "server_url": url}
        answer = http.post(
            "/v1/responses", json={"model": "directed", "input": "hi", "tools": [tool]}
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "mcp_server_not_allowed"


def test_a_stored_chain_goes_on_over_a_websocket(
    sdk: openai.OpenAI, mcp_streamable: McpTestServer
) -> None:
    tool = mcp_tool(mcp_streamable)
    first = sdk.responses.create(
        model="directed",
        input='call demo__add {"a": 4, "b": 4}',
        tools=[tool],  # type: ignore[list-item]
    )
    assert first.output_text == "Tools said: 8"
    mcp_streamable.state.reset()
    with sdk.responses.connect() as connection:
        connection.response.create(
            model="directed",
            input='call demo__echo {"text": "again"}',
            tools=[tool],  # type: ignore[list-item]
            previous_response_id=first.id,
        )
        kinds = []
        for event in connection:
            kinds.append(event.type)
            if event.type == "response.completed":
                final = event.response
                break
    assert "response.mcp_list_tools.in_progress" not in kinds  # listed once per chain
    assert [item.type for item in final.output] == ["mcp_call", "message"]
    assert final.output_text == "Tools said: again"


# Web search -----------------------------------------------------------------------------------

PAGES = [
    Page("Relay docs", "https://relay.example/docs", "Relay serves the Responses API."),
    Page("Relay blog", "https://blog.example/relay", "Why we built Relay."),
]


def test_web_search_runs_through_searxng(
    http: httpx.Client, fake_searxng: FakeSearxng, chat_upstream: ChatUpstream
) -> None:
    fake_searxng.pages = PAGES
    chat_upstream.reset()
    body = {
        "model": "directed",
        "input": 'call web_search {"query": "relay responses"}',
        "tools": [{"type": "web_search"}],
        "include": ["web_search_call.action.sources"],
    }
    events = sse_events(http, body)
    kinds = [event["type"] for event in events if "web_search" in event["type"]]
    assert kinds == [
        "response.web_search_call.in_progress",
        "response.web_search_call.searching",
        "response.web_search_call.completed",
    ]
    final = events[-1]["response"]
    search = final["output"][0]
    assert search["type"] == "web_search_call" and search["status"] == "completed"
    assert search["action"]["query"] == "relay responses"
    assert [source["url"] for source in search["action"]["sources"]] == [
        "https://relay.example/docs",
        "https://blog.example/relay",
    ]
    assert fake_searxng.requests[-1]["q"] == "relay responses"
    # The model read the results, and the answer cites what it names.
    results = chat_upstream.requests[-1]["messages"][-1]["content"]
    assert "https://relay.example/docs" in results
    message = final["output"][-1]
    annotations = message["content"][0]["annotations"]
    text = message["content"][0]["text"]
    assert annotations, text
    for note in annotations:
        assert note["type"] == "url_citation"
        assert text[note["start_index"] : note["end_index"]] == note["url"]
        assert note["title"] in {"Relay docs", "Relay blog"}


def test_sources_only_when_included(http: httpx.Client, fake_searxng: FakeSearxng) -> None:
    fake_searxng.pages = PAGES
    body = ask(http, 'call web_search {"query": "relay"}', [{"type": "web_search_preview"}])
    assert "sources" not in body["output"][0]["action"]


def test_the_web_plugin_searches_the_same_way(
    http: httpx.Client, fake_searxng: FakeSearxng, chat_upstream: ChatUpstream
) -> None:
    fake_searxng.pages = PAGES
    chat_upstream.reset()
    plugin = {"id": "web", "max_results": 1, "search_prompt": "Use these results:"}
    body = ask(http, 'call web_search {"query": "relay"}', [], plugins=[plugin])
    assert types(body) == ["web_search_call", "message"]
    assert body["output"][0]["action"]["query"] == "relay"
    results = chat_upstream.requests[-1]["messages"][-1]["content"]
    assert results.startswith("Use these results:")
    assert "[1]" in results and "[2]" not in results  # max_results
    offered = [tool["function"]["name"] for tool in chat_upstream.requests[0]["tools"]]
    assert offered == ["web_search"]
    assert "plugins" not in chat_upstream.requests[0]  # Relay ran it: not forwarded


# Other providers: they see functions only, so the loop is theirs too. ------------------------


@pytest.mark.parametrize("model", ["claude-tools", "claude-thinking"])
def test_the_anthropic_provider_runs_the_loop(
    http: httpx.Client,
    anthropic_upstream: AnthropicUpstream,
    mcp_streamable: McpTestServer,
    model: str,
) -> None:
    anthropic_upstream.reset()
    tool = mcp_tool(mcp_streamable, allowed_tools=["echo"])
    thinking = {"reasoning": {"effort": "low"}} if model == "claude-thinking" else {}
    body = http.post(
        "/v1/responses", json={"model": model, "input": "hi", "tools": [tool], **thinking}
    ).json()
    assert body["status"] == "completed", body
    kinds = [kind for kind in types(body) if kind != "reasoning"]
    assert kinds == ["mcp_list_tools", "mcp_call", "message"]
    call = next(item for item in body["output"] if item["type"] == "mcp_call")
    assert call["name"] == "echo" and call["output"] == orjson.loads(call["arguments"])["text"]
    assert body["output_text"] == f"The tool said: {call['output']}"
    for item in body["output"]:
        assert_valid_item(item)
    # The second turn gave the tool's result back as a tool_result (and, thinking, the
    # signed thinking block with it).
    second = anthropic_upstream.requests[-1]
    results = [
        block for block in second["messages"][-1]["content"] if block["type"] == "tool_result"
    ]
    assert len(results) == 1
    if model == "claude-thinking":
        assistant = second["messages"][-2]["content"]
        assert assistant[0]["type"] == "thinking" and assistant[0]["signature"]


def test_the_embedded_model_runs_the_loop(
    http: httpx.Client, mcp_streamable: McpTestServer
) -> None:
    tool = mcp_tool(mcp_streamable, allowed_tools=["add"])
    answer = http.post(
        "/v1/responses",
        json={
            "model": "local",
            "input": "What is 2 plus 3? Use the add tool.",
            "tools": [tool],
            "tool_choice": "required",
            "max_output_tokens": 60,
            "seed": 1,
        },
        timeout=120,
    )
    body = answer.json()
    assert answer.status_code == 200, body
    calls = [item for item in body["output"] if item["type"] == "mcp_call"]
    assert calls, body["output"]
    first = calls[0]
    arguments = orjson.loads(first["arguments"])
    # The grammar held the model to the tool's schema; the server added what it asked.
    assert first["status"] == "completed"
    assert first["output"] == str(arguments["a"] + arguments["b"])
    assert body["status"] in ("completed", "incomplete")
    assert body["usage"]["output_tokens"] > 0


def test_a_failed_search_is_told_to_the_model(
    http: httpx.Client, fake_searxng: FakeSearxng
) -> None:
    fake_searxng.fail(500)
    body = ask(http, 'call web_search {"query": "relay"}', [{"type": "web_search"}])
    assert body["status"] == "completed"
    assert body["output"][0]["status"] == "failed"
    assert body["output_text"].startswith("Tools said: The search failed")


def test_tool_calls_are_counted_and_priced(
    http: httpx.Client,
    tools_url: str,
    mcp_streamable: McpTestServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def cost() -> float:
        text = httpx.get(f"{tools_url}/metrics").text
        return sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith("relay_cost_usd_total{") and 'model="directed"' in line
        )

    before = cost()
    with caplog.at_level(logging.INFO, logger="relay.access"):
        body = ask(
            http,
            'call demo__add {"a": 1, "b": 1}\ncall demo__add {"a": 2, "b": 2}',
            [mcp_tool(mcp_streamable)],
        )
    assert cost() - before == pytest.approx(0.02)  # two calls at 0.01, tokens unpriced
    metrics = httpx.get(f"{tools_url}/metrics").text
    assert 'relay_tool_calls_total{kind="mcp_call",outcome="completed"}' in metrics
    assert 'relay_tool_call_duration_seconds_count{kind="mcp_call"}' in metrics
    # The request's access line tells of them (written once its last byte is sent).
    deadline = time.monotonic() + 5
    while not (
        lines := [f for f in logged_responses(caplog.records) if f["response_id"] == body["id"]]
    ):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert lines[0]["tool_calls"] == 2


def test_store_false_and_conversations_work_with_the_loop(
    http: httpx.Client, mcp_streamable: McpTestServer
) -> None:
    tool = mcp_tool(mcp_streamable)
    unstored = ask(http, 'call demo__add {"a": 5, "b": 5}', [tool], store=False)
    assert unstored["output_text"] == "Tools said: 10"
    assert http.get(f"/v1/responses/{unstored['id']}").status_code == 404
    conversation = http.post("/v1/conversations", json={}).json()["id"]
    first = ask(http, 'call demo__add {"a": 1, "b": 6}', [tool], conversation=conversation)
    assert first["output_text"] == "Tools said: 7"
    mcp_streamable.state.reset()
    second = ask(http, 'call demo__echo {"text": "later"}', [tool], conversation=conversation)
    assert types(second) == ["mcp_call", "message"]  # the tools listed in the first turn
    items = http.get(f"/v1/conversations/{conversation}/items", params={"limit": 100}).json()
    kinds = [item["type"] for item in items["data"]]
    assert kinds.count("mcp_call") == 2 and kinds.count("mcp_list_tools") == 1


def test_the_deadline_ends_the_response_incomplete(
    tmp_path_factory: pytest.TempPathFactory,
    chat_upstream: ChatUpstream,
    mcp_streamable: McpTestServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)
    route = directed_route(chat_upstream)
    tools = {
        "deadline_s": 1,
        "mcp": {
            "allowed_servers": [mcp_streamable.base_url + "/"],
            "private_networks": ["127.0.0.0/8"],
        },
    }
    with (
        relay_on_sqlite(tmp_path_factory, "deadline", [route], tools=tools) as url,
        checked_client(url) as client,
    ):
        started = time.monotonic()
        body = ask(client, 'call demo__slow {"seconds": 5}', [mcp_tool(mcp_streamable)])
        assert time.monotonic() - started < 4
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_generation_time"}
    call = body["output"][1]
    assert call["status"] == "failed" and call["error"]["code"] == 504
    mcp_streamable.state.wait_for(lambda: mcp_streamable.state.slow_cancelled == 1)


# Background runs on PostgreSQL: the job queue stores the request, secrets sealed. ------------


@pytest.fixture(scope="module")
def queued_db(pg_server: PgServer) -> Iterator[str]:
    """A database of its own: on the session's, other Relays' job workers would take its
    background runs (without this module's tool settings)."""
    name = pg_server.create_database()
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture(scope="module")
def queued_url(
    queued_db: str,
    chat_upstream: ChatUpstream,
    _mcp_streamable_server: McpTestServer,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Iterator[str]:
    monkeypatch_module.setenv(KEY_ENV, UPSTREAM_KEY)
    tools = {
        "mcp": {
            "allowed_servers": [_mcp_streamable_server.base_url + "/"],
            "private_networks": ["127.0.0.0/8"],
        }
    }
    settings = Settings(
        database_url=queued_db,
        routes=[RouteConfig.model_validate(directed_route(chat_upstream))],
        tools=tools,
        run_poll_s=0.2,
    )
    with relay_server(settings) as url:
        yield url


def _sync_url(postgres_url: str) -> str:
    return postgres_url.replace("postgresql+asyncpg://", "postgresql+psycopg://")


def test_a_background_run_keeps_the_secrets_sealed_and_is_cancelled_mid_call(
    queued_url: str, queued_db: str, mcp_streamable: McpTestServer
) -> None:
    tool = mcp_tool(mcp_streamable, authorization=SECRET, headers={"X-Team-Key": HEADER_SECRET})
    with checked_client(queued_url) as client:
        body = {"model": "directed", "tools": [tool], "background": True}
        done = client.post(
            "/v1/responses", json={**body, "input": 'call demo__add {"a": 3, "b": 4}'}
        ).json()
        slow = client.post(
            "/v1/responses", json={**body, "input": 'call demo__slow {"seconds": 30}'}
        ).json()
        mcp_streamable.state.wait_for(lambda: mcp_streamable.state.slow_started == 1, timeout=15)
        cancelled = client.post(f"/v1/responses/{slow['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        mcp_streamable.state.wait_for(lambda: mcp_streamable.state.slow_cancelled == 1, timeout=15)
        deadline = time.monotonic() + 15
        while (finished := client.get(f"/v1/responses/{done['id']}").json())["status"] in (
            "queued",
            "in_progress",
        ):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert finished["output_text"] == "Tools said: 7"
    # The worker opened the sealed secrets: the server got them.
    assert f"Bearer {SECRET}" in mcp_streamable.state.header_values("authorization")
    # And no table holds them (the queued request, the responses, their items, the events).
    engine = sqlalchemy.create_engine(_sync_url(queued_db))
    try:
        with engine.connect() as connection:
            for table in tables.metadata.sorted_tables:
                rows = connection.execute(sqlalchemy.select(table)).all()
                dumped = repr(rows)
                assert SECRET not in dumped and HEADER_SECRET not in dumped, table.name
    finally:
        engine.dispose()


def test_a_queued_request_holds_its_secrets_sealed() -> None:
    sealer = Sealer([Fernet.generate_key()])
    body = {
        "model": "m",
        "tools": [
            {
                "type": "mcp",
                "server_label": "a",
                "server_url": "https://x/",
                "authorization": SECRET,
            },
            {"type": "mcp", "server_label": "b", "server_url": "https://y/"},
        ],
    }
    sealed = server_tools.seal_secrets(body, sealer, "team")
    assert SECRET not in orjson.dumps(sealed).decode()
    assert sealed["tools"][1] == body["tools"][1]
    assert server_tools.open_secrets(sealed, sealer, "team") == body


@pytest.mark.parametrize(
    ("tool", "param"),
    [
        (
            {
                "type": "mcp",
                "server_label": "x",
                "server_url": "https://m/",
                "allowed_callers": ["programmatic"],
            },
            "tools[0].allowed_callers",
        ),
        ({"type": "web_search", "external_web_access": False}, "tools[0].external_web_access"),
        (
            {"type": "web_search_preview", "search_content_types": ["image"]},
            "tools[0].search_content_types",
        ),
    ],
)
def test_what_relay_cannot_honour_is_refused_not_dropped(
    http: httpx.Client, tool: dict[str, Any], param: str
) -> None:
    answer = http.post("/v1/responses", json={"model": "directed", "input": "hi", "tools": [tool]})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == (param, "unsupported_parameter")
