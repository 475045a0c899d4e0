"""`python -m bench search [--quick]`: what searching a big project's responses costs.

One project of 20,000 stored responses (2,000 with --quick), each with an input and an output
message of a few hundred characters, every 100th with a metadata ticket, sessions of 50
responses; in a SQLite file and, when one answers at $BENCH_PG_URL (default: the local server
as `postgres`), in a fresh PostgreSQL database. Each search is the admin API's first page (50
responses, with their costs), read through `Admin.list_responses` (the HTTP layer adds the
same for every search); the median of 7 runs after one warm-up. The rare match is the oldest
response: a bounded search reads its whole window and stops.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import statistics
import tempfile
import time
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from bench.gateway import table
from relay.access.admin import Admin
from relay.access.listing import SEARCH_WINDOW, Cursor, ResponseSearch
from relay.storage.sql import SqlStore, open_store

TENANT = "proj_bench"
PAGE = 50
RUNS = 7
WORDS = [
    *("alpha", "bravo", "charlie", "delta", "echo", "foxtrot"),
    *("golf", "hotel", "india", "juliet", "kilo", "lima"),
]
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")


def _response(n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    text = " ".join(WORDS[(n + i) % len(WORDS)] for i in range(40))
    said = f"needle-{n} " + text if n == 0 else text  # the one rare text: the oldest response
    response_id = f"resp_{n:048x}"
    output = [
        {
            "id": f"msg_{n:048x}",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text * 2, "annotations": []}],
        }
    ]
    response = {
        "id": response_id,
        "object": "response",
        "created_at": 1_700_000_000 + n,
        "status": "completed",
        "model": "gpt-bench",
        "previous_response_id": f"resp_{n - 1:048x}" if n % 50 else None,
        "output": output,
        "metadata": {"ticket": f"T-{n}"} if n % 100 == 0 else {},
        "session_id": f"session-{n // 50}",
    }
    said_item = {
        "id": f"in_{n:048x}",
        "type": "message",
        "role": "user",
        "content": [{"type": "input_text", "text": said}],
    }
    return response, [said_item]


async def _fill(store: SqlStore, count: int) -> None:
    batch = 200  # saved together, as many requests would be
    for start in range(0, count, batch):
        saves = range(start, min(count, start + batch))
        await asyncio.gather(*(store.save_response(TENANT, *_response(n)) for n in saves))
    if store.dialect == "postgresql":  # as autovacuum would have, in a database in use
        await store.db.write(lambda conn: conn.exec_driver_sql("ANALYZE"))


async def _searches(store: SqlStore, count: int) -> list[list[str]]:
    admin = Admin(store.db)
    searches = {
        "no filter": ResponseSearch(),
        "session_id (index)": ResponseSearch(session_id=f"session-{count // 100}"),
        "previous_response_id (index)": ResponseSearch(
            previous_response_id=f"resp_{count // 2:048x}"
        ),
        "metadata: only the oldest": ResponseSearch(metadata=(("ticket", "T-0"),)),
        "metadata: none": ResponseSearch(metadata=(("ticket", "none"),)),
        "text: only the oldest": ResponseSearch(text="needle-0"),
        "text: in every response": ResponseSearch(text="Charlie Delta"),
        "text: none": ResponseSearch(text="zulu"),
    }
    rows = []
    for name, search in searches.items():
        timings = []
        for run in range(RUNS + 1):
            began = time.perf_counter()
            listed = await admin.list_responses(TENANT, Cursor(), PAGE, search)
            if run:
                timings.append((time.perf_counter() - began) * 1000)
        rows.append([name, str(len(listed["data"])), f"{statistics.median(timings):.1f}"])
    return rows


async def _run(url: str, count: int) -> list[list[str]]:
    store = await open_store(url)
    try:
        await _fill(store, count)
        return await _searches(store, count)
    finally:
        await store.close()


async def _postgres(count: int) -> list[list[str]] | None:
    server = make_url(PG_URL)
    try:
        admin = await asyncpg.connect(
            host=server.host,
            port=server.port or 5432,
            user=server.username,
            database=server.database,
            timeout=5,
        )
    except (OSError, asyncpg.PostgresError) as error:
        print(f"PostgreSQL skipped: {PG_URL} does not answer ({error})")
        return None
    name = "bench_search_" + secrets.token_hex(4)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        return await _run(server.set(database=name).render_as_string(hide_password=False), count)
    finally:
        await admin.execute(f"DROP DATABASE {name}")
        await admin.close()


def main(quick: bool = False) -> None:
    count = 2000 if quick else 20_000
    with tempfile.TemporaryDirectory() as folder:
        sqlite = asyncio.run(_run(f"sqlite:///{folder}/relay.db", count))
    postgres = asyncio.run(_postgres(count))
    print(f"\n## Searching responses: one project of {count:,} responses, first page of {PAGE}")
    print(f"(search window: {SEARCH_WINDOW:,} responses a page)\n")
    headers = ["search", "shown", "SQLite ms"] + (["PostgreSQL ms"] if postgres else [])
    rows = [[*row, *([postgres[index][2]] if postgres else [])] for index, row in enumerate(sqlite)]
    print(table(headers, rows))
