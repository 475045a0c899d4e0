"""`python -m bench production [--quick]`: Relay as a team runs it, beside LiteLLM and direct.

In one run, on loopback, with the same requests to the gateway benchmark's canned nginx
upstream: the production topology (bench/topology.py: two `relay serve --workers 2` behind a
round-robin nginx, one PostgreSQL, one Redis, a database key whose project has rpm, tpm and
concurrency limits and a budget) with store=false and store=true; LiteLLM's proxy with its own
Redis; and the upstream called directly. Sections: sequential overhead over direct (JSON and
time to the first text delta); wrk at 1 and 64 connections, JSON and streams, with each
server's CPU, its datastores' CPU and its PostgreSQL statements and transactions and Redis
commands per request (each server has datastores of its own, read before and after each
phase); then one summary row per target with its memory.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench import gateway, loadgen, peers
from bench.datastores import Postgres, Redis, start_redis
from bench.gateway import responses_target, section, table
from bench.loadgen import Target, WrkResult
from bench.topology import INSTANCES, WORKERS, start_topology
from bench.upstream_nginx import direct_target, require_tools, start_nginx

CONNECTIONS = (1, 64)
MODES = ("JSON", "stream")
LITELLM_NO_DATABASE = (
    "LiteLLM runs without its database, so without virtual keys, budgets or spend logs: its "
    "proxy reaches PostgreSQL through prisma, and `prisma generate` fetches Prisma's query "
    "engine from binaries.prisma.sh, which this machine cannot reach (no PyPI or npm package "
    "ships the engine). It runs with its master key and per-route rpm/tpm limits that its "
    "router counts in a Redis of its own (usage-based-routing-v2)."
)


@dataclass(frozen=True)
class Plan:
    rounds: int  # sequential: interleaved rounds of `batch` requests per target
    batch: int
    wrk_s: int
    warm_up_s: int
    settle: bool  # wait for PostgreSQL's transaction counters to settle after each phase


FULL = Plan(20, 10, 10, 2, True)
QUICK = Plan(3, 5, 1, 1, False)


@dataclass
class System:
    """A server under test: its processes and the datastores that it alone uses."""

    name: str
    pids: Callable[[], list[int]]
    postgres: Postgres | None = None
    redis: Redis | None = None

    def store_pids(self) -> list[int]:
        return [*(self.postgres.pids() if self.postgres else []),
                *(self.redis.pids() if self.redis else [])]  # fmt: skip


@dataclass(frozen=True)
class Reading:
    server_cpu_s: float
    store_cpu_s: float
    statements: int | None
    transactions: int | None
    commands: int | None
    scripts: int | None


def read(system: System, settle: bool) -> Reading:
    postgres, redis = system.postgres, system.redis
    transactions = None
    if postgres is not None:
        transactions = postgres.settled_transactions() if settle else postgres.transactions()
    return Reading(
        peers.cpu_seconds(system.pids()),
        peers.cpu_seconds(system.store_pids()),
        postgres.statements() if postgres else None,
        transactions,
        *(redis.commands() if redis else (None, None)),
    )


@dataclass(frozen=True)
class Phase:
    wrk: WrkResult
    server_cpu_ms: float  # per request, as every figure below
    store_cpu_ms: float
    statements: float | None
    transactions: float | None
    commands: float | None
    scripts: float | None


def per_request(before: Reading, after: Reading, wrk: WrkResult) -> Phase:
    requests = max(wrk.requests, 1)

    def each(a: int | None, b: int | None) -> float | None:
        return None if a is None or b is None else (b - a) / requests

    return Phase(
        wrk,
        (after.server_cpu_s - before.server_cpu_s) * 1000 / requests,
        (after.store_cpu_s - before.store_cpu_s) * 1000 / requests,
        each(before.statements, after.statements),
        each(before.transactions, after.transactions),
        each(before.commands, after.commands),
        each(before.scripts, after.scripts),
    )


def streaming(target: Target) -> Target:
    """The target's streaming request as the one wrk sends."""
    assert target.stream_url is not None and target.stream_body is not None
    return dataclasses.replace(
        target, name=f"{target.name} stream", url=target.stream_url, body=target.stream_body
    )


def run_load(
    workdir: Path, targets: list[tuple[Target, System]], plan: Plan
) -> dict[tuple[str, str, int], Phase]:
    section(
        f"2. Load: wrk -t<=2 -c<C> -d{plan.wrk_s}s, JSON and streams; cost per request of "
        "each server and of its own datastores"
    )
    for target, _ in targets:  # warm-up, not reported
        loadgen.run_wrk(workdir, target, 16, plan.warm_up_s)
    phases: dict[tuple[str, str, int], Phase] = {}
    last: dict[str, Reading] = {}  # a system's reading after its previous phase
    rows = []
    for connections in CONNECTIONS:
        for mode in MODES:
            for target, system in targets:
                sent = target if mode == "JSON" else streaming(target)
                before = last.get(system.name) or read(system, plan.settle)
                result = loadgen.run_wrk(workdir, sent, connections, plan.wrk_s)
                last[system.name] = read(system, plan.settle)
                phase = per_request(before, last[system.name], result)
                phases[target.name, mode, connections] = phase
                print(
                    f"  C={connections} {mode} {target.name}: {result.rps:,.0f} req/s", flush=True
                )
                rows.append([str(connections), mode, target.name, *phase_cells(phase)])
    headers = ["C", "mode", "target", "req/s", "p50 ms", "p99 ms", "server CPU ms/req",
               "datastore CPU ms/req", "PG statements/req", "PG transactions/req",
               "Redis commands/req", "Redis scripts/req", "errors"]  # fmt: skip
    print("\n" + table(headers, rows))
    print("server CPU: user+system time of the server's processes (Relay: both instances, all")
    print("workers; direct: the upstream nginx) / requests; datastore CPU: its PostgreSQL and")
    print("Redis servers'; statements: pg_stat_statements calls on its database (BEGIN and")
    print("COMMIT included: each is a round trip); transactions: pg_stat_database commits and")
    print("rollbacks; Redis commands: INFO commandstats calls, those run by scripts included;")
    print("scripts: EVAL/EVALSHA/FCALL calls (each one round trip, whatever it runs), so Redis")
    print("round trips lie between the two; '-': the server uses none")
    return phases


def _optional(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def phase_cells(phase: Phase) -> list[str]:
    wrk = phase.wrk
    return [
        f"{wrk.rps:,.0f}", f"{wrk.p50_ms:.2f}", f"{wrk.p99_ms:.2f}",
        f"{phase.server_cpu_ms:.2f}", f"{phase.store_cpu_ms:.2f}",
        _optional(phase.statements), _optional(phase.transactions), _optional(phase.commands),
        _optional(phase.scripts), str(wrk.errors),
    ]  # fmt: skip


def summary(
    targets: list[tuple[Target, System]],
    overhead: dict[str, dict[str, float]],
    phases: dict[tuple[str, str, int], Phase],
    rss_mb: dict[str, float],
) -> None:
    section("3. Side by side (C=64, JSON unless said)")
    rows = []
    for target, system in targets:
        seq = overhead.get(target.name, {})
        json64, stream64 = (phases.get((target.name, mode, 64)) for mode in MODES)
        cells = [
            f"{seq['json']:+.2f}" if seq else "-",
            f"{seq['stream']:+.2f}" if seq else "-",
        ]
        if json64 is None or stream64 is None:
            cells += ["-"] * 10
        else:
            cells += [f"{json64.wrk.rps:,.0f}", f"{json64.wrk.p50_ms:.2f}",
                      f"{json64.wrk.p99_ms:.2f}", f"{stream64.wrk.p99_ms:.2f}",
                      f"{json64.server_cpu_ms:.2f}", _optional(json64.statements),
                      _optional(json64.transactions), _optional(json64.commands),
                      _optional(json64.scripts)]  # fmt: skip
            cells.append(f"{rss_mb[system.name]:.0f}")
        rows.append([target.name, *cells])
    headers = ["target", "JSON overhead ms", "1st delta overhead ms", "req/s", "p50 ms",
               "p99 ms", "stream p99 ms", "server CPU ms/req", "PG stmts/req",
               "PG xacts/req", "Redis cmds/req", "Redis scripts/req", "RSS MB"]  # fmt: skip
    print(table(headers, rows))
    print("overhead: sequential medians against direct (section 1); RSS: the server's whole")
    print("process tree after the load (Relay: both instances)")


def main(quick: bool) -> None:
    require_tools("production")
    plan = QUICK if quick else FULL
    started, accounting = time.monotonic(), loadgen.cpu_accounting()
    print("# Production topology" + (" (--quick: smoke-run counts)" if quick else ""))
    print("\n".join(gateway.machine()))
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="relay-production-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx's worker runs as another user and reads files in here
        port = peers.free_port()
        nginx = start_nginx(workdir, port)
        stack.callback(nginx.stop)
        upstream = f"http://127.0.0.1:{port}"
        topology = start_topology(stack, workdir, upstream)
        notes += topology.stores.notes
        auth = {"Authorization": f"Bearer {topology.key()}"}
        relay = System("relay", topology.pids, topology.stores.postgres, topology.stores.redis)
        direct = direct_target(upstream)
        targets = [(direct, System("direct", nginx.pids))]
        targets += [
            (responses_target(f"relay store={str(store).lower()}", topology.base, "bench-json",
                              "bench-sse", store=store, headers=auth), relay)
            for store in (False, True)
        ]  # fmt: skip
        servers = {direct.name: nginx, **{t.name: topology.relays[0] for t, _ in targets[1:]}}
        litellm = start_litellm(stack, workdir, upstream, quick, notes)
        if litellm is not None:
            targets.append(litellm[:2])
            servers[litellm[0].name] = litellm[2]
        print(
            f"Relay: {INSTANCES} x `relay serve --workers {WORKERS}` behind nginx; LiteLLM "
            f"{peers.package_version(peers.LITELLM, 'litellm')} --num_workers {WORKERS}",
            flush=True,
        )
        answered, overhead = gateway.run_sequential(
            [t for t, _ in targets], servers, plan.rounds, plan.batch
        )
        kept = [(t, s) for t, s in targets if t in answered]
        phases = run_load(workdir, kept, plan)
        rss_mb = {s.name: peers.memory_kib(s.pids())[0] / 1024 for _, s in kept}
        summary(kept, overhead, phases, rss_mb)
    notes.append(loadgen.machine_share(started, accounting))
    print("\nNotes:\n" + "\n".join(f"- {note}" for note in notes))


def start_litellm(
    stack: ExitStack, workdir: Path, upstream: str, quick: bool, notes: list[str]
) -> tuple[Target, System, peers.ManagedProcess] | None:
    """LiteLLM's proxy with its own Redis, where it installs and starts here."""
    problem = peers.LITELLM.ready(install=not quick)
    if problem is None:
        redis = start_redis("litellm", workdir)
        stack.callback(redis.stop)
        port = peers.free_port()
        try:
            proc = peers.start_litellm(workdir, upstream, port, WORKERS, redis_port=redis.port)
        except RuntimeError as error:
            problem = f"did not start: {str(error)[-600:]}"
        else:
            stack.callback(proc.stop)
            notes.append(LITELLM_NO_DATABASE)
            auth = {"Authorization": f"Bearer {peers.LITELLM_KEY}"}
            target = responses_target("litellm", f"http://127.0.0.1:{port}", "mock-json",
                                      "mock-sse", store=False, headers=auth)  # fmt: skip
            return target, System("litellm", proc.pids, None, redis), proc
    notes.append(f"LiteLLM: {problem}")
    print(f"LiteLLM: {problem}", flush=True)
    return None
