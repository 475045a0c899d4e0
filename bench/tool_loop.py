"""`python -m bench tools [--quick]`: what the server-side tool loop adds per tool step.

A real MCP server (the official SDK's `MCPServer`, streamable HTTP, its own process on
loopback) with one tool, `noop()`, that answers "ok" at once; one `relay serve` (one worker,
SQLite, store=false) whose model is the fake provider's `tool_loop` script: asked "steps k",
it calls the first tool it is offered until the context holds k tool outputs, then answers.
Each request offers the MCP server (`require_approval: "never"`), so a response with k steps
is k + 1 model turns, k `mcp_call`s and one tool listing.

Interleaved rounds after a warm-up round, one JSON request at a time over one keep-alive
connection: for each k (0, 1, 4, 8), in an order shuffled every round, a batch of requests,
with `relay_tool_call_duration_seconds{kind="mcp_call"}` (Relay's own timing of each call,
from its start to its end) read from `/metrics` after every request, outside its timing.
Per round:

    overhead per step = (N_k - N_0) / k

with N the batch's median of a request's latency less its own calls' seconds (N_0 = T_0:
no calls). The listing of the server's tools (Relay lists them for every request whose
context has no `mcp_list_tools` item, as here) is in N_0 and N_k alike, so it cancels out;
what is left is the loop itself: the calls' items and events, the next turn's context and
the provider opened again. The table gives medians over rounds, and the slope of N over k
as a second estimate.
"""

from __future__ import annotations

import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import loadgen, peers
from bench.gateway import table, verdict

STEPS = (0, 1, 4, 8)
MODEL = "bench-tools"
LABEL = "b"
GOAL_MS = 1.0  # issue 23: the loop's overhead per tool step beyond the tool's own time
TOOL_SUM = re.compile(
    r'^relay_tool_call_duration_seconds_(sum|count)\{[^}]*kind="mcp_call"[^}]*\} (\S+)$', re.M
)


def serve_mcp(port: int) -> None:
    """The MCP server, in this process until it is stopped: `python -m bench.tool_loop PORT`."""
    import uvicorn
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("relay-bench", log_level="WARNING")

    @server.tool(description="Does nothing; answers ok.")
    def noop() -> str:
        return "ok"

    config = uvicorn.Config(
        server.streamable_http_app(),
        log_config=None,
        access_log=False,
        ws="none",
        loop="asyncio",
        lifespan="on",  # the streamable HTTP app runs its session manager there
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Accepted connections inherit it: a response written in two pieces must not wait for
    # the client's delayed ACK (40 ms), which would be counted as the tool's time.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    uvicorn.Server(config).run(sockets=[sock])


def start_mcp(workdir: Path, port: int) -> peers.ManagedProcess:
    argv = [sys.executable, "-m", "bench.tool_loop", str(port)]
    proc = peers.ManagedProcess("mcp server", argv, workdir / "mcp.log", cwd=peers.ROOT)
    proc.start()
    proc.wait_ready(f"http://127.0.0.1:{port}/mcp")  # a GET without a session: 4xx, alive
    return proc


def start_relay(workdir: Path, port: int, mcp_port: int) -> peers.ManagedProcess:
    """As peers.start_relay, with the one fake route and the MCP server allowed."""
    lines = [
        f'database_url = "sqlite:///{workdir / "relay.db"}"',
        'log_level = "warning"',
        f'sealing_keys = ["{peers.SEALING_KEY}"]',
        "",
        "[[routes]]",
        f'model = "{MODEL}"',
        'provider = "fake"',
        'upstream_model = "tool_loop"',
        "",
        "[tools]",
        "max_steps = 64",
        "",
        "[tools.mcp]",
        f'allowed_servers = ["http://127.0.0.1:{mcp_port}/"]',
        'private_networks = ["127.0.0.0/8"]',
    ]
    config = workdir / "relay.toml"
    config.write_text("\n".join(lines) + "\n")
    argv = [str(peers.RELAY_BIN), "serve", "--config", str(config), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--workers", "1"]
    proc = peers.ManagedProcess("relay", argv, workdir / "relay.log", cwd=workdir)
    proc.start()
    proc.wait_ready(f"http://127.0.0.1:{port}/healthz", timeout_s=90)
    return proc


@dataclass(frozen=True)
class Batch:
    latency_s: float  # the batch's median
    net_s: float  # the batch's median of (latency - that request's mcp_call seconds)
    tool_s: float  # Relay's timing of the batch's mcp_calls, their sum
    calls: int  # mcp_calls the batch ran, by the metric


def tool_seconds(http: httpx.Client, base: str) -> tuple[float, int]:
    """Relay's running total of mcp_call seconds, and of calls (0 before the first)."""
    found = dict(TOOL_SUM.findall(http.get(f"{base}/metrics").text))
    return float(found.get("sum", 0.0)), int(float(found.get("count", 0)))


def body(steps: int, server_url: str) -> dict[str, Any]:
    tool = {
        "type": "mcp",
        "server_label": LABEL,
        "server_url": server_url,
        "require_approval": "never",
    }
    return {"model": MODEL, "input": f"steps {steps}", "store": False, "tools": [tool]}


def request_once(http: httpx.Client, url: str, content: bytes, steps: int) -> float:
    """Seconds for one response; raises unless it ran `steps` calls that answered ok."""
    start = time.perf_counter()
    response = http.post(url, content=content)
    elapsed = time.perf_counter() - start
    answer = response.json() if response.status_code == 200 else {}
    calls = [item for item in answer.get("output", []) if item["type"] == "mcp_call"]
    ok = [call for call in calls if call["status"] == "completed" and call["output"] == "ok"]
    expected = f"Done after {steps} tool calls."
    if len(ok) != steps or len(calls) != steps or loadgen.output_text(answer) != expected:
        raise RuntimeError(f"steps {steps}: unexpected answer {response.text[:400]}")
    return elapsed


def measure(base: str, server_url: str, rounds: int, batch: int) -> dict[int, list[Batch]]:
    """Per k, one Batch per round; the first round warms up and is not kept.

    The metric is read after every request (outside its timing), so that each latency is
    paired with its own calls' seconds: the calls' times are skewed (a slow one now and
    then), and a batch's median latency less its mean tool time would count that skew as
    the loop's (negative) overhead."""
    url = f"{base}/v1/responses"
    bodies = {steps: orjson.dumps(body(steps, server_url)) for steps in STEPS}
    samples: dict[int, list[Batch]] = {steps: [] for steps in STEPS}
    order = random.Random(20261130)
    with loadgen.client() as http:
        spent, calls = tool_seconds(http, base)
        for number in range(1 + rounds):
            for steps in order.sample(STEPS, len(STEPS)):
                latencies, nets, tool, made = [], [], 0.0, 0
                for _ in range(batch):
                    elapsed = request_once(http, url, bodies[steps], steps)
                    spent_after, calls_after = tool_seconds(http, base)
                    if calls_after - calls != steps:
                        raise RuntimeError(
                            f"steps {steps}: the metric counted {calls_after - calls} calls"
                        )
                    latencies.append(elapsed)
                    nets.append(elapsed - (spent_after - spent))
                    tool += spent_after - spent
                    made += calls_after - calls
                    spent, calls = spent_after, calls_after
                if number >= 1:
                    batch_of = Batch(
                        statistics.median(latencies), statistics.median(nets), tool, made
                    )
                    samples[steps].append(batch_of)
    return samples


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, middle, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, middle, high


def report(samples: dict[int, list[Batch]], rounds: int, batch: int, quick: bool) -> None:
    zero = samples[0]
    rows = []
    per_call: list[float] = []
    for steps, batches in samples.items():
        if steps == 0:
            continue
        latency = statistics.median(b.latency_s for b in batches) * 1000
        added = (
            statistics.median(b.latency_s - z.latency_s for b, z in zip(batches, zero, strict=True))
            * 1000
        )
        tool = statistics.median(b.tool_s / batch for b in batches) * 1000
        per_call += [b.tool_s / b.calls * 1000 for b in batches]
        overheads = [(b.net_s - z.net_s) / steps * 1000 for b, z in zip(batches, zero, strict=True)]
        low, middle, high = quartiles(overheads)
        rows.append(
            [
                f"steps {steps}",
                f"{latency:.2f}",
                f"{added:+.2f}",
                f"{tool:.2f}",
                f"{middle:+.3f}",
                f"{low:+.3f} to {high:+.3f}",
                verdict(middle < GOAL_MS),
            ]
        )
    # The same overhead as the slope of N over k = 0, 1, 4, 8 in each round:
    # every k's batch weighs in, and a cost of the first step alone would move the intercept.
    slopes = [
        statistics.linear_regression(
            [float(steps) for steps in samples],
            [samples[steps][number].net_s for steps in samples],
        ).slope
        * 1000
        for number in range(rounds)
    ]
    print(
        f"\n## Tool loop: {rounds} interleaved rounds of {batch} requests per k, "
        "JSON, store=false, one at a time\n"
    )
    headers = [
        "request",
        "T_k p50 ms",
        "T_k - T_0 ms",
        "tool ms/request",
        "overhead ms/step",
        "quartiles over rounds",
        f"< {GOAL_MS:g} ms",
    ]
    print(table(headers, rows))
    t_zero = statistics.median(b.latency_s for b in zero) * 1000
    print(f"T_0 (steps 0: the tool listing and one model turn): {t_zero:.2f} ms p50")
    low, middle, high = quartiles(slopes)
    print(
        f"slope of N over k = 0, 1, 4, 8, per round: {middle:+.3f} ms/step "
        f"(quartiles {low:+.3f} to {high:+.3f})"
    )
    low, middle, high = quartiles(per_call)
    print(
        "the tool's own time per call (relay_tool_call_duration_seconds: Relay's MCP client, "
        f"one SDK session a call, and the server): {middle:.2f} ms (quartiles {low:.2f} to "
        f"{high:.2f})"
    )
    print(
        "overhead per step = (N_k - N_0) / k per round, N the batch's median of a request's "
        "latency less its own calls' time; then the median over rounds"
    )
    print(f"reproduce: .venv/bin/python -m bench tools{' --quick' if quick else ''}")


def header() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    git = ["git", "-C", str(peers.ROOT), "describe", "--always", "--dirty=+uncommitted changes"]
    commit = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
    return [
        f"relay: {commit or '?'}",
        f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine: {os.cpu_count()} cores (nproc), {model}, Python {sys.version.split()[0]}",
        f"MCP server: mcp {version('mcp')} MCPServer, streamable HTTP, uvicorn (its own process)",
    ]


def main(quick: bool = False) -> None:
    rounds, batch = (3, 3) if quick else (40, 10)
    print("# Server-side tool loop" + (" (--quick: smoke-run counts)" if quick else ""))
    print("\n".join(header()))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        mcp_port = peers.free_port()
        mcp = start_mcp(workdir, mcp_port)
        relay_port = peers.free_port()
        try:
            relay = start_relay(workdir, relay_port, mcp_port)
            try:
                base = f"http://127.0.0.1:{relay_port}"
                server_url = f"http://127.0.0.1:{mcp_port}/mcp"
                samples = measure(base, server_url, rounds, batch)
            except (httpx.HTTPError, RuntimeError):
                print(f"relay's log:\n{relay.log_tail()}\nthe MCP server's:\n{mcp.log_tail()}")
                raise
            finally:
                relay.stop()
        finally:
            mcp.stop()
    report(samples, rounds, batch, quick)


if __name__ == "__main__":
    serve_mcp(int(sys.argv[1]))
