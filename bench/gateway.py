"""`python -m bench gateway [--quick]`: what Relay adds to every request, next to its peers.

On loopback, in one run, with the same requests: a canned nginx upstream (direct), Relay's
/v1/responses with store=false and store=true, LiteLLM's proxy and OGX. Prints aligned tables:
sequential overhead, a wrk concurrency sweep, a py-spy profile of Relay under load, a
previous_response_id chain and Relay's memory with many open streams; then the targets.
"""

from __future__ import annotations

import asyncio
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import loadgen, peers
from bench.keyed_relay import start_keyed_relays
from bench.loadgen import Target, WrkResult
from bench.upstream_nginx import direct_target, require_tools, start_nginx

WORKERS = 2
NUMBER = re.compile(r"[-+]?[\d,.]+ ?(%|x|ms|MB)?")
PROFILE_DIR = Path(tempfile.gettempdir())  # the raw stacks outlive the run


@dataclass(frozen=True)
class Plan:
    rounds: int
    batch: int  # sequential requests per target per round
    concurrency: list[int]
    wrk_s: int
    streams: int
    chain: int
    profile_s: int
    need_peers_installed: bool  # quick: skip a peer whose venv is missing instead of installing


FULL = Plan(20, 10, [1, 16, 64, 256], 10, 1000, 1000, 10, False)
QUICK = Plan(4, 5, [1, 16], 2, 100, 50, 3, True)


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Aligned plain text: columns of numbers to the right, other columns to the left."""
    columns = list(zip(headers, *rows, strict=True))
    widths = [max(len(cell) for cell in column) for column in columns]
    numeric = [all(NUMBER.fullmatch(cell) for cell in column[1:]) for column in columns]

    def line(cells: list[str]) -> str:
        padded = zip(cells, widths, numeric, strict=True)
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def section(title: str) -> None:
    print(f"\n## {title}\n", flush=True)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def responses_target(name: str, base: str, model: str, stream_model: str, **extra: Any) -> Target:
    headers = extra.pop("headers", {})
    body = {"model": model, "input": loadgen.PROMPT, **extra}
    stream_body = {"model": stream_model, "input": loadgen.PROMPT, **extra, "stream": True}
    url = f"{base}/v1/responses"
    return Target(name, url, body, url, stream_body, headers)


def machine() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False).stderr
    git = ["git", "-C", str(peers.ROOT), "describe", "--always", "--dirty=+uncommitted changes"]
    commit = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
    return [
        f"relay: {commit or '?'} ({peers.ROOT})",
        f"date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine: {os.cpu_count()} cores (nproc), {model}, Python {platform.python_version()}",
        f"upstream: {nginx.strip().removeprefix('nginx version: ')} (1 worker); load: wrk, httpx",
    ]


# 1. sequential ---------------------------------------------------------------------------------


def run_sequential(
    targets: list[Target], servers: dict[str, peers.ManagedProcess], rounds: int, batch: int
) -> tuple[list[Target], dict[str, dict[str, float]]]:
    """The table, and the targets that answered every request (the others are left out)."""
    section(
        f"1. Sequential latency: {rounds} interleaved rounds of {batch} requests per target, "
        "one request at a time (httpx)"
    )
    ends: dict[str, list[float]] = {t.name: [] for t in targets}

    def first_delta(http: Any, target: Target) -> float:
        first, end = loadgen.stream_once(http, target)
        ends[target.name].append(end)
        return first

    plain, failed = loadgen.sequential(targets, rounds, batch, loadgen.request_once)
    firsts, failed_streams = loadgen.sequential(targets, rounds, batch, first_delta)
    for name, why in {**failed, **failed_streams}.items():
        print(f"{name} left out of the run: {why}\n{servers[name].log_tail(15)}\n")
    targets = [t for t in targets if t.name in plain and t.name in firsts]
    direct = targets[0].name

    def overhead(samples: dict[str, list[float]], name: str) -> float:
        pairs = zip(samples[name], samples[direct], strict=True)
        return statistics.median(a - b for a, b in pairs) * 1000.0

    rows, out = [], {}
    for t in targets:
        out[t.name] = {"json": overhead(plain, t.name), "stream": overhead(firsts, t.name)}
        cells = [loadgen.median_ms(plain[t.name]), out[t.name]["json"]]
        cells += [loadgen.median_ms(firsts[t.name]), out[t.name]["stream"]]
        cells += [loadgen.median_ms(ends[t.name][batch:])]  # after the warm-up round
        rows.append([t.name, *(f"{c:+.2f}" if i % 2 else f"{c:.2f}" for i, c in enumerate(cells))])
    headers = ["target", "JSON p50 ms", "overhead ms", "1st delta p50 ms", "overhead ms"]
    print(table([*headers, "stream end p50 ms"], rows))
    print("p50: median of the per-round medians; overhead: median over rounds of (target's")
    print("round median - direct's round median); streaming: time to the first text delta")
    print("(direct: first content chunk; others: output_text.delta)")
    return targets, out


# 2. wrk sweep ----------------------------------------------------------------------------------


def run_sweep(
    workdir: Path, targets: list[Target], servers: dict[str, peers.ManagedProcess], plan: Plan
) -> dict[tuple[str, int], WrkResult]:
    section(f"2. Throughput: wrk -t2 -c<C> -d{plan.wrk_s}s --latency, non-streaming POST")
    results: dict[tuple[str, int], WrkResult] = {}
    rows: list[list[str]] = []
    failed: set[str] = set()
    passes = [(16, True)] + [(connections, False) for connections in plan.concurrency]
    for connections, warm_up in passes:  # the first pass warms up and is not reported
        for target in targets:
            if target.name in failed:
                continue
            server = servers[target.name]
            cpu_before = peers.cpu_seconds(server.pids())
            try:
                result = loadgen.run_wrk(workdir, target, connections, 2 if warm_up else plan.wrk_s)
            except RuntimeError as error:
                failed.add(target.name)
                print(f"  {target.name} left out: {error}\n{server.log_tail(15)}", flush=True)
                continue
            if warm_up:
                continue
            spent = peers.cpu_seconds(server.pids()) - cpu_before
            cpu_ms = spent * 1000 / max(result.requests, 1)
            results[target.name, connections] = result
            numbers = [result.rps, result.p50_ms, result.p99_ms, cpu_ms]
            cells = [f"{n:,.0f}" if i == 0 else f"{n:.2f}" for i, n in enumerate(numbers)]
            rows.append([str(connections), target.name, *cells, str(result.errors)])
            print(f"  C={connections} {target.name}: {result.rps:,.0f} req/s", flush=True)
    headers = ["C", "target", "req/s", "p50 ms", "p99 ms", "server CPU ms/req", "errors"]
    print("\n" + table(headers, rows))
    print("server CPU: user+system time of the server's process tree (nginx for direct) / requests")
    return results


# 3. profile ------------------------------------------------------------------------------------


PROFILE_MODES = {
    "gil": "samples holding the GIL: where Relay's Python code spends CPU",
    "native": "all threads with C frames, blocked ones included: SQLite, GIL and lock waits",
}


def run_profile(workdir: Path, relay: peers.ManagedProcess, target: Target, seconds: int) -> None:
    section(f"3. Profile: py-spy on Relay's workers under wrk -c64, {target.name}, {seconds} s")
    assert relay.proc is not None
    for mode, meaning in PROFILE_MODES.items():
        result = loadgen.profile_under_load(workdir, relay.proc.pid, target, seconds, mode)
        if isinstance(result, str):
            print(result)
            continue
        profile, rps = result
        total = max(profile.samples, 1)
        keep = PROFILE_DIR / f"relay-profile-{mode}.txt"
        shutil.copyfile(workdir / f"profile-{mode}.txt", keep)
        print(f"### py-spy --{mode}: {meaning}")
        print(f"{profile.samples} samples at {rps:,.0f} req/s (slowed by py-spy); stacks: {keep}")
        parts = [
            ("by thread", profile.by_thread),
            ("by package (self)", profile.by_package[:15]),
            ("by innermost relay/ function (own time + library code it called)",
             profile.by_relay_function[:20]),
            ("top functions by self time", profile.self_top[:25]),
            ("top functions by inclusive time (request path only)", profile.inclusive_top),
        ]  # fmt: skip
        for title, pairs in parts:
            rows = [[f"{100 * n / total:.1f}%", name[:110]] for name, n in pairs]
            print(f"\n{title}\n" + table(["share", "where"], rows))
        print()


# 4. chain ---------------------------------------------------------------------------------------


def run_chain(
    workdir: Path, upstream: str, relay_base: str, turns: int, ends: int = 21
) -> tuple[float, float]:
    section(f"4. previous_response_id chain: {turns} turns, store=true, non-streaming")
    run = loadgen.chain(f"{relay_base}/v1/responses", "bench-json", turns, ends)
    marks = sorted({turns // 4, turns // 2, 3 * turns // 4, turns - 1})
    rows = [[f"turn 1 (median of {ends}, alternating with turn {turns})",
             f"{loadgen.median_ms(run.first):.2f}"]]  # fmt: skip
    # run.turns[n - 1] is turn n
    rows += [[f"turn {n} (building the chain)", f"{run.turns[n - 1] * 1000:.2f}"]
             for n in marks if n >= 1]  # fmt: skip
    rows += [[f"turn {turns} (median of {ends})", f"{loadgen.median_ms(run.last):.2f}"]]
    # For reference: the same turn on a Relay that keeps no history in memory (what a worker
    # that did not serve turn 999, or a restarted one, pays), on the same database.
    port = peers.free_port()
    cold = peers.start_relay(
        workdir / "relay-cold",
        upstream,
        port,
        1,
        database=workdir / "relay-1" / "relay.db",
        settings=["history_cache_items = 0"],
    )
    try:
        rebuilt = loadgen.continue_chain(
            f"http://127.0.0.1:{port}/v1/responses", "bench-json", run.tail, ends
        )
    finally:
        cold.stop()
    rows.append(
        [
            f"turn {turns}, rebuilt from storage (history_cache_items = 0, median of {ends})",
            f"{loadgen.median_ms(rebuilt):.2f}",
        ]
    )
    print(table(["request", "latency ms"], rows))
    return loadgen.median_ms(run.first), loadgen.median_ms(run.last)


# 5. memory with open streams --------------------------------------------------------------------


def process_role(pid: int) -> str:
    """A label for a process of a uvicorn tree, from its command line."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return f"pid {pid}"
    if "resource_tracker" in command:
        return "multiprocessing resource tracker"
    # A worker: uvicorn's (multiprocessing) before Relay's supervisor, Relay's since.
    if "spawn_main" in command or "relay.launch --worker" in command:
        return f"worker (pid {pid})"
    if " serve " in command or "relay.launch" in command:  # --workers N: become relay.launch
        return "supervisor (relay serve)"
    return command[:40]


def run_streams(
    relay: peers.ManagedProcess, warm: Target, hold: Target, count: int, workers: int
) -> float:
    section(
        f"5. Relay memory, --workers {workers}, with {count} open streams "
        "(upstream holds each after one word)"
    )
    _, failed = loadgen.sequential([warm], 1, 20, lambda http, t: loadgen.stream_once(http, t)[0])
    if failed:
        raise RuntimeError(f"Relay failed before the streams test: {failed}")

    def per_process() -> dict[str, tuple[int, int]]:
        return {process_role(pid): peers.memory_kib([pid]) for pid in relay.pids()}

    before = per_process()
    opened, during = asyncio.run(loadgen.hold_streams(hold, count, per_process))
    rows = []
    for role in sorted(set(before) | set(during)):
        was, now = before.get(role, (0, 0)), during.get(role, (0, 0))
        rows.append([role, *(f"{kib / 1024:.0f}" for kib in (*was, *now))])
    rss = [sum(rss for rss, _ in m.values()) for m in (before, during)]
    pss = [sum(pss for _, pss in m.values()) for m in (before, during)]
    rows.append(["whole tree", *(f"{kib / 1024:.0f}" for kib in (rss[0], pss[0], rss[1], pss[1]))])
    grown = [(pair[1] - pair[0]) / max(opened, 1) for pair in (rss, pss)]
    print(table(["process", "RSS MB before", "PSS MB before", f"RSS MB, {opened} open",
                 f"PSS MB, {opened} open"], rows))  # fmt: skip
    print(f"per open stream: RSS {grown[0]:.0f} KiB, PSS {grown[1]:.0f} KiB (streams: store=true)")
    return rss[1] / 1024


# the run ----------------------------------------------------------------------------------------


def start_peers(
    stack: ExitStack, workdir: Path, upstream: str, plan: Plan
) -> list[tuple[Target, peers.ManagedProcess]]:
    """LiteLLM and OGX, where they install and start here; a line for each saying how it went."""
    litellm_auth = {"Authorization": f"Bearer {peers.LITELLM_KEY}"}
    candidates: list[
        tuple[str, Callable[[], str | None], Callable[..., Any], Callable[..., Target]]
    ]
    candidates = [
        ("LiteLLM", lambda: _ensure(peers.LITELLM, plan), peers.start_litellm,
         lambda base: responses_target("litellm", base, "mock-json", "mock-sse", store=False,
                                       headers=litellm_auth)),
        ("OGX", lambda: _ensure(peers.OGX, plan) or peers.ensure_ogx(workdir), peers.start_ogx,
         lambda base: responses_target("ogx store=true", base, "vllm/mock-model",
                                       "vllm/mock-model", store=True)),
    ]  # fmt: skip
    found = []
    for name, ensure, start, make_target in candidates:
        problem = ensure()
        if problem is None:
            port = peers.free_port()
            try:
                proc = start(workdir, upstream, port, WORKERS)
            except RuntimeError as error:
                problem = f"did not start: {str(error)[-600:]}"
            else:
                stack.callback(proc.stop)
                found.append((make_target(f"http://127.0.0.1:{port}"), proc))
        print(f"{name}: " + (problem or "running"), flush=True)
    return found


def _ensure(venv: peers.PeerVenv, plan: Plan) -> str | None:
    return venv.ready(install=not plan.need_peers_installed)


def main(quick: bool) -> None:
    require_tools("gateway")
    plan = QUICK if quick else FULL
    started, accounting = time.monotonic(), loadgen.cpu_accounting()
    print("# Gateway overhead" + (" (--quick: smoke-run counts)" if quick else ""))
    print("\n".join(machine()))
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx's worker runs as another user and reads files in here
        port = peers.free_port()
        nginx = start_nginx(workdir, port)
        stack.callback(nginx.stop)
        upstream = f"http://127.0.0.1:{port}"
        relay_port = peers.free_port()
        relay = peers.start_relay(workdir / "relay-1", upstream, relay_port, WORKERS)
        stack.callback(relay.stop)
        relay_base = f"http://127.0.0.1:{relay_port}"
        keyed = start_keyed_relays(stack, workdir, upstream, WORKERS)
        peer_stack = stack.enter_context(ExitStack())
        peer_targets = start_peers(peer_stack, workdir, upstream, plan)
        print(
            f"workers: Relay --workers {WORKERS}, LiteLLM --num_workers {WORKERS}, "
            f"OGX uvicorn --workers {WORKERS}; versions: "
            f"litellm {peers.package_version(peers.LITELLM, 'litellm')}, "
            f"ogx {peers.package_version(peers.OGX, 'ogx')}"
        )
        relay_false, relay_true = (
            responses_target(f"relay store={str(store).lower()}", relay_base, "bench-json",
                             "bench-sse", store=store) for store in (False, True)
        )  # fmt: skip
        # Provider against provider: the same answer streamed by the upstream, through the
        # chat provider and through the Anthropic one (sequential table only).
        by_provider = [
            responses_target(f"relay {kind} store=false", relay_base, model, model, store=False)
            for kind, model in (("chat-sse", "bench-sse"), ("anthropic", "bench-claude"))
        ]
        direct = direct_target(upstream)
        targets = [direct, relay_false, relay_true, *by_provider]
        targets += [target for target, _ in [*keyed, *peer_targets]]
        servers = {direct.name: nginx, relay_false.name: relay, relay_true.name: relay}
        servers.update((target.name, relay) for target in by_provider)
        servers.update((target.name, proc) for target, proc in [*keyed, *peer_targets])

        targets, overhead = run_sequential(targets, servers, plan.rounds, plan.batch)
        swept = [target for target in targets if target not in by_provider]
        sweep = run_sweep(workdir, swept, servers, plan)
        peer_stack.close()  # the rest measures Relay alone, on a quiet machine
        for _, keyed_relay in keyed:
            keyed_relay.stop()
        run_profile(workdir, relay, relay_true, plan.profile_s)
        chain_ms = run_chain(workdir, upstream, relay_base, plan.chain)
        relay.stop()

        # Memory of the default `relay serve` (one process) and of the sweep's worker count.
        rss_mb: dict[int, float] = {}
        for workers in sorted({1, WORKERS}):
            fresh_port = peers.free_port()
            fresh = peers.start_relay(
                workdir / f"relay-mem-{workers}", upstream, fresh_port, workers
            )
            fresh_base = f"http://127.0.0.1:{fresh_port}"
            hold = responses_target("relay hold", fresh_base, "bench-hold", "bench-hold")
            warm = responses_target("relay", fresh_base, "bench-json", "bench-sse")
            try:
                rss_mb[workers] = run_streams(fresh, warm, hold, plan.streams, workers)
            finally:
                fresh.stop()
        report_targets(plan, overhead, sweep, chain_ms, rss_mb)
    print(f"\n({loadgen.machine_share(started, accounting)})")


def report_targets(
    plan: Plan,
    overhead: dict[str, dict[str, float]],
    sweep: dict[tuple[str, int], WrkResult],
    chain_ms: tuple[float, float],
    rss_mb: dict[int, float],
) -> None:
    section("Targets")
    rows = []
    for name, limit in (("relay store=false", 1.0), ("relay store=true", 2.0)):
        for mode, label in (("json", "JSON"), ("stream", "1st delta")):
            value = overhead[name][mode]
            rows.append([f"sequential overhead, {name}, {label}", f"<= {limit:.0f} ms",
                         f"{value:.2f} ms", verdict(value <= limit)])  # fmt: skip
    for name in ("relay keyed store=false", "relay keyed+redis store=false"):
        if name not in overhead:
            continue
        for mode, label in (("json", "JSON"), ("stream", "1st delta")):
            added = overhead[name][mode] - overhead["relay store=false"][mode]
            rows.append([f"keys and limits, {name.split()[1]}, {label}: added to store=false",
                         "<= 0.10 ms", f"{added:+.2f} ms", verdict(added <= 0.1)])  # fmt: skip
    chat, anthropic = "relay chat-sse store=false", "relay anthropic store=false"
    if chat in overhead and anthropic in overhead:
        for mode, label in (("json", "JSON"), ("stream", "1st delta")):
            added = overhead[anthropic][mode] - overhead[chat][mode]
            rows.append([f"anthropic provider beside the chat provider, {label}",
                         "<= 0.20 ms", f"{added:+.2f} ms", verdict(added <= 0.2)])  # fmt: skip
    litellm = sweep.get(("litellm", 64))
    for name in ("relay store=false", "relay store=true"):
        relay = sweep.get((name, 64))
        ratio = relay.rps / litellm.rps if relay and litellm and litellm.rps else None
        shown = "not measured" if ratio is None else f"{ratio:.1f}x"
        ok = None if ratio is None else ratio >= 5
        rows.append([f"throughput at C=64, {name} / litellm", ">= 5x", shown, verdict(ok)])
    ratio = chain_ms[1] / chain_ms[0]
    rows.append(
        [f"chain: turn {plan.chain} / turn 1", "<= 2x", f"{ratio:.2f}x", verdict(ratio <= 2)]
    )
    for workers, mb in rss_mb.items():
        label = f"RSS with {plan.streams} open streams, --workers {workers}"
        rows.append([label, "< 300 MB", f"{mb:.0f} MB", verdict(mb < 300)])
    print(table(["target", "goal", "measured", "verdict"], rows))
