"""`python -m bench websocket [--quick]`: a WebSocket turn beside an SSE stream.

The gateway benchmark's canned nginx upstream (its `/sse/` stream) behind one `relay serve`
(one worker, store=false). Interleaved rounds, one request at a time: the chat stream straight
from nginx (direct), the same request as a Relay SSE stream (httpx, keep-alive connection),
and as a Relay WebSocket turn (`response.create` on one socket kept open across turns). Each
is timed to its first text delta and to its terminal event; overhead is the median over
rounds of the target's round median minus direct's.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from websockets.sync.client import ClientConnection, connect

from bench import loadgen, peers
from bench.gateway import responses_target, table
from bench.upstream_nginx import APT_COMMAND, direct_target, missing_tools, start_nginx

TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def socket_turn(socket: ClientConnection, body: dict[str, Any]) -> tuple[float, float]:
    """(seconds to the first text delta, seconds to the terminal event) of one turn."""
    first: float | None = None
    start = time.perf_counter()
    socket.send(orjson.dumps({"type": "response.create", **body}).decode())
    while True:
        event = orjson.loads(socket.recv(timeout=30))
        if first is None and event["type"] == "response.output_text.delta":
            first = time.perf_counter() - start
        if event["type"] in TERMINAL or event["type"] == "error":
            break
    total = time.perf_counter() - start
    if first is None or event["type"] != "response.completed":
        raise RuntimeError(f"the WebSocket turn ended with {event['type']}")
    return first, total


def main(quick: bool = False) -> None:
    missing = missing_tools()
    if missing:
        raise SystemExit(f"needs {missing}: {APT_COMMAND}")
    rounds, batch = (4, 5) if quick else (20, 10)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        port = peers.free_port()
        nginx = start_nginx(workdir, port)
        upstream = f"http://127.0.0.1:{port}"
        relay_port = peers.free_port()
        relay = peers.start_relay(workdir / "relay", upstream, relay_port, 1)
        try:
            base = f"http://127.0.0.1:{relay_port}"
            sse = responses_target("relay SSE", base, "bench-sse", "bench-sse", store=False)
            assert sse.stream_body is not None
            body = {k: v for k, v in sse.stream_body.items() if k != "stream"}
            samples = measure(direct_target(upstream), sse, base, body, rounds, batch)
        finally:
            relay.stop()
            nginx.stop()
    report(samples, rounds, batch)


def measure(
    direct: loadgen.Target,
    sse: loadgen.Target,
    base: str,
    turn_body: dict[str, Any],
    rounds: int,
    batch: int,
) -> dict[str, list[tuple[float, float]]]:
    """Per target, one (first delta, end) median pair per round; the first round warms up."""
    http = loadgen.client()
    socket = connect(base.replace("http://", "ws://") + "/v1/responses")
    runs: dict[str, Callable[[], tuple[float, float]]] = {
        "direct (nginx)": lambda: loadgen.stream_once(http, direct),
        "relay SSE": lambda: loadgen.stream_once(http, sse),
        "relay WebSocket turn": lambda: socket_turn(socket, turn_body),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    order = random.Random(20261128)
    try:
        for number in range(1 + rounds):
            for name in order.sample(list(runs), len(runs)):
                values = [runs[name]() for _ in range(batch)]
                if number >= 1:
                    samples[name].append(
                        (
                            statistics.median(v[0] for v in values),
                            statistics.median(v[1] for v in values),
                        )
                    )
    finally:
        socket.close()
        http.close()
    return samples


def report(samples: dict[str, list[tuple[float, float]]], rounds: int, batch: int) -> None:
    direct = samples["direct (nginx)"]
    rows = []
    for name, pairs in samples.items():
        first = statistics.median(p[0] for p in pairs) * 1000
        end = statistics.median(p[1] for p in pairs) * 1000
        over_first = statistics.median(
            (p[0] - d[0]) * 1000 for p, d in zip(pairs, direct, strict=True)
        )
        over_end = statistics.median(
            (p[1] - d[1]) * 1000 for p, d in zip(pairs, direct, strict=True)
        )
        rows.append([name, f"{first:.2f}", f"{over_first:+.2f}", f"{end:.2f}", f"{over_end:+.2f}"])
    print(f"\n## WebSocket turn beside SSE: {rounds} interleaved rounds of {batch}, store=false\n")
    headers = ["target", "1st delta p50 ms", "overhead ms", "end p50 ms", "overhead ms"]
    print(table(headers, rows))
    print("direct: the chat stream from nginx; relay: one worker, the same upstream stream")
