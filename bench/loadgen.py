"""Load: wrk for throughput, httpx for sequential latency, open streams and chains, py-spy.

Targets are plain data (`Target`): a URL, a JSON body per mode and headers, so the direct
upstream, Relay and its peers are driven by the same code with the same requests.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import resource
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson

PROMPT = "Say hello"  # every request's input
EXPECTED_TEXT = "Hello! How can I help you today?"  # the canned answer, checked on every request
JSON_HEADERS = {"Content-Type": "application/json"}
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    body: dict[str, Any]
    stream_url: str | None = None  # where the same request with streaming goes (None: no stream)
    stream_body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def client(timeout_s: float = 60.0) -> httpx.Client:
    return httpx.Client(timeout=timeout_s, trust_env=False, headers=JSON_HEADERS)


def output_text(answer: Any) -> str:
    """The text of a chat.completion or of a Responses object."""
    if "choices" in answer:
        return str(answer["choices"][0]["message"]["content"])
    parts = [
        part.get("text", "")
        for item in answer.get("output", [])
        if item.get("type") == "message"
        for part in item.get("content", [])
    ]
    return "".join(parts)


def is_text_delta(event: Any) -> bool:
    """A Responses `response.output_text.delta` event, or a chat chunk carrying content."""
    if not isinstance(event, dict):
        return False
    if event.get("type") == "response.output_text.delta":
        return True
    choices = event.get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


# Sequential, one request at a time on a keep-alive connection ------------------------------


def request_once(http: httpx.Client, target: Target) -> float:
    """Seconds for one non-streaming request; raises when the answer is not the canned text."""
    start = time.perf_counter()
    response = http.post(target.url, content=orjson.dumps(target.body), headers=target.headers)
    elapsed = time.perf_counter() - start
    if response.status_code != 200 or output_text(response.json()) != EXPECTED_TEXT:
        raise RuntimeError(
            f"{target.name}: unexpected answer {response.status_code} {response.text[:300]}"
        )
    return elapsed


def stream_once(http: httpx.Client, target: Target) -> tuple[float, float]:
    """(seconds to the first text delta, seconds to the end of the stream)."""
    assert target.stream_url is not None and target.stream_body is not None
    first: float | None = None
    body = orjson.dumps(target.stream_body)
    start = time.perf_counter()
    with http.stream("POST", target.stream_url, content=body, headers=target.headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{target.name}: stream answered {response.status_code}")
        for line in response.iter_lines():
            if first is not None or not line.startswith("data:") or "[DONE]" in line:
                continue
            if is_text_delta(orjson.loads(line[5:])):
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"{target.name}: the stream carried no text delta")
    return first, total


def sequential(
    targets: list[Target],
    rounds: int,
    batch: int,
    measure: Callable[[httpx.Client, Target], float],
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Interleaved rounds, as the independent gateway benchmark of peers.md measures overhead:
    each round sends `batch` requests, one at a time, to every target in turn, in an order
    shuffled every round (seeded), and keeps the median of each batch. The first round warms
    up and is not kept.

    Returns (per-round medians per target, why each target that failed did): a failing target
    is left out of the later rounds and of the samples, so the others still get measured.
    """
    clients = {target.name: client() for target in targets}
    samples: dict[str, list[float]] = {target.name: [] for target in targets}
    failures: dict[str, str] = {}
    order = random.Random(20261122)
    try:
        for number in range(1 + rounds):
            for target in order.sample(targets, len(targets)):
                if target.name in failures:
                    continue
                try:
                    values = [measure(clients[target.name], target) for _ in range(batch)]
                except (httpx.HTTPError, RuntimeError) as error:
                    failures[target.name] = f"{type(error).__name__}: {error}"
                    continue
                if number >= 1:
                    samples[target.name].append(statistics.median(values))
        return {n: v for n, v in samples.items() if n not in failures}, failures
    finally:
        for http in clients.values():
            http.close()


@dataclass(frozen=True)
class Chain:
    first: list[float]  # `ends` single turns (turn 1)
    turns: list[float]  # turns 1 .. `turns` - 1 of one chain
    last: list[float]  # `ends` requests that each are turn `turns`
    tail: str  # the id of turn `turns` - 1, which the last requests continue


def _turn(http: httpx.Client, url: str, model: str, previous: str | None) -> tuple[float, str]:
    body: dict[str, Any] = {"model": model, "input": PROMPT, "store": True}
    if previous is not None:
        body["previous_response_id"] = previous
    start = time.perf_counter()
    response = http.post(url, content=orjson.dumps(body))
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise RuntimeError(f"chain turn failed: {response.status_code} {response.text[:300]}")
    return elapsed, str(response.json()["id"])


def chain(url: str, model: str, turns: int, ends: int) -> Chain:
    """Latencies of a previous_response_id chain (store=true, non-streaming): the chain is
    built up to turn `turns` - 1, then `ends` requests of turn 1 (no previous response) and
    `ends` of turn `turns` (each continuing turn `turns` - 1) alternate, so that both are
    measured under the same conditions."""
    with client() as http:
        for _ in range(3):  # warm-up
            _turn(http, url, model, None)
        latencies, previous = [], None
        for _ in range(turns - 1):
            elapsed, previous = _turn(http, url, model, previous)
            latencies.append(elapsed)
        assert previous is not None
        first, last = [], []
        for _ in range(ends):
            first.append(_turn(http, url, model, None)[0])
            last.append(_turn(http, url, model, previous)[0])
    return Chain(first, latencies, last, previous)


def continue_chain(url: str, model: str, tail: str, ends: int) -> list[float]:
    """`ends` requests that each continue `tail` (after a warm-up request without a chain)."""
    with client() as http:
        _turn(http, url, model, None)
        return [_turn(http, url, model, tail)[0] for _ in range(ends)]


# wrk: throughput and latency distribution -----------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int  # socket errors plus non-2xx answers


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if match is None:
            raise ValueError(f"wrk output lacks {pattern!r}:\n{output}")
        return match

    errors = 0
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket:
        errors += sum(int(value) for value in socket.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return WrkResult(
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_ms(find(r"^\s+50%\s+(\S+)").group(1)),
        p99_ms=_ms(find(r"^\s+99%\s+(\S+)").group(1)),
        requests=int(find(r"^\s+(\d+) requests in").group(1)),
        errors=errors,
    )


def wrk_script(workdir: Path, target: Target) -> Path:
    headers = {"Content-Type": "application/json", **target.headers}
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{orjson.dumps(target.body).decode()}]==]"]
    lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()]
    path = workdir / f"post-{re.sub(r'[^a-z0-9]+', '-', target.name.lower())}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_wrk(workdir: Path, target: Target, connections: int, duration_s: int) -> WrkResult:
    threads = min(2, connections)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--latency"]
    argv += ["--timeout", "10s", "-s", str(wrk_script(workdir, target)), target.url]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed for {target.name}: {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


# Many open streams ------------------------------------------------------------------------------


async def hold_streams(
    target: Target, count: int, measure: Callable[[], T], open_timeout_s: float = 120
) -> tuple[int, T]:
    """Open `count` streams; once each has carried a text delta, return (count, `measure()`)."""
    assert target.stream_url is not None and target.stream_body is not None
    url, body = target.stream_url, orjson.dumps(target.stream_body)
    opened = 0
    all_open = asyncio.Event()
    gate = asyncio.Semaphore(64)  # how many streams may be starting at once

    async def one(http: httpx.AsyncClient) -> None:
        nonlocal opened
        await gate.acquire()
        held = True
        try:
            async with http.stream("POST", url, content=body, headers=target.headers) as answer:
                lines = answer.aiter_lines()
                async for line in lines:
                    if line.startswith("data:") and is_text_delta(orjson.loads(line[5:])):
                        break
                else:
                    raise RuntimeError("a held stream ended before its first text delta")
                opened += 1
                if opened == count:
                    all_open.set()
                gate.release()  # this stream stays open: let the next one start
                held = False
                async for _ in lines:
                    pass
        finally:
            if held:
                gate.release()

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    options: dict[str, Any] = {"limits": limits, "timeout": httpx.Timeout(600.0, connect=60.0)}
    async with httpx.AsyncClient(trust_env=False, headers=JSON_HEADERS, **options) as http:
        tasks = [asyncio.create_task(one(http)) for _ in range(count)]
        waiter = asyncio.create_task(all_open.wait())
        try:
            await asyncio.wait(
                [waiter, *tasks], timeout=open_timeout_s, return_when="FIRST_COMPLETED"
            )
            if not waiter.done():  # a stream ended or failed first, or the time ran out
                ended = [task for task in tasks if task.done()]
                why = repr(ended[0].exception()) if ended else f"{open_timeout_s:.0f} s passed"
                raise RuntimeError(f"only {opened} of {count} streams opened: {why}")
            await asyncio.sleep(2.0)  # let buffers and allocator settle
            return opened, measure()
        finally:
            for task in [waiter, *tasks]:
                task.cancel()
            await asyncio.gather(waiter, *tasks, return_exceptions=True)


# py-spy: where a server spends its time under load ------------------------------------------


@dataclass(frozen=True)
class Profile:
    samples: int
    self_top: list[tuple[str, int]]
    inclusive_top: list[tuple[str, int]]
    by_package: list[tuple[str, int]]  # self time per top-level package
    by_relay_function: list[tuple[str, int]]  # samples under the innermost relay/ frame
    by_thread: list[tuple[str, int]]


# "func (pkg/mod.py:12)"; native frames: "sqlite3_step (libsqlite3.so.0)", "0x7f… (libc.so.6)"
_FRAME = re.compile(r"(?P<func>\S.*) \((?P<path>[^()]+?)(:\d+)?\)")


def _frames(stack: str) -> list[tuple[str, str]]:
    """(function, path) of each code frame; py-spy's "process …" and "thread …" are left out."""
    out = []
    for frame in stack.split(";"):
        match = _FRAME.fullmatch(frame)
        if match and not frame.startswith(("process ", "thread ")):
            func = "?" if match["func"].startswith("0x") else match["func"]
            out.append((func, match["path"]))
    return out


def _package(path: str) -> str:
    """py-spy paths are relative to site-packages or the stdlib: "starlette/routing.py"."""
    head = path.split("/", 1)[0]
    return head.removesuffix(".py") if "/" in path or head.endswith(".py") else head


# Where the inclusive ("cumulative") table looks: the request path, not process plumbing.
INCLUSIVE_SCOPE = (
    "relay/", "starlette/", "fastapi/", "httpx/", "httpcore/", "h11/", "anyio/", "sqlalchemy/",
    "pydantic", "orjson", "uvicorn/protocols/", "uvicorn/middleware/", "libsqlite3",
    "cursor.c", "connection.c",
)  # fmt: skip


def aggregate_collapsed(text: str, top: int = 40) -> Profile:
    """Self and inclusive samples per function from py-spy's raw (collapsed) output."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    owners: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        frames = _frames(stack)
        if not frames or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        names = [f"{func} ({path})" for func, path in frames]
        self_counts[names[-1]] += count
        packages[_package(frames[-1][1])] += count
        scoped = {
            n for n, (f, p) in zip(names, frames, strict=True) if p.startswith(INCLUSIVE_SCOPE)
        }
        for name in scoped:
            inclusive[name] += count
        mine = [n for n, (_, path) in zip(names, frames, strict=True) if path.startswith("relay/")]
        owners[mine[-1] if mine else f"(no relay frame; in {_package(frames[-1][1])})"] += count
        in_thread = any(func.startswith("Thread._bootstrap") for func, _ in frames)
        threads["worker threads (SQLite)" if in_thread else "event loop thread"] += count
    return Profile(
        total,
        self_counts.most_common(top),
        inclusive.most_common(top),
        packages.most_common(),
        owners.most_common(top),
        threads.most_common(),
    )


def profile_under_load(
    workdir: Path, pid: int, target: Target, seconds: int, mode: str
) -> tuple[Profile, float] | str:
    """py-spy on `pid` and its subprocesses while wrk -c64 drives `target`: (profile, req/s),
    or what failed. mode "gil": samples holding the GIL (where Python spends CPU); "native":
    C frames too, and threads blocked in C (SQLite's busy handler, GIL waits)."""
    binary = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "py-spy"
    if not binary.exists():
        return "no profile: py-spy is not installed (.venv/bin/pip install py-spy)"
    out = workdir / f"profile-{mode}.txt"
    script = wrk_script(workdir, target)
    argv = ["wrk", "-t2", "-c64", f"-d{seconds + 5}s", "--latency", "-s", str(script), target.url]
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    time.sleep(2.0)
    spy_argv = [str(binary), "record", "--pid", str(pid), "--subprocesses", "--format", "raw"]
    spy_argv += ["--duration", str(seconds), "--rate", "100", "-o", str(out), f"--{mode}"]
    spy = subprocess.run(spy_argv, capture_output=True, text=True, check=False)
    load_out, _ = load.communicate()
    if spy.returncode != 0 or not out.exists():
        return f"py-spy failed: {(spy.stderr or spy.stdout)[-400:]}"
    return aggregate_collapsed(out.read_text()), parse_wrk(load_out).rps


def cpu_accounting() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its reaped
    descendants): their difference over a run is what other processes took meanwhile."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    return busy, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def machine_share(started: float, accounting: tuple[float, float]) -> str:
    """How long the run took since `started` (time.monotonic()) and how much CPU processes
    outside it took meanwhile, from its `cpu_accounting()` then."""
    elapsed, (busy, own) = time.monotonic() - started, cpu_accounting()
    others = (busy - accounting[0]) - (own - accounting[1])
    return (
        f"total {elapsed:.0f} s; CPU taken meanwhile by processes outside this benchmark: "
        f"{others:.0f} s, {100 * others / (elapsed * (os.cpu_count() or 1)):.0f}% of the machine"
    )


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000.0
