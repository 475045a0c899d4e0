"""Real agent clients against a real `relay serve` and the loopback chat upstream's `agent`
script (call a tool, then say what it gave): Codex CLI and the OpenAI Agents SDK. Codex runs
with its defaults, over its WebSocket transport, signed in with ChatGPT (when it compresses
its requests), and with its tool search (in front of the Responses upstream's `tool_search`
script, which searches, then calls what the search loaded: an MCP server's tool,
tests/mcp_stdio_server.py). The Agents SDK also gives Relay a `HostedMCPTool`, which Relay
runs (a real MCP server on loopback, tests/mcp_servers.py), with and without approvals.

`make clients` installs the pinned clients (Codex CLI from npm into .clients/, openai-agents
into the venv) and runs these; without them the tests are skipped, saying so (`make test`
does not download a 400 MB CLI).
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from chat_upstream import ChatUpstream
from live_server import ServeProcess, relay_serve
from mcp_servers import McpTestServer
from responses_upstream import ResponsesUpstream

TESTS = Path(__file__).resolve().parent
CODEX = TESTS.parent / ".clients" / "node_modules" / ".bin" / "codex"


@contextmanager
def relay_for_m(workdir: Path, route: dict[str, Any], **env: str) -> Iterator[ServeProcess]:
    """`relay serve` with one model, m, on `route`, logging at debug level (what the tests
    below look for in its log), `env` added; defaults otherwise."""
    settings = {
        "RELAY_DATABASE_URL": f"sqlite:///{workdir}/relay.db",
        "RELAY_ROUTES": orjson.dumps([{"model": "m", **route}]).decode(),
        "RELAY_LOG_LEVEL": "debug",
        **env,
    }
    with relay_serve(settings) as relay:
        yield relay


@contextmanager
def relay_on_the_agent_script(workdir: Path, **env: str) -> Iterator[ServeProcess]:
    with ChatUpstream() as upstream:
        route = {"base_url": upstream.base_url, "upstream_model": "agent"}
        with relay_for_m(workdir, route, **env) as relay:
            yield relay


@pytest.fixture(scope="module")
def agent_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with relay_on_the_agent_script(tmp_path_factory.mktemp("clients")) as relay:
        yield relay


needs_codex = pytest.mark.skipif(
    not CODEX.exists(), reason="Codex CLI not installed: run `make clients`"
)


def codex_exec(
    relay: ServeProcess,
    tmp_path: Path,
    *,
    provider: str | None = "",
    settings: str = "",
    tables: str = "",
    prompt: str = "Run echo relay-ok",
    said: str = "relay-ok",
) -> subprocess.CompletedProcess[str]:
    """`codex exec` told `prompt` (run `echo relay-ok`), with Relay as its model provider
    (`provider` adds lines to that entry; None: Codex's built-in openai provider pointed at
    Relay, `openai_base_url`), `settings` and `tables` added to its config (top-level keys,
    and tables after the provider's), Codex's defaults otherwise (so web_search included,
    which Relay leaves out by default); asserts that Codex ran the tool Relay relayed, sent
    its output back and printed the answer, which has `said` in it."""
    home = tmp_path / "codex-home"
    home.mkdir(exist_ok=True)  # where a test may have put an auth.json
    if provider is None:
        where = f'openai_base_url = "{relay.url}/v1"\n'
    else:
        where = (
            'model_provider = "relay"\n\n[model_providers.relay]\nname = "Relay"\n'
            f'base_url = "{relay.url}/v1"\nwire_api = "responses"\nenv_key = "RELAY_KEY"\n'
            f"{provider}"
        )
    (home / "config.toml").write_text(f'model = "m"\n{settings}{where}\n{tables}')
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", "-s", "read-only", prompt],
        cwd=work,
        env={**os.environ, "CODEX_HOME": str(home), "RELAY_KEY": "unused"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "The tool said:" in done.stdout and said in done.stdout, done.stdout
    return done


def logged(relay: ServeProcess, line: str) -> int:
    """How many times Relay has logged `line` so far (its lines are written every 0.1 s)."""
    time.sleep(0.3)
    return relay.log_so_far().count(line)


@needs_codex
def test_codex_exec_runs_a_tool_through_relay(agent_relay: ServeProcess, tmp_path: Path) -> None:
    codex_exec(agent_relay, tmp_path)


@needs_codex
def test_codex_exec_over_a_websocket(agent_relay: ServeProcess, tmp_path: Path) -> None:
    # Codex's WebSocket transport for a provider: `supports_websockets` on its entry.
    accepted = '"WebSocket /v1/responses" [accepted]'
    before = logged(agent_relay, accepted)
    codex_exec(agent_relay, tmp_path, provider="supports_websockets = true\n")
    assert logged(agent_relay, accepted) > before


def fake_chatgpt_login(home: Path) -> None:
    """A ChatGPT sign-in as Codex keeps it (`$CODEX_HOME/auth.json`), made up: unsigned tokens
    of a fake account, which nothing checks (this Relay has no API keys)."""

    def unsigned(claims: dict[str, Any]) -> str:
        parts = [{"alg": "none", "typ": "JWT"}, claims]
        encoded = [base64.urlsafe_b64encode(orjson.dumps(part)).rstrip(b"=") for part in parts]
        return b".".join([*encoded, b"fake-signature"]).decode()

    account = {"chatgpt_account_id": "acct-fake", "chatgpt_plan_type": "pro"}
    claims = {"exp": int(time.time()) + 86400, "https://api.openai.com/auth": account}
    tokens = {
        "id_token": unsigned({**claims, "email": "codex@example.invalid"}),
        "access_token": unsigned(claims),
        "refresh_token": "fake-refresh-token",
        "account_id": "acct-fake",
    }
    last_refresh = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    auth = {"auth_mode": "chatgpt", "tokens": tokens, "last_refresh": last_refresh}
    home.mkdir()
    (home / "auth.json").write_bytes(orjson.dumps(auth))


@needs_codex
def test_codex_exec_compresses_its_requests(tmp_path: Path) -> None:
    # Codex compresses its request bodies (zstd) with its built-in openai provider, signed in
    # with ChatGPT, over HTTP: its sockets are refused here (a WebSocket takes turns for 1 ns),
    # so it falls back to HTTP. Apps off and the ChatGPT backend on loopback: the fake
    # sign-in goes nowhere else.
    fake_chatgpt_login(tmp_path / "codex-home")
    with relay_on_the_agent_script(tmp_path, RELAY_WEBSOCKET_MAX_AGE_S="1e-9") as relay:
        settings = f'chatgpt_base_url = "{relay.url}/backend-api/"\n'
        tables = "[features]\napps = false\n"
        done = codex_exec(relay, tmp_path, provider=None, settings=settings, tables=tables)
        assert "Falling back from WebSockets to HTTPS transport" in done.stderr, done.stderr
        assert logged(relay, "-encoded") == logged(relay, "zstd-encoded") >= 2  # both turns


@needs_codex
def test_codex_exec_finds_an_mcp_tool_by_tool_search(tmp_path: Path) -> None:
    # Codex offers its MCP servers' tools through tool search when its model catalog says the
    # model supports it (`supports_search_tool`); the upstream searches, then calls the tool
    # the search loaded.
    catalog = {
        "slug": "m",
        "display_name": "m",
        "base_instructions": "You are a coding agent.",
        "shell_type": "unified_exec",
        "supports_search_tool": True,
        "supported_reasoning_levels": [],
        "visibility": "list",
        "supported_in_api": True,
        "priority": 1,
        "support_verbosity": False,
        "truncation_policy": {"mode": "bytes", "limit": 10000},
        "experimental_supported_tools": [],
    }
    (tmp_path / "models.json").write_bytes(orjson.dumps({"models": [catalog]}))
    settings = f'model_catalog_json = "{tmp_path / "models.json"}"\n'
    server = TESTS / "mcp_stdio_server.py"
    tables = f'[mcp_servers.standup]\ncommand = "{sys.executable}"\nargs = ["{server}"]\n'
    route = {"provider": "openai_responses", "upstream_model": "tool_search", "retries": 0}
    with ResponsesUpstream() as upstream:
        route.update(base_url=upstream.base_url, hosted_tools=["tool_search"])
        with relay_for_m(tmp_path, route) as relay:
            codex_exec(
                relay,
                tmp_path,
                settings=settings,
                tables=tables,
                prompt="Add a standup note",
                said="noted: standup",
            )
    first, *_, last = upstream.requests
    # Codex's search passed through; the MCP tool deferred, offered once the search loaded it,
    # then called.
    assert "tool_search" in [tool["type"] for tool in first["tools"]]
    assert "mcp__standup__standup_note" not in [tool.get("name") for tool in first["tools"]]
    search, loaded, call, output = last["input"][-4:]
    assert (search["type"], search["execution"]) == ("tool_search_call", "client")
    assert loaded["type"] == "tool_search_output"
    assert [(tool["name"], tool["defer_loading"]) for tool in loaded["tools"]] == [
        ("mcp__standup__standup_note", True)
    ]
    assert (call["type"], call["name"]) == ("function_call", "mcp__standup__standup_note")
    assert output["type"] == "function_call_output" and "noted: standup" in str(output["output"])


def test_the_agents_sdk_runs_a_function_tool_through_relay(agent_relay: ServeProcess) -> None:
    agents = pytest.importorskip("agents", reason="openai-agents not installed: `make clients`")
    from openai import AsyncOpenAI

    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    async def run() -> str:
        async with AsyncOpenAI(base_url=f"{agent_relay.url}/v1", api_key="unused") as client:
            model = agents.OpenAIResponsesModel(model="m", openai_client=client)
            agent = agents.Agent(
                name="weather", instructions="Use the tool.", tools=[get_weather], model=model
            )
            result = await agents.Runner.run(agent, "Weather in Paris?")
            return str(result.final_output)

    agents.set_tracing_disabled(True)
    final_output = asyncio.run(run())
    assert calls == ["Paris"]
    assert final_output == "The tool said: sunny in Paris"


@pytest.fixture(scope="module")
def mcp_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, str]]:
    """`relay serve` whose model m calls what it is asked to (the chat upstream's `directed`
    script), allowed to reach a real MCP server on loopback; yields it and the server's URL."""
    workdir = tmp_path_factory.mktemp("hosted-mcp")
    with McpTestServer("streamable") as server, ChatUpstream() as upstream:
        route = {"base_url": upstream.base_url, "upstream_model": "directed"}
        tools = {
            "mcp": {"allowed_servers": [server.base_url + "/"], "private_networks": ["127.0.0.0/8"]}
        }
        with relay_for_m(workdir, route, RELAY_TOOLS=orjson.dumps(tools).decode()) as relay:
            yield relay, server.url


@pytest.mark.parametrize("approval", ["never", "always"])
def test_the_agents_sdk_hosted_mcp_tool_runs_on_relay(
    mcp_relay: tuple[ServeProcess, str], approval: str
) -> None:
    agents = pytest.importorskip("agents", reason="openai-agents not installed: `make clients`")
    from openai import AsyncOpenAI

    relay, server_url = mcp_relay
    asked: list[str] = []

    def approve(request: Any) -> Any:
        asked.append(request.data.name)
        return {"approve": True}

    tool = agents.HostedMCPTool(
        tool_config={
            "type": "mcp",
            "server_label": "demo",
            "server_url": server_url,
            "require_approval": approval,
        },
        on_approval_request=approve if approval == "always" else None,
    )

    async def run() -> str:
        async with AsyncOpenAI(base_url=f"{relay.url}/v1", api_key="unused") as client:
            model = agents.OpenAIResponsesModel(model="m", openai_client=client)
            agent = agents.Agent(name="calculator", tools=[tool], model=model)
            result = await agents.Runner.run(agent, 'call demo__add {"a": 19, "b": 23}')
            return str(result.final_output)

    agents.set_tracing_disabled(True)
    assert asyncio.run(run()) == "Tools said: 42"
    assert asked == (["add"] if approval == "always" else [])


def test_the_agents_sdk_context_management_setting_compacts_on_relay(
    agent_relay: ServeProcess,
) -> None:
    agents = pytest.importorskip("agents", reason="openai-agents not installed: `make clients`")
    from openai import AsyncOpenAI

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    settings = agents.ModelSettings(
        context_management=[{"type": "compaction", "compact_threshold": 1000}]
    )
    # An earlier conversation of about 2,000 tokens: past the threshold, so Relay compacts it.
    earlier: list[Any] = []
    for number in range(8):
        earlier.append({"role": "user", "content": f"Note {number}: " + "context " * 120})
        earlier.append({"role": "assistant", "content": f"Noted {number}."})

    async def run() -> Any:
        async with AsyncOpenAI(base_url=f"{agent_relay.url}/v1", api_key="unused") as client:
            model = agents.OpenAIResponsesModel(model="m", openai_client=client)
            agent = agents.Agent(
                name="weather", tools=[get_weather], model=model, model_settings=settings
            )
            return await agents.Runner.run(agent, [*earlier, {"role": "user", "content": "Paris?"}])

    agents.set_tracing_disabled(True)
    result = asyncio.run(run())
    assert result.final_output == "The tool said: sunny in Paris"
    kinds = [item.raw_item.type for item in result.new_items if hasattr(item.raw_item, "type")]
    first = result.raw_responses[0].output[0]
    assert first.type == "compaction", kinds
