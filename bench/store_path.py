"""`python -m bench store [--quick]`: what a stored response costs the store, on SQLite and on
PostgreSQL side by side.

In one process, on the store itself (no HTTP, no upstream): a non-streaming response's save,
and a stored stream's writes (its response and run record as it starts, its final save, the
record's removal). For each: statements, transactions and round trips to the database per
response, and this process's CPU per response (asyncpg runs on the event loop, so its work is
in it; SQLite's threads are too). Rounds alternate between the databases; medians of rounds.

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import make_url

from bench.gateway import table
from bench.loadgen import PROMPT
from relay.runs.log import RunLog
from relay.storage.sql import SqlStore, open_store

TENANT = "bench"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


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
def count_round_trips(engine: Engine | type[Engine]) -> Iterator[RoundTrips]:
    """The round trips to `engine`'s database (every engine's: the class) meanwhile."""
    trips = RoundTrips()

    def statement(conn: Connection, _cursor: Any, text: str, *_: Any) -> None:
        trips.statements.append(text)
        if in_transaction(conn):
            trips.in_transactions.append(text)

    def begin(conn: Connection) -> None:
        if in_transaction(conn):
            trips.transactions += 1

    event.listen(engine, "before_cursor_execute", statement)
    event.listen(engine, "begin", begin)
    try:
        yield trips
    finally:
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


async def measure(sqlite_file: str, pg_url: str, count: int, rounds: int) -> list[list[str]]:
    stores = {
        "SQLite": await open_store(f"sqlite:///{sqlite_file}"),
        "PostgreSQL": await open_store(pg_url),
    }
    logs = {name: RunLog(store, 30, stopping=asyncio.Event()) for name, store in stores.items()}
    rows = []
    try:
        for label, writes in (("JSON save", save), ("stored stream", stream)):
            cpu: dict[str, list[float]] = {name: [] for name in stores}
            trips: dict[str, RoundTrips] = {}
            for _ in range(rounds):
                for name, store in stores.items():
                    for _ in range(count // 10):  # warm: pools, prepared statements
                        await writes(store, logs[name])
                    spent = time.process_time()
                    with count_round_trips(store.db.sync_engine) as trips[name]:
                        for _ in range(count):
                            await writes(store, logs[name])
                    cpu[name].append((time.process_time() - spent) * 1000 / count)
            for name in stores:
                last = trips[name]  # the last round's
                rows.append(
                    [
                        f"{label}, {name}",
                        f"{len(last.statements) / count:.1f}",
                        f"{last.transactions / count:.1f}",
                        # SQLite's are calls within the process, not round trips.
                        f"{last.count / count:.1f}" if name == "PostgreSQL" else "-",
                        f"{statistics.median(cpu[name]):.3f}",
                    ]
                )
    finally:
        for store in stores.values():
            await store.close()
    return rows


async def run(quick: bool) -> None:
    server = make_url(os.environ.get("BENCH_PG_URL", DEFAULT_SERVER))
    admin = await asyncpg.connect(
        host=server.host, port=server.port, user=server.username, database=server.database
    )
    name = f"relay_bench_{secrets.token_hex(6)}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        with tempfile.TemporaryDirectory(prefix="relay-bench-store-") as tmp:
            url = server.set(drivername="postgresql+asyncpg", database=name)
            rows = await measure(
                f"{tmp}/relay.db",
                url.render_as_string(hide_password=False),
                *((50, 2) if quick else (400, 5)),
            )
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    headers = ["per stored response", "statements", "transactions", "round trips", "CPU ms"]
    print("\n## The store path: what a stored response costs the store\n")
    print(table(headers, rows))


def main(quick: bool) -> None:
    asyncio.run(run(quick))
