"""What Relay's processes hold in memory (`python -m bench footprint`, docs/benchmarks.md).

1. What each dependency costs when imported: the RSS of a fresh interpreter after importing
   the package, less the bare interpreter's (each package alone, so what two share counts in
   each), and the time the import took; the median of 3 interpreters. (`python -X importtime
   -c 'import relay.api.app'` says where the time goes inside one.)
2. `relay serve` idle, `--workers 1` and `--workers 2`: the RSS of each process of the tree
   a few seconds after start-up (the bench's configuration, SQLite, no keys), the median of
   3 starts by the tree's sum.
3. 1,000 open streams held by nginx after their first word (the gateway run's section 5),
   `--workers 1` and `--workers 2`.

The tree measured is the one `relay` imports: set PYTHONPATH=<a worktree>/src to measure
another (the before of a change).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import peers
from bench.gateway import process_role, responses_target, run_streams, section, table
from bench.upstream_nginx import APT_COMMAND, missing_tools, start_nginx

PYTHON = peers.RELAY_BIN.with_name("python")
# Top-level packages, in the order a worker meets them; then Relay's own modules.
PACKAGES = [
    "asyncio",
    "uvloop",
    "uvicorn",
    "starlette.applications",
    "pydantic",
    "pydantic_settings",
    "orjson",
    "httptools",
    "sqlalchemy",
    "sqlalchemy.ext.asyncio",
    "alembic",
    "asyncpg",
    "psycopg",
    "procrastinate",
    "redis.asyncio",
    "prometheus_client",
    "jsonschema",
    "cryptography.fernet",
    "zstandard",
    "jinja2",
    "opentelemetry.sdk.trace",
    "mcp.client.client",
    "llama_cpp",
    "watchfiles",
    "relay.config",
    "relay.cli",
    "relay.launch",
    "relay.api.app",
]
COST = """
import importlib, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
bare, started = rss(), time.perf_counter()
importlib.import_module(sys.argv[1])
print(rss() - bare, time.perf_counter() - started)
"""
REPEATS = 3
IDLE_S = 5.0  # after /healthz answers: the other worker's start-up, the first samples


def import_cost(package: str) -> tuple[float, float] | None:
    """(MB of RSS, ms to import) of `package` in a fresh interpreter, the median of REPEATS;
    None when it is not installed."""
    runs = []
    for _ in range(REPEATS):
        done = subprocess.run([PYTHON, "-c", COST, package], capture_output=True, text=True)
        if done.returncode != 0:
            return None
        kib, seconds = done.stdout.split()
        runs.append((int(kib) / 1024, float(seconds) * 1000))
    return statistics.median(mb for mb, _ in runs), statistics.median(ms for _, ms in runs)


def run_imports() -> None:
    section("1. What each dependency costs when imported (fresh interpreter each)")
    rows = []
    for package in PACKAGES:
        cost = import_cost(package)
        if cost is None:
            rows.append([package, "not installed", ""])
            continue
        rows.append([package, f"{cost[0]:.1f}", f"{cost[1]:.0f}"])
    print(table(["package", "RSS MB", "import ms"], rows))


def tree_rss(relay: peers.ManagedProcess) -> dict[str, int]:
    """KiB of RSS by process role, the workers numbered in the order they started."""
    measured, workers = {}, 0
    for pid in sorted(relay.pids()):
        role = process_role(pid)
        if role.startswith("worker"):
            workers += 1
            role = f"worker {workers}"
        measured[role] = peers.memory_kib([pid])[0]
    return measured


def run_idle(workdir: Path, workers: int) -> None:
    section(f"2. relay serve --workers {workers}, idle: RSS MB of each process, {REPEATS} starts")
    starts = []
    for number in range(REPEATS):
        port = peers.free_port()
        # The upstream is never called: an address nothing listens on.
        relay = peers.start_relay(workdir / f"idle-{workers}-{number}", "http://127.0.0.1:9",
                                  port, workers)  # fmt: skip
        try:
            time.sleep(IDLE_S)
            starts.append(tree_rss(relay))
        finally:
            relay.stop()
    starts.sort(key=lambda measured: sum(measured.values()))
    roles = sorted({role for measured in starts for role in measured})
    rows = [[role, *(f"{m.get(role, 0) / 1024:.1f}" for m in starts)] for role in roles]
    rows.append(["whole tree", *(f"{sum(m.values()) / 1024:.1f}" for m in starts)])
    print(table(["process", *(f"start {n + 1}" for n in range(REPEATS))], rows))
    median = starts[len(starts) // 2]
    helper = sum(kib for role, kib in median.items() if "resource tracker" in role)
    print(
        f"median: whole tree {sum(median.values()) / 1024:.1f} MB; without multiprocessing's "
        f"resource tracker {(sum(median.values()) - helper) / 1024:.1f} MB"
    )


def run_open_streams(workdir: Path, count: int) -> None:
    port = peers.free_port()
    nginx = start_nginx(workdir, port)
    try:
        upstream = f"http://127.0.0.1:{port}"
        for workers in (1, 2):
            relay_port = peers.free_port()
            relay = peers.start_relay(workdir / f"streams-{workers}", upstream, relay_port, workers)
            base = f"http://127.0.0.1:{relay_port}"
            hold = responses_target("relay hold", base, "bench-hold", "bench-hold")
            warm = responses_target("relay", base, "bench-json", "bench-sse")
            try:
                run_streams(relay, warm, hold, count, workers)
            finally:
                relay.stop()
    finally:
        nginx.stop()


def main(quick: bool) -> None:
    if not PYTHON.exists():
        print(f"{PYTHON} is missing: run `make` first")
        sys.exit(2)
    print("# Footprint" + (" (--quick: 100 streams, no import table)" if quick else ""))
    print(f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
    with tempfile.TemporaryDirectory(prefix="relay-footprint-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx's worker runs as another user and reads files in here
        if not quick:
            run_imports()
        for workers in (1, 2):
            run_idle(workdir, workers)
        missing = missing_tools()
        if missing:
            print(f"the open streams need {' and '.join(missing)}; run:\n  {APT_COMMAND}")
            return
        run_open_streams(workdir, 100 if quick else 1000)
