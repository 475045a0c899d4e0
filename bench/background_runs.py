"""`python -m bench background [--quick]`: background responses drained, and a long stream
resumed from its middle.

One `relay serve` (one worker, SQLite, the default 16 background runs at once) before the
gateway benchmark's canned nginx upstream:

1. N background responses (non-streaming) submitted at once over 64 connections; a follower
   (`GET /responses/{id}?stream=true`) opened on every tenth, and on the last, as soon as its
   id is known. Queue wait: from the create's answer to the follower's `response.in_progress`;
   drain: from the first submission to the last response's terminal event.
2. A background stream of about a thousand events (the upstream's `/long/` answer): its end
   to end time beside the same request as a foreground stored stream (the cost of the event
   log), then `starting_after=<middle>` replays of the finished log.
3. A conversation of a thousand turns (`conversation` on each create): its next turns beside
   the first turn of fresh conversations, alternating.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import peers
from bench.gateway import table
from bench.loadgen import PROMPT
from bench.upstream_nginx import APT_COMMAND, missing_tools, start_nginx

CONNECTIONS = 64


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def _follow(http: httpx.AsyncClient, response_id: str) -> tuple[float, float]:
    """(when response.in_progress arrived, when the terminal event arrived)."""
    started = 0.0
    async with http.stream("GET", f"/v1/responses/{response_id}?stream=true") as answer:
        async for line in answer.aiter_lines():
            if line == "event: response.in_progress":
                started = time.perf_counter()
            elif line in ("event: response.completed", "event: response.failed"):
                return started, time.perf_counter()
    raise RuntimeError(f"{response_id}: the stream ended without a terminal event")


async def drain(base: str, count: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=CONNECTIONS + count // 10 + 2)
    body = orjson.dumps({"model": "bench-json", "input": PROMPT, "background": True})
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as http:
        gate = asyncio.Semaphore(CONNECTIONS)
        followers: list[asyncio.Task[tuple[float, float]]] = []
        submitted: list[float] = []

        async def submit(index: int) -> None:
            async with gate:
                answer = await http.post(
                    "/v1/responses", content=body, headers={"content-type": "application/json"}
                )
            answered = time.perf_counter()
            if answer.status_code != 200:
                raise RuntimeError(f"submit answered {answer.status_code}: {answer.text[:200]}")
            if index % 10 == 0 or index == count - 1:
                submitted.append(answered)
                followers.append(asyncio.ensure_future(_follow(http, answer.json()["id"])))

        start = time.perf_counter()
        await asyncio.gather(*(submit(index) for index in range(count)))
        submit_s = time.perf_counter() - start
        ends = await asyncio.gather(*followers)
    waits = [
        (began - answered) * 1000 for (began, _), answered in zip(ends, submitted, strict=True)
    ]
    drained_s = max(end for _, end in ends) - start
    return {
        "submit_s": submit_s,
        "drain_s": drained_s,
        "throughput": count / drained_s,
        "wait_p50": statistics.median(waits),
        "wait_p99": percentile(waits, 0.99),
        "samples": len(waits),
    }


def _stream_ms(http: httpx.Client, body: dict[str, Any]) -> tuple[float, str, int]:
    """(ms to the terminal event, the response id, events seen)."""
    start = time.perf_counter()
    response_id, events = "", 0
    with http.stream("POST", "/v1/responses", json=body) as answer:
        for line in answer.iter_lines():
            if line.startswith("data: {"):
                events += 1
                if not response_id:
                    response_id = orjson.loads(line[6:])["response"]["id"]
    return (time.perf_counter() - start) * 1000, response_id, events


def resume(base: str, rounds: int) -> list[list[str]]:
    rows = []
    with httpx.Client(base_url=base, timeout=120) as http:
        plain, logged = [], []
        for _ in range(rounds):
            body = {"model": "bench-long", "input": PROMPT, "stream": True}
            plain.append(_stream_ms(http, body)[0])
            ms, response_id, events = _stream_ms(http, {**body, "background": True})
            logged.append(ms)
        middle = events // 2
        replays = []
        for _ in range(rounds):
            start = time.perf_counter()
            answer = http.get(f"/v1/responses/{response_id}?stream=true&starting_after={middle}")
            replays.append((time.perf_counter() - start) * 1000)
            got = answer.text.count("\ndata: {") + answer.text.startswith("data: {")
            if answer.status_code != 200 or got != events - middle - 1:
                raise RuntimeError(f"replay gave {got} events, expected {events - middle - 1}")
    rows.append(
        [
            f"{events}-event stream, foreground store=true, to its end",
            f"{statistics.median(plain):.1f}",
        ]
    )
    rows.append(
        [
            f"{events}-event stream, background (event log), to its end",
            f"{statistics.median(logged):.1f}",
        ]
    )
    rows.append(
        [
            f"resume after event {middle} of the finished log ({events - middle - 1} events)",
            f"{statistics.median(replays):.1f}",
        ]
    )
    return rows


def conversation(base: str, turns: int, ends: int) -> list[list[str]]:
    body = {"model": "bench-json", "input": PROMPT}

    def turn(http: httpx.Client, conversation_id: str) -> float:
        start = time.perf_counter()
        answer = http.post("/v1/responses", json={**body, "conversation": conversation_id})
        elapsed = (time.perf_counter() - start) * 1000
        if answer.status_code != 200:
            raise RuntimeError(f"turn answered {answer.status_code}: {answer.text[:200]}")
        return elapsed

    with httpx.Client(base_url=base, timeout=60) as http:
        long = http.post("/v1/conversations", json={}).json()["id"]
        for _ in range(turns):
            turn(http, long)
        first, last = [], []
        for _ in range(ends):
            first.append(turn(http, http.post("/v1/conversations", json={}).json()["id"]))
            last.append(turn(http, long))
    ratio = statistics.median(last) / statistics.median(first)
    return [
        [f"turn 1 of a fresh conversation (median of {ends})", f"{statistics.median(first):.2f}"],
        [f"turn {turns + 1} and on (median of {ends})", f"{statistics.median(last):.2f}"],
        ["ratio (goal: <= 1.2x)", f"{ratio:.2f}x"],
    ]


def main(quick: bool = False) -> None:
    missing = missing_tools()
    if missing:
        raise SystemExit(f"needs {missing}: {APT_COMMAND}")
    count, rounds = (200, 3) if quick else (1000, 10)
    print("# Background responses" + (" (--quick)" if quick else ""))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        port = peers.free_port()
        nginx = start_nginx(workdir, port)
        relay_port = peers.free_port()
        relay = peers.start_relay(workdir / "relay", f"http://127.0.0.1:{port}", relay_port, 1)
        base = f"http://127.0.0.1:{relay_port}"
        try:
            drained = asyncio.run(drain(base, count))
            rows = resume(base, rounds)
            chat = conversation(base, count, 21)
        finally:
            relay.stop()
            nginx.stop()
    print(f"\n## {count} background responses submitted at once ({CONNECTIONS} connections)\n")
    print(
        table(
            ["measure", "value"],
            [
                ["all submitted (s)", f"{drained['submit_s']:.2f}"],
                ["all done (s)", f"{drained['drain_s']:.2f}"],
                ["throughput (responses/s)", f"{drained['throughput']:.0f}"],
                [
                    f"queue wait p50 (ms, {drained['samples']:.0f} sampled)",
                    f"{drained['wait_p50']:.1f}",
                ],
                ["queue wait p99 (ms)", f"{drained['wait_p99']:.1f}"],
            ],
        )
    )
    print(f"\n## A long stream and its resumption (median of {rounds})\n")
    print(table(["measure", "ms"], rows))
    print(f"\n## A conversation of {count} turns, store=true, non-streaming\n")
    print(table(["request", "latency ms"], chat))
