"""`python -m bench keyed`: what a database key with limits and a budget costs on PostgreSQL.

Two `relay serve --workers 1` on one PostgreSQL server (a fresh database each, dropped at the
end; $BENCH_POSTGRES, default postgresql://postgres@127.0.0.1:5432), both in front of the canned
nginx upstream at a price, so that every response has a cost: one without keys, and one whose
requests carry a database key of a project with every limit and budget on (requests, tokens and
concurrency per minute, daily and monthly budgets, a credit; all high enough never to bind, so
every request pays for every check), limits counted in-process. Interleaved rounds of
sequential store=false JSON requests: each relay's CPU time (its process tree, from /proc) per
request, and its median latency.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

from bench import loadgen, peers
from bench.keyed_relay import provision
from bench.upstream_nginx import start_nginx
from relay.access.spend_view import MIN_SAMPLE_S

SERVER = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
POLICY = {
    "rpm": 100_000_000,
    "tpm": 1_000_000_000_000,
    "max_concurrent": 100_000,
    "daily_budget_usd": 1_000_000,
    "monthly_budget_usd": 1_000_000,
    "credit_usd": 1_000_000,
}
WARM_UP_S = 2 * MIN_SAMPLE_S + 1.0
PRICE = "{ input = 3.0, output = 15.0 }"  # US$ per million tokens


async def _admin_sql(sql: str) -> None:
    connection = await asyncpg.connect(f"{SERVER}/postgres")
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def _database(stack: ExitStack) -> str:
    """A fresh database on SERVER, dropped when `stack` closes; its SQLAlchemy URL."""
    name = f"relay_bench_{secrets.token_hex(4)}"
    asyncio.run(_admin_sql(f'CREATE DATABASE "{name}"'))
    stack.callback(lambda: asyncio.run(_admin_sql(f'DROP DATABASE "{name}" WITH (FORCE)')))
    return SERVER.replace("postgresql://", "postgresql+asyncpg://", 1) + f"/{name}"


def _relay(
    stack: ExitStack, workdir: Path, upstream: str, settings: list[str]
) -> tuple[str, peers.ManagedProcess]:
    port = peers.free_port()
    relay = peers.start_relay(
        workdir,
        upstream,
        port,
        1,
        database=_database(stack),
        route_settings=[f"price = {PRICE}"],
        settings=settings,
        anthropic=False,
    )
    stack.callback(relay.stop)
    return f"http://127.0.0.1:{port}", relay


def main(quick: bool) -> None:
    rounds, batch = (3, 20) if quick else (20, 100)
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="relay-keyed-")))
        nginx_port = peers.free_port()
        stack.callback(start_nginx(workdir, nginx_port).stop)
        upstream = f"http://127.0.0.1:{nginx_port}"
        admin_key = "adm-" + secrets.token_urlsafe(16)
        keyless, keyless_relay = _relay(stack, workdir / "keyless", upstream, [])
        admin = ["", "[[admin_keys]]", f'key = "{admin_key}"']
        keyed, keyed_relay = _relay(stack, workdir / "keyed", upstream, admin)
        key = provision(keyed, admin_key, POLICY)
        body = {"model": "bench-json", "input": loadgen.PROMPT, "store": False}
        targets = [
            (loadgen.Target("keyless", f"{keyless}/v1/responses", body), keyless_relay),
            (
                loadgen.Target(
                    "keyed",
                    f"{keyed}/v1/responses",
                    body,
                    headers={"Authorization": f"Bearer {key}"},
                ),
                keyed_relay,
            ),
        ]
        cpu = {target.name: 0.0 for target, _ in targets}
        latency: dict[str, list[float]] = {target.name: [] for target, _ in targets}
        clients = {target.name: stack.enter_context(loadgen.client()) for target, _ in targets}
        # Warm-up, not kept: long enough for the keyed relay's spend views to measure their
        # counters' rate (relay.access.spend_view: until then, for MIN_SAMPLE_S after a
        # counter's first read in a process, every budget check reads the database), so that
        # the rounds measure the steady state.
        for target, _ in targets:
            started = time.monotonic()
            while time.monotonic() - started < WARM_UP_S:
                loadgen.request_once(clients[target.name], target)
        # One target's batch at a time, its CPU read around its own requests; the first
        # round warms up too and is not kept.
        for number in range(1 + rounds):
            for target, relay in targets:
                pids = relay.pids()
                before = peers.cpu_seconds(pids)
                http = clients[target.name]
                values = [loadgen.request_once(http, target) for _ in range(batch)]
                if number:
                    cpu[target.name] += peers.cpu_seconds(pids) - before
                    latency[target.name].append(statistics.median(values))
        count = rounds * batch
        print(f"{rounds} interleaved rounds of {batch} sequential store=false JSON requests")
        print(f"{'relay':10} {'CPU ms/request':>15} {'latency p50 ms':>15}")
        for name, seconds in cpu.items():
            print(
                f"{name:10} {seconds * 1000 / count:15.3f} {loadgen.median_ms(latency[name]):15.3f}"
            )
        difference = (cpu["keyed"] - cpu["keyless"]) * 1000 / count
        print(f"keyed - keyless: {difference:+.3f} ms of CPU a request")
