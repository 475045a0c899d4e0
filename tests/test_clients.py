"""Real agent clients against a real `relay serve` and the loopback chat upstream's `agent`
script (call a tool, then say what it gave): Codex CLI and the OpenAI Agents SDK.

`make clients` installs the pinned clients (Codex CLI from npm into .clients/, openai-agents
into the venv) and runs these; without them the tests are skipped, saying so (`make test`
does not download a 400 MB CLI).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from chat_upstream import ChatUpstream
from live_server import ServeProcess, relay_serve

CODEX = Path(__file__).resolve().parent.parent / ".clients" / "node_modules" / ".bin" / "codex"


@pytest.fixture(scope="module")
def agent_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """`relay serve` with one model, m, on the upstream's agent script; defaults otherwise."""
    workdir = tmp_path_factory.mktemp("clients")
    with ChatUpstream() as upstream:
        route = {"model": "m", "base_url": upstream.base_url, "upstream_model": "agent"}
        env = {
            "RELAY_DATABASE_URL": f"sqlite:///{workdir}/relay.db",
            "RELAY_ROUTES": orjson.dumps([route]).decode(),
            "RELAY_LOG_LEVEL": "debug",  # what the tests below look for in its log
        }
        with relay_serve(env) as relay:
            yield relay


needs_codex = pytest.mark.skipif(
    not CODEX.exists(), reason="Codex CLI not installed: run `make clients`"
)


def codex_exec(relay: ServeProcess, tmp_path: Path, *, provider: str = "") -> str:
    """`codex exec` told to run `echo relay-ok`, with Relay as its model provider (`provider`
    adds lines to that entry) and Codex's defaults otherwise (so web_search included, which
    Relay leaves out by default); asserts that Codex ran the shell tool Relay relayed, sent its
    output back and printed the answer; returns what it printed."""
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        'model = "m"\nmodel_provider = "relay"\n\n[model_providers.relay]\nname = "Relay"\n'
        f'base_url = "{relay.url}/v1"\nwire_api = "responses"\nenv_key = "RELAY_KEY"\n{provider}'
    )
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", "-s", "read-only", "Run echo relay-ok"],
        cwd=work,
        env={**os.environ, "CODEX_HOME": str(home), "RELAY_KEY": "unused"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "The tool said:" in done.stdout and "relay-ok" in done.stdout, done.stdout
    return done.stdout


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
