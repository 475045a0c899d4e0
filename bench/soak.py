"""`python -m bench soak [--minutes N]` (default 60): the production topology under a realistic
mix for a bounded time, sampled every ~30 s, and a verdict on whether it stays flat.

The topology is the production benchmark's (bench/topology.py). Clients, each in a loop with a
short pause: previous_response_id chains (store=true, JSON, restarted every CHAIN_TURNS turns,
so that turns land on both instances and read their history from PostgreSQL), streams
(store=false), background responses polled until done, WebSocket turns (one socket kept for
WS_TURNS turns, continuing the previous response), and two keys held at their limits: one
with a small rpm (expected 429s) and one whose credit is spent (expected 402s). Every sample
records the RSS and open file descriptors of each Relay process, PostgreSQL connections
(pg_stat_activity), Redis clients, and over the interval the requests, p50/p99 of the
foreground requests (chains, streams, WebSocket turns) and the answers by status.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from bench import gateway, peers
from bench.background_runs import percentile
from bench.gateway import section, table
from bench.loadgen import EXPECTED_TEXT, JSON_HEADERS, PROMPT, output_text
from bench.topology import PRODUCTION_POLICY, Topology, start_topology
from bench.upstream_nginx import APT_COMMAND, missing_tools, start_nginx
from bench.websocket_turns import TERMINAL

CHAIN_TURNS = 20
WS_TURNS = 20
PAUSE_S = 0.05  # between a client's requests: a steady load, short of saturating the machine
POLL_S = 0.05  # between a background response's polls
# Keys at their limits: a few requests a minute admitted, then 429; a credit that a handful
# of responses spend, then 402.
LIMITED_POLICY = {"rpm": 20}
BROKE_POLICY = {"credit_usd": 0.00002}
# What each client may be answered; anything else is an error.
EXPECTED = {"limited": {"200", "429"}, "broke": {"200", "402"}}
FOREGROUND = ("chain", "stream", "websocket")
# Flat: the last quarter's mean against the first's, within a ratio plus a slack.
FLAT = {
    "RSS MB": (1.15, 10.0),
    "open fds": (1.2, 10.0),
    "PG connections": (1.0, 4.0),
    "Redis clients": (1.0, 4.0),
    "p99 ms": (2.0, 20.0),
}


@dataclass
class Outcome:
    kind: str
    status: int | str  # an HTTP status, or what went wrong without one
    seconds: float


@dataclass
class Recorder:
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, kind: str, status: int | str, started: float) -> None:
        self.outcomes.append(Outcome(kind, status, time.perf_counter() - started))

    def take(self) -> list[Outcome]:
        taken, self.outcomes = self.outcomes, []
        return taken


def unexpected(kind: str, status: int | str) -> bool:
    return str(status) not in EXPECTED.get(kind, {"200"})


async def _post(http: httpx.AsyncClient, body: dict[str, Any], key: str) -> httpx.Response:
    headers = {**JSON_HEADERS, "Authorization": f"Bearer {key}"}
    return await http.post("/v1/responses", content=orjson.dumps(body), headers=headers)


def _answered(answer: httpx.Response) -> int | str:
    """The status, or why a 200 is not the canned answer."""
    if answer.status_code == 200 and output_text(answer.json()) != EXPECTED_TEXT:
        return "200 with another answer"
    return answer.status_code


async def chains(http: httpx.AsyncClient, key: str, record: Recorder) -> None:
    previous: str | None = None
    for turn in range(CHAIN_TURNS):
        body: dict[str, Any] = {"model": "bench-json", "input": PROMPT, "store": True}
        if previous is not None:
            body["previous_response_id"] = previous
        started = time.perf_counter()
        answer = await _post(http, body, key)
        record.add("chain", _answered(answer), started)
        if answer.status_code != 200:
            return
        previous = answer.json()["id"]
        if turn < CHAIN_TURNS - 1:
            await asyncio.sleep(PAUSE_S)


async def stream(http: httpx.AsyncClient, key: str, record: Recorder) -> None:
    body = orjson.dumps({"model": "bench-sse", "input": PROMPT, "store": False, "stream": True})
    headers = {**JSON_HEADERS, "Authorization": f"Bearer {key}"}
    started = time.perf_counter()
    async with http.stream("POST", "/v1/responses", content=body, headers=headers) as answer:
        completed = False
        async for line in answer.aiter_lines():
            completed = completed or line == "event: response.completed"
    status = answer.status_code
    record.add("stream", status if status != 200 or completed else "stream not completed", started)


async def background(http: httpx.AsyncClient, key: str, record: Recorder) -> None:
    body = {"model": "bench-json", "input": PROMPT, "background": True, "store": True}
    started = time.perf_counter()
    answer = await _post(http, body, key)
    if answer.status_code != 200:
        record.add("background", answer.status_code, started)
        return
    response_id = answer.json()["id"]
    headers = {"Authorization": f"Bearer {key}"}
    while True:
        await asyncio.sleep(POLL_S)
        polled = await http.get(f"/v1/responses/{response_id}", headers=headers)
        state = polled.json().get("status") if polled.status_code == 200 else None
        if state not in ("queued", "in_progress"):
            ok = polled.status_code == 200 and state == "completed"
            record.add("background", 200 if ok else f"{polled.status_code} {state}", started)
            return


async def websocket_turns(base: str, key: str, record: Recorder) -> None:
    """WS_TURNS turns on one socket, each continuing the previous response."""
    url = base.replace("http://", "ws://") + "/v1/responses"
    headers = {"Authorization": f"Bearer {key}"}
    async with connect(url, additional_headers=headers, open_timeout=30) as socket:
        previous: str | None = None
        for _ in range(WS_TURNS):
            body: dict[str, Any] = {"type": "response.create", "model": "bench-sse",
                                    "input": PROMPT, "store": True}  # fmt: skip
            if previous is not None:
                body["previous_response_id"] = previous
            started = time.perf_counter()
            await socket.send(orjson.dumps(body).decode())
            while True:
                event = orjson.loads(await asyncio.wait_for(socket.recv(), 30))
                if event["type"] in TERMINAL or event["type"] == "error":
                    break
            if event["type"] != "response.completed":
                record.add("websocket", f"websocket {event['type']}", started)
                return
            record.add("websocket", 200, started)
            previous = event["response"]["id"]
            await asyncio.sleep(PAUSE_S)


async def limited(http: httpx.AsyncClient, key: str, kind: str, record: Recorder) -> None:
    started = time.perf_counter()
    answer = await _post(http, {"model": "bench-json", "input": PROMPT, "store": False}, key)
    record.add(kind, _answered(answer), started)


async def _loop(
    kind: str, until: float, record: Recorder, once: Callable[[], Awaitable[None]]
) -> None:
    """`once` again and again until `until`; a failure without an answer is recorded too."""
    while time.monotonic() < until:
        started = time.perf_counter()
        try:
            await once()
        except (httpx.HTTPError, WebSocketException, OSError, TimeoutError, ValueError) as error:
            record.add(kind, type(error).__name__, started)
            await asyncio.sleep(1.0)  # do not spin on a server that is down
        await asyncio.sleep(PAUSE_S)


async def drive(topology: Topology, keys: dict[str, str], until: float, record: Recorder) -> None:
    base, key = topology.base, keys["normal"]
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        clients = {
            "chain": lambda: chains(http, key, record),
            "stream": lambda: stream(http, key, record),
            "background": lambda: background(http, key, record),
            "websocket": lambda: websocket_turns(base, key, record),
            "limited": lambda: limited(http, keys["limited"], "limited", record),
            "broke": lambda: limited(http, keys["broke"], "broke", record),
        }
        copies = {"chain": 2, "stream": 2}
        await asyncio.gather(
            *(_loop(kind, until, record, once)
              for kind, once in clients.items() for _ in range(copies.get(kind, 1)))
        )  # fmt: skip


# Sampling -------------------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass(frozen=True)
class Sample:
    at_s: float
    rss_mb: dict[int, float]  # per Relay process
    fds: dict[int, int]
    pg_connections: int
    redis_clients: int
    p50_ms: float | None
    p99_ms: float | None
    statuses: Counter[str]  # "<client> <status>" of the answers other than 200
    kinds: Counter[str]  # requests per client

    @property
    def requests(self) -> int:
        return sum(self.kinds.values())

    @property
    def values(self) -> dict[str, float | None]:
        return {
            "RSS MB": sum(self.rss_mb.values()),
            "open fds": sum(self.fds.values()),
            "PG connections": self.pg_connections,
            "Redis clients": self.redis_clients,
            "p99 ms": self.p99_ms,
        }


def sample(topology: Topology, at_s: float, outcomes: list[Outcome]) -> Sample:
    pids = topology.pids()
    latencies = [o.seconds * 1000 for o in outcomes if o.kind in FOREGROUND and o.status == 200]
    return Sample(
        at_s,
        {pid: peers.memory_kib([pid])[0] / 1024 for pid in pids},
        {pid: open_fds(pid) for pid in pids},
        topology.stores.postgres.connections(),
        topology.stores.redis.clients(),
        statistics.median(latencies) if latencies else None,
        percentile(latencies, 0.99) if latencies else None,
        Counter(f"{o.kind} {o.status}" for o in outcomes if o.status != 200),
        Counter(o.kind for o in outcomes),
    )


async def soak(
    topology: Topology, keys: dict[str, str], seconds: float, every_s: float
) -> list[Sample]:
    record = Recorder()
    start = time.monotonic()
    load = asyncio.create_task(drive(topology, keys, start + seconds, record))
    samples: list[Sample] = []
    while not load.done():
        due = min((len(samples) + 1) * every_s, seconds)
        if due >= seconds:  # the last sample: once the clients have finished their requests
            await load
        else:
            await asyncio.wait([load], timeout=max(0.0, start + due - time.monotonic()))
            if load.done():
                load.result()  # raises what the clients raised
        at_s = time.monotonic() - start
        samples.append(await asyncio.to_thread(sample, topology, at_s, record.take()))
        print(series_row(samples[-1]), flush=True)
    return samples


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def series_row(s: Sample) -> str:
    other = ", ".join(f"{name}: {n}" for name, n in sorted(s.statuses.items())) or "-"
    return (
        f"  t={s.at_s:6.0f} s  RSS {sum(s.rss_mb.values()):.0f} MB  fds {sum(s.fds.values())}  "
        f"PG {s.pg_connections}  Redis {s.redis_clients}  {s.requests} requests  "
        f"p50 {_ms(s.p50_ms)} ms  p99 {_ms(s.p99_ms)} ms  not 200: {other}"
    )


def verdict(samples: list[Sample], outcomes: Counter[tuple[str, str]]) -> list[list[str]]:
    """Rows of (measure, first quarter, last quarter, limit, verdict)."""
    quarter = max(1, len(samples) // 4)
    first, last = samples[:quarter], samples[-quarter:]
    rows = []
    for name, (ratio, slack) in FLAT.items():
        before = [v for s in first if (v := s.values[name]) is not None]
        after = [v for s in last if (v := s.values[name]) is not None]
        if not before or not after:
            rows.append([name, "-", "-", "-", "n/a"])
            continue
        a, b = statistics.mean(before), statistics.mean(after)
        limit = a * ratio + slack
        rows.append([name, f"{a:.1f}", f"{b:.1f}", f"<= {limit:.1f}", gateway.verdict(b <= limit)])
    errors = sum(n for (kind, status), n in outcomes.items() if unexpected(kind, status))
    rows.append(["unexpected answers", "-", str(errors), "0", gateway.verdict(errors == 0)])
    for kind, status in (("limited", "429"), ("broke", "402")):
        seen = outcomes[kind, status]
        rows.append([f"expected {status}s ({kind} key)", "-", str(seen), "> 0",
                     gateway.verdict(seen > 0)])  # fmt: skip
    return rows


def main(quick: bool = False, minutes: float = 60.0) -> None:
    missing = missing_tools()
    if missing:
        print(f"the soak needs {' and '.join(missing)}; run:\n  {APT_COMMAND}")
        sys.exit(2)
    if quick:
        minutes = min(minutes, 2.0)
    every_s = max(5.0, min(30.0, minutes * 60 / 8))  # at least 8 samples
    print(f"# Soak: the production topology for {minutes:g} minutes, sampled every {every_s:.0f} s")
    print("\n".join(gateway.machine()))
    with tempfile.TemporaryDirectory(prefix="relay-soak-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        port = peers.free_port()
        nginx = start_nginx(workdir, port)
        stack.callback(nginx.stop)
        topology = start_topology(stack, workdir, f"http://127.0.0.1:{port}")
        keys = {
            "normal": topology.key(PRODUCTION_POLICY),
            "limited": topology.key(LIMITED_POLICY),
            "broke": topology.key(BROKE_POLICY),
        }
        section("Series")
        samples = asyncio.run(soak(topology, keys, minutes * 60, every_s))
        report(topology, samples)


def report(topology: Topology, samples: list[Sample]) -> None:
    section("Per process (RSS MB and open fds: first sample, last sample)")
    first, last = samples[0], samples[-1]
    rows = [
        [f"relay-{number} {gateway.process_role(pid)}", f"{first.rss_mb.get(pid, 0):.0f}",
         f"{last.rss_mb.get(pid, 0):.0f}", str(first.fds.get(pid, 0)), str(last.fds.get(pid, 0))]
        for number, relay in enumerate(topology.relays, 1) for pid in relay.pids()
    ]  # fmt: skip
    print(table(["process", "RSS first", "RSS last", "fds first", "fds last"], rows))
    totals: Counter[tuple[str, str]] = Counter()
    kinds: Counter[str] = Counter()
    for s in samples:
        kinds.update(s.kinds)
        for name, n in s.statuses.items():
            kind, status = name.split(" ", 1)
            totals[kind, status] += n
    others = ", ".join(f"{kind} {status}: {n}" for (kind, status), n in sorted(totals.items()))
    section(f"Verdict ({sum(kinds.values())} requests)")
    print("requests per client: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    print(f"answers other than 200: {others or 'none'}\n")
    print(table(["measure", "first quarter", "last quarter", "limit", "verdict"],
                verdict(samples, totals)))  # fmt: skip
    print("first/last quarter: means over the first and last quarter of the samples; limits:")
    print("RSS x1.15 + 10 MB, fds x1.2 + 10, PG connections and Redis clients + 4, p99 x2 + 20 ms")
