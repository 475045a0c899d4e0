"""`python -m bench ab`: this working tree against an earlier revision, interleaved.

On a noisy machine two runs of the gateway benchmark can differ by more than a change does.
This runs one Relay per tree at once (the revision checked out into a temporary git worktree
and run with `PYTHONPATH=<worktree>/src`, the same virtual environment), on one canned nginx,
with the same routes, and alternates between them: the sequential overhead over direct nginx
(JSON and first delta, store=false and store=true, interleaved rounds) and the server CPU per
request and req/s under wrk (alternating 5-second runs at C=16 and C=64, store=false and
store=true: single runs of the gateway's sweep differ by up to 20% on this machine).
The first Relay started reads up to 8% more req/s than its twin (an A/A run: `BENCH_AB_BASE`
unset), so each half of the rounds and runs starts the two in the other order.
`BENCH_AB_BASE` names the revision (default HEAD, i.e. the uncommitted change).
`BENCH_AB_LOG_LEVEL` sets both Relays' log level (default info): trees before 2026-12-06 logged
nothing in `--workers N` processes, so `warning` compares them without the per-response log
line. `BENCH_AB_CHANGE_ENV` adds settings to the working tree's Relay only (`NAME=value` pairs,
space-separated), such as `RELAY_LOG_FORMAT=json`.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen, peers
from bench.gateway import WORKERS, responses_target, table
from bench.upstream_nginx import APT_COMMAND, direct_target, missing_tools, start_nginx

WRK_S = 5


def _worktree(stack: ExitStack, base: str, where: Path) -> Path:
    git = ["git", "-C", str(peers.ROOT)]
    subprocess.run([*git, "worktree", "add", "--detach", str(where), base], check=True)
    stack.callback(subprocess.run, [*git, "worktree", "remove", "--force", str(where)])
    return where


@dataclass
class Measured:
    """Both trees' samples, over both halves: sequential round medians per target (JSON and
    first delta, in seconds) and wrk's (req/s, CPU ms per request) per target and C."""

    json: dict[str, list[float]] = field(default_factory=dict)
    first: dict[str, list[float]] = field(default_factory=dict)
    wrk: dict[tuple[str, int], list[tuple[float, float]]] = field(default_factory=dict)


def main(quick: bool) -> None:
    missing = missing_tools()
    if missing:
        print(f"the A/B benchmark needs {' and '.join(missing)}; run:\n  {APT_COMMAND}")
        sys.exit(2)
    base = os.environ.get("BENCH_AB_BASE", "HEAD")
    rounds, wrk_runs = (6, 2) if quick else (40, 4)
    print(f"# A/B: {base} against the working tree ({rounds} rounds, {wrk_runs} wrk runs)")
    with tempfile.TemporaryDirectory(prefix="relay-ab-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx's worker reads files in here
        before = _worktree(stack, base, workdir / "base")
        port = peers.free_port()
        nginx = start_nginx(workdir, port)
        stack.callback(nginx.stop)
        upstream = f"http://127.0.0.1:{port}"
        trees = {"base": str(before / "src"), "change": str(peers.ROOT / "src")}
        change_env = dict(
            pair.split("=", 1) for pair in os.environ.get("BENCH_AB_CHANGE_ENV", "").split()
        )
        if change_env:
            print(f"# the working tree's Relay with {change_env}")
        measured = Measured()
        # The Relay started first reads up to 8% more req/s than its twin (an A/A run): each
        # half of the rounds starts them in the other order.
        for half, order in enumerate((["base", "change"], ["change", "base"])):
            with ExitStack() as relays_stack:
                relays = {
                    name: _start(relays_stack, workdir / f"{name}-{half}", upstream, trees[name],
                                 change_env if name == "change" else {})
                    for name in order
                }  # fmt: skip
                _measure(workdir, upstream, relays, rounds // 2, wrk_runs // 2, measured)
        direct = direct_target(upstream).name
        rows = []
        for name in ("base", "change", "base stored", "change stored"):
            cells = []
            for samples in (measured.json, measured.first):
                pairs = zip(samples[name], samples[direct], strict=True)
                cells.append(f"{statistics.median(a - b for a, b in pairs) * 1000:+.3f}")
            rows.append([name, *cells])
        print(table(["tree", "JSON overhead ms", "1st delta overhead ms"], rows))
        rows = [
            [
                f"C={c} {name}",
                f"{statistics.median(rps for rps, _ in runs):,.0f}",
                f"{statistics.median(per for _, per in runs):.3f}",
                " ".join(f"{per:.2f}" for _, per in runs),
            ]
            for (name, c), runs in sorted(measured.wrk.items(), key=lambda kv: (kv[0][1], kv[0][0]))
        ]
        headers = ["wrk, non-streaming", "req/s (median)", "server CPU ms/req (median)", "runs"]
        print(table(headers, rows))


def _start(
    stack: ExitStack, workdir: Path, upstream: str, src: str, extra_env: dict[str, str]
) -> tuple[peers.ManagedProcess, str]:
    """A Relay of the tree at `src`, stopped with `stack`: (it, its base URL)."""
    env = {"PYTHONPATH": src, "RELAY_LOG_LEVEL": os.environ.get("BENCH_AB_LOG_LEVEL", "info")}
    relay_port = peers.free_port()
    relay = peers.start_relay(
        workdir, upstream, relay_port, WORKERS, anthropic=False, env={**env, **extra_env}
    )
    stack.callback(relay.stop)
    return relay, f"http://127.0.0.1:{relay_port}"


def _measure(
    workdir: Path,
    upstream: str,
    relays: dict[str, tuple[peers.ManagedProcess, str]],
    rounds: int,
    wrk_runs: int,
    measured: Measured,
) -> None:
    """Sequential rounds and wrk runs against `relays` (by tree), added to `measured`."""
    plain = [
        responses_target(name, url, "bench-json", "bench-sse", store=False)
        for name, (_, url) in relays.items()
    ]
    stored = [
        responses_target(f"{name} stored", url, "bench-json", "bench-sse", store=True)
        for name, (_, url) in relays.items()
    ]
    targets = [direct_target(upstream), *plain, *stored]
    for samples, once in (
        (measured.json, loadgen.request_once),
        (measured.first, lambda http, target: loadgen.stream_once(http, target)[0]),
    ):
        found, _ = loadgen.sequential(targets, rounds, 10, once)
        for name, values in found.items():
            samples.setdefault(name, []).extend(values)
    for target in plain + stored:
        loadgen.run_wrk(workdir, target, 16, 2)  # warm-up
    for run in range(wrk_runs):
        for connections in (16, 64):
            for pair in (plain, stored):
                for target in pair if run % 2 == 0 else pair[::-1]:
                    relay = relays[target.name.split()[0]][0]
                    spent = peers.cpu_seconds(relay.pids())
                    result = loadgen.run_wrk(workdir, target, connections, WRK_S)
                    spent = peers.cpu_seconds(relay.pids()) - spent
                    per = spent * 1000 / max(result.requests, 1)
                    measured.wrk.setdefault((target.name, connections), []).append(
                        (result.rps, per)
                    )
