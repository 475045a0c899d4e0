"""`python -m bench store [--quick]`: what a stored response costs, on SQLite and on
PostgreSQL side by side.

1. In one process, on the store itself (no HTTP, no upstream): a non-streaming response's
   save, and a stored stream's writes (its response and run record as it starts, its final
   save, the record's removal). For each: statements, transactions and round trips to the
   database per response, and this process's CPU per response (asyncpg runs on the event
   loop, so its work is in it; SQLite's threads are too) and the median time a response's
   writes take. Rounds alternate between the databases; medians of rounds. PostgreSQL twice:
   as configured, and with `synchronous_commit = off` (its commits not waiting for the WAL's
   flush, as SQLite's with synchronous = NORMAL do not: the durability that trades is in
   docs/benchmarks.md).
2. Through HTTP: one `relay serve --workers 1` on each of the three before the gateway
   benchmark's canned nginx; store=true JSON requests one at a time: the overhead over direct
   nginx (interleaved rounds, as `bench gateway`'s section 1) and the server's CPU per request
   (its process tree's user+system time over a run of sequential requests; PostgreSQL's own
   is not in it). Relay runs from the `relay` of this tree's .venv, with this tree's sources;
   `BENCH_STORE_BASE=<another tree's src folder>` runs that tree's Relays beside them,
   interleaved (a before and after, under the same load).
3. As the database grows: `relay serve` on SQLite (one worker at C=1, two at C=64), wrk's
   store=true JSON runs one after another on the same database: req/s, p50 and p99 of each,
   and the database's size after it. The tail a save's checkpoints and indexes put on
   everything else shows here, not in a fresh database. BENCH_STORE_BASE's tree too, after.

PostgreSQL: a fresh database, dropped at the end, on the server `BENCH_PG_URL` names
(default postgresql://postgres@127.0.0.1:5432/postgres, trust auth).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import make_url

from bench import loadgen, peers
from bench.gateway import responses_target, table
from bench.loadgen import PROMPT
from bench.upstream_nginx import APT_COMMAND, direct_target, missing_tools, start_nginx
from relay.runs.log import RunLog
from relay.storage.database import DRIVER_STATEMENTS
from relay.storage.sql import SqlStore, open_store

TENANT = "bench"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
UNFLUSHED = "PostgreSQL, synchronous_commit off"


@dataclass
class RoundTrips:
    """What went to a database and waited for its answer: each statement, and the BEGIN and
    the COMMIT (or ROLLBACK) of each transaction (none where a connection autocommits, as
    PostgreSQL's do for a single statement)."""

    statements: list[str] = field(default_factory=list)
    transactions: int = 0
    # The statements of `statements` that ran inside an explicit transaction.
    in_transactions: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.statements) + 2 * self.transactions


def in_transaction(conn: Connection) -> bool:
    return conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT"


@contextmanager
def count_round_trips(*engines: Engine | type[Engine]) -> Iterator[RoundTrips]:
    """The round trips to `engines`' database (every engine's: the class) meanwhile."""
    trips = RoundTrips()

    def statement(conn: Connection, _cursor: Any, text: str, *_: Any) -> None:
        trips.statements.append(text)
        if in_transaction(conn):
            trips.in_transactions.append(text)

    def begin(conn: Connection) -> None:
        if in_transaction(conn):
            trips.transactions += 1

    for engine in engines:
        event.listen(engine, "before_cursor_execute", statement)
        event.listen(engine, "begin", begin)
    # And those sent past SQLAlchemy (a save on PostgreSQL), each its own transaction.
    DRIVER_STATEMENTS.append(trips.statements.append)
    try:
        yield trips
    finally:
        DRIVER_STATEMENTS.remove(trips.statements.append)
        for engine in engines:
            event.remove(engine, "before_cursor_execute", statement)
            event.remove(engine, "begin", begin)


def turn(response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A finished response shaped like the gateway benchmark's answers, and its input."""
    input_items = [
        {
            "id": f"msg_{response_id}_in",
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": PROMPT}],
        }
    ]
    output = [
        {
            "id": f"msg_{response_id}_out",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": "Hello! How can I help?", "annotations": []}
            ],
        }
    ]
    response = {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": "bench-json",
        "previous_response_id": None,
        "output": output,
        "usage": {"input_tokens": 12, "output_tokens": 7, "total_tokens": 19},
        "store": True,
        "metadata": {},
    }
    return response, input_items


async def save(store: SqlStore, _runs: RunLog) -> None:
    await store.save_response(TENANT, *turn(f"resp_{secrets.token_hex(12)}"))


async def stream(store: SqlStore, runs: RunLog) -> None:
    response, input_items = turn(f"resp_{secrets.token_hex(12)}")
    started = {**response, "status": "in_progress", "output": []}
    await runs.begin(TENANT, started, [], background=False)
    await store.save_response(TENANT, response, input_items)
    await runs.end(response["id"])


async def measure(stores: dict[str, SqlStore], count: int, rounds: int) -> list[list[str]]:
    logs = {name: RunLog(store, 30, stopping=asyncio.Event()) for name, store in stores.items()}
    rows = []
    for label, writes in (("JSON save", save), ("stored stream", stream)):
        cpu: dict[str, list[float]] = {name: [] for name in stores}
        wall: dict[str, list[float]] = {name: [] for name in stores}
        trips: dict[str, RoundTrips] = {}
        for _ in range(rounds):
            for name, store in stores.items():
                for _ in range(count // 10):  # warm: pools, prepared statements
                    await writes(store, logs[name])
                spent = time.process_time()
                with count_round_trips(*store.db.engines) as trips[name]:
                    for _ in range(count):
                        started = time.perf_counter()
                        await writes(store, logs[name])
                        wall[name].append(time.perf_counter() - started)
                cpu[name].append((time.process_time() - spent) * 1000 / count)
        for name, store in stores.items():
            last = trips[name]  # the last round's
            rows.append(
                [
                    f"{label}, {name}",
                    f"{len(last.statements) / count:.1f}",
                    f"{last.transactions / count:.1f}",
                    # SQLite's are calls within the process, not round trips.
                    f"{last.count / count:.1f}" if store.dialect == "postgresql" else "-",
                    f"{statistics.median(cpu[name]):.3f}",
                    f"{statistics.median(wall[name]) * 1000:.3f}",
                ]
            )
    return rows


async def run(quick: bool) -> None:
    server = make_url(os.environ.get("BENCH_PG_URL", DEFAULT_SERVER))
    admin = await asyncpg.connect(
        host=server.host, port=server.port, user=server.username, database=server.database
    )
    names = [f"relay_bench_{secrets.token_hex(6)}" for _ in range(2)]
    for name in names:
        await admin.execute(f'CREATE DATABASE "{name}"')
    # SQLite's WAL mode with synchronous = NORMAL does not flush at commit; PostgreSQL waits
    # for its WAL's flush unless told not to (docs/benchmarks.md says what that trades).
    await admin.execute(f'ALTER DATABASE "{names[1]}" SET synchronous_commit = off')
    pg_url, unflushed_url = (
        server.set(drivername="postgresql+asyncpg", database=name).render_as_string(
            hide_password=False
        )
        for name in names
    )
    stores: dict[str, SqlStore] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="relay-bench-store-") as tmp:
            try:
                stores["SQLite"] = await open_store(f"sqlite:///{tmp}/relay.db")
                stores["PostgreSQL"] = await open_store(pg_url)
                stores[UNFLUSHED] = await open_store(unflushed_url)
                rows = await measure(stores, *((50, 2) if quick else (400, 5)))
            finally:
                for store in stores.values():
                    await store.close()
        headers = ["per stored response", "statements", "transactions", "round trips"]
        headers += ["CPU ms", "wall ms (median)"]
        print("\n## The store path: what a stored response costs the store\n")
        print(table(headers, rows), flush=True)
        missing = missing_tools()
        if missing:
            print(f"\n(through HTTP needs {' and '.join(missing)}; run:\n  {APT_COMMAND})")
        else:
            await asyncio.to_thread(served, {"PostgreSQL": pg_url, UNFLUSHED: unflushed_url}, quick)
            await asyncio.to_thread(growing, quick)
    finally:
        for name in names:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def trees() -> dict[str, str]:
    """The Relay sources to serve, by label: this tree's, and BENCH_STORE_BASE's beside it."""
    own = str(peers.ROOT / "src")
    base = os.environ.get("BENCH_STORE_BASE")
    return {"": own} if not base else {"base, ": str(Path(base).resolve()), "change, ": own}


@contextmanager
def canned_upstream() -> Iterator[tuple[Path, str]]:
    """A folder for the run, and the URL of the canned nginx upstream serving from it."""
    with tempfile.TemporaryDirectory(prefix="relay-bench-store-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)  # nginx's worker reads files in here
        port = peers.free_port()
        nginx = start_nginx(workdir, port)
        try:
            yield workdir, f"http://127.0.0.1:{port}"
        finally:
            nginx.stop()


def served(pg_urls: dict[str, str], quick: bool) -> None:
    """Section 2 (the module's docstring), on SQLite and the PostgreSQL databases named."""
    rounds, count = (4, 100) if quick else (20, 1000)
    chunks = 10  # CPU runs alternate between the Relays, `count // chunks` requests at a time
    with canned_upstream() as (workdir, upstream), ExitStack() as stack:
        relays: dict[str, peers.ManagedProcess] = {}
        targets = [direct_target(upstream)]
        for tree, src in trees().items():
            for database, database_url in {"SQLite": None, **pg_urls}.items():
                name = f"{tree}{database}"
                relay_port = peers.free_port()
                relay = peers.start_relay(
                    workdir / f"relay-{len(relays)}", upstream, relay_port, 1,
                    database=database_url, anthropic=False, env={"PYTHONPATH": src},
                )  # fmt: skip
                stack.callback(relay.stop)
                base = f"http://127.0.0.1:{relay_port}"
                targets.append(responses_target(name, base, "bench-json", "bench-sse", store=True))
                relays[name] = relay
        medians, failures = loadgen.sequential(targets, rounds, 10, loadgen.request_once)
        if failures:
            raise RuntimeError(f"failed: {failures}")
        spent = dict.fromkeys(relays, 0.0)
        with loadgen.client() as http:
            for _ in range(chunks):
                for target in targets[1:]:
                    pids = relays[target.name].pids()
                    before = peers.cpu_seconds(pids)
                    for _ in range(count // chunks):
                        loadgen.request_once(http, target)
                    spent[target.name] += peers.cpu_seconds(pids) - before
    direct = medians[targets[0].name]
    rows = []
    for name in relays:
        overhead = statistics.median(a - b for a, b in zip(medians[name], direct, strict=True))
        cpu = spent[name] * 1000 / count
        rows.append([f"store=true JSON, {name}", f"{overhead * 1000:+.3f}", f"{cpu:.3f}"])
    print(f"\n## Through HTTP: one worker, {rounds} rounds of 10; CPU over {count} requests\n")
    print(table(["relay", "overhead ms", "server CPU ms/req"], rows))


def growing(quick: bool) -> None:
    """Section 3 (the module's docstring)."""
    runs, seconds = (2, 2) if quick else (4, 5)
    rows: list[list[str]] = []
    with canned_upstream() as (workdir, upstream):
        for connections, workers in ((1, 1), (64, 2)):
            for tree, src in trees().items():
                folder = workdir / f"relay-{len(rows)}"
                relay_port = peers.free_port()
                relay = peers.start_relay(
                    folder, upstream, relay_port, workers, anthropic=False,
                    env={"PYTHONPATH": src},
                )  # fmt: skip
                base = f"http://127.0.0.1:{relay_port}"
                target = responses_target("relay", base, "bench-json", "bench-sse", store=True)
                try:
                    for run in range(1, runs + 1):
                        done = loadgen.run_wrk(workdir, target, connections, seconds)
                        size = (folder / "relay.db").stat().st_size / 1e6
                        label = f"C={connections}, {tree}run {run}"
                        numbers = f"{done.rps:,.0f} {done.p50_ms:.2f} {done.p99_ms:.1f} {size:.0f}"
                        rows.append([label, *numbers.split()])
                finally:
                    relay.stop()
    print(f"\n## As the database grows: SQLite, store=true JSON, wrk runs of {seconds} s\n")
    print(table(["relay", "req/s", "p50 ms", "p99 ms", "database MB"], rows))


def main(quick: bool) -> None:
    asyncio.run(run(quick))
