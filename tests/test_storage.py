"""The SQL store, against SQLite and PostgreSQL alike (see db_fixtures.store_url)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, event, func, select, text

from bench.store_path import count_round_trips
from relay.errors import InvalidRequest, RelayError
from relay.runs.log import RunLog
from relay.storage.base import ItemPage
from relay.storage.database import DRIVER_POOL_SIZE, DRIVER_STATEMENTS, SqliteDatabase
from relay.storage.sql import SqlStore, alembic_config, open_store
from relay.storage.tables import metadata, response_items, responses


def make_turn(
    response_id: str,
    previous: str | None = None,
    *,
    inputs: int = 1,
    outputs: int = 1,
    created_at: int = 1_700_000_000,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A finished response and its own input items, shaped like the engine's."""
    input_items = [
        {
            "id": f"{response_id}_in{n}",
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": f"question {n} of {response_id}"}],
        }
        for n in range(inputs)
    ]
    output = [
        {
            "id": f"{response_id}_out{n}",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": f"answer {n}", "annotations": []}],
        }
        for n in range(outputs)
    ]
    response = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "completed",
        "model": "fake-text",
        "previous_response_id": previous,
        "output": output,
        "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        "metadata": {"unicode": "é ✓ 😀", "nested": {"list": [1, 2.5, None, True]}},
        "store": True,
    }
    return response, input_items


async def save_chain(store: SqlStore, tenant: str, prefix: str, turns: int) -> list[str]:
    ids: list[str] = []
    previous = None
    for n in range(turns):
        response_id = f"{prefix}_{n}"
        response, input_items = make_turn(response_id, previous, created_at=1_700_000_000 + n)
        await store.save_response(tenant, response, input_items)
        ids.append(response_id)
        previous = response_id
    return ids


@contextmanager
def count_statements(store: SqlStore) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    for engine in store.db.engines:
        event.listen(engine, "before_cursor_execute", record)
    DRIVER_STATEMENTS.append(statements.append)  # a save on PostgreSQL, past SQLAlchemy
    try:
        yield statements
    finally:
        DRIVER_STATEMENTS.remove(statements.append)
        for engine in store.db.engines:
            event.remove(engine, "before_cursor_execute", record)


async def count_rows(store: SqlStore, table: Any) -> int:
    def count(conn: Connection) -> int:
        number: int = conn.execute(select(func.count()).select_from(table)).scalar_one()
        return number

    return await store.db.read(count)


def ids(items: list[dict[str, Any]] | None) -> list[str]:
    assert items is not None
    return [item["id"] for item in items]


async def test_save_and_get_roundtrip(store: SqlStore) -> None:
    response, input_items = make_turn("resp_a", inputs=2, outputs=2)
    stored = await store.save_response("acme", response, input_items)

    # What the history cache charges for the items: their stored JSON.
    items = [*input_items, *response["output"]]
    assert stored == sum(len(orjson.dumps(item)) for item in items)
    assert await store.get_response("acme", "resp_a") == response
    assert await store.get_response("acme", "resp_missing") is None
    assert await store.load_context("acme", "resp_a") == [*input_items, *response["output"]]
    found = await store.get_items("acme", ["resp_a_in1", "resp_a_out0", "nope"])
    assert found == {"resp_a_in1": input_items[1], "resp_a_out0": response["output"][0]}
    assert await store.get_items("acme", []) == {}


async def test_response_without_items(store: SqlStore) -> None:
    response, input_items = make_turn("resp_empty", inputs=0, outputs=0)
    assert await store.save_response("acme", response, input_items) == 0

    assert await store.load_context("acme", "resp_empty") == []
    page = await store.list_input_items(
        "acme", "resp_empty", after=None, before=None, limit=20, order="asc"
    )
    assert page == ItemPage(data=[], first_id=None, last_id=None, has_more=False)


async def test_tenant_isolation(store: SqlStore) -> None:
    response, input_items = make_turn("resp_t", inputs=2)
    await store.save_response("acme", response, input_items)

    assert await store.get_response("other", "resp_t") is None
    assert await store.load_context("other", "resp_t") is None
    assert (
        await store.list_input_items(
            "other", "resp_t", after=None, before=None, limit=20, order="asc"
        )
        is None
    )
    assert await store.get_items("other", ["resp_t_in0", "resp_t_out0"]) == {}
    assert await store.delete_response("other", "resp_t") is False
    # Another tenant's continuation cannot reach into acme's chain either.
    theirs, their_inputs = make_turn("resp_theirs", previous="resp_t")
    await store.save_response("other", theirs, their_inputs)
    assert ids(await store.load_context("other", "resp_theirs")) == [
        "resp_theirs_in0",
        "resp_theirs_out0",
    ]
    # The owner still sees everything.
    assert await store.get_response("acme", "resp_t") == response
    assert await store.delete_response("acme", "resp_t") is True


async def test_resave_overwrites(store: SqlStore) -> None:
    response, input_items = make_turn("resp_r", inputs=3, outputs=2)
    await store.save_response("acme", response, input_items)
    again, again_inputs = make_turn("resp_r", inputs=1, outputs=1)
    again["status"] = "incomplete"
    await store.save_response("acme", again, again_inputs)

    assert await store.get_response("acme", "resp_r") == again
    assert ids(await store.load_context("acme", "resp_r")) == ["resp_r_in0", "resp_r_out0"]
    assert await count_rows(store, response_items) == 2
    assert await count_rows(store, responses) == 1

    # The same id under another tenant is refused and changes nothing.
    with pytest.raises(RelayError):
        await store.save_response("other", *make_turn("resp_r", inputs=5))
    assert await store.get_response("acme", "resp_r") == again
    assert await count_rows(store, response_items) == 2


async def test_a_resave_without_inputs_keeps_those_stored(store: SqlStore) -> None:
    """A queued response that ends before it runs (cancelled, or refused upstream) is saved
    again with its new status and no output: the input it was asked with stays."""
    queued, input_items = make_turn("resp_q", inputs=3, outputs=0)
    await store.save_response("acme", queued, input_items)
    ended, _ = make_turn("resp_q", inputs=0, outputs=1)
    ended["status"] = "cancelled"
    await store.save_response("acme", ended, None)

    assert await store.get_response("acme", "resp_q") == ended
    assert ids(await store.load_context("acme", "resp_q")) == [
        "resp_q_in0",
        "resp_q_in1",
        "resp_q_in2",
        "resp_q_out0",
    ]
    page = await store.list_input_items(
        "acme", "resp_q", after=None, before=None, limit=20, order="asc"
    )
    assert page is not None and ids(page.data) == ["resp_q_in0", "resp_q_in1", "resp_q_in2"]


async def test_soft_delete(store: SqlStore) -> None:
    first, second = await save_chain(store, "acme", "resp_d", 2)

    assert await store.delete_response("acme", first) is True
    assert await store.delete_response("acme", first) is False
    assert await store.get_response("acme", first) is None
    assert await store.load_context("acme", first) is None
    assert (
        await store.list_input_items("acme", first, after=None, before=None, limit=5, order="asc")
        is None
    )
    assert await store.get_items("acme", [f"{first}_in0", f"{second}_in0"]) == {
        f"{second}_in0": make_turn(second)[1][0]
    }
    # A deleted ancestor still contributes its items to the conversation that continued it.
    assert ids(await store.load_context("acme", second)) == [
        f"{first}_in0",
        f"{first}_out0",
        f"{second}_in0",
        f"{second}_out0",
    ]
    assert await store.delete_response("acme", "resp_never") is False


async def test_load_context_three_turns(store: SqlStore) -> None:
    one, one_inputs = make_turn("resp_1", inputs=2, outputs=1)
    two, two_inputs = make_turn("resp_2", "resp_1", inputs=1, outputs=3)
    three, three_inputs = make_turn("resp_3", "resp_2", inputs=2, outputs=2)
    # A branch from the first turn must not leak into the main line.
    branch, branch_inputs = make_turn("resp_b", "resp_1")
    for response, input_items in [
        (one, one_inputs),
        (two, two_inputs),
        (branch, branch_inputs),
        (three, three_inputs),
    ]:
        await store.save_response("acme", response, input_items)

    context = await store.load_context("acme", "resp_3")
    assert context == [
        *one_inputs,
        *one["output"],
        *two_inputs,
        *two["output"],
        *three_inputs,
        *three["output"],
    ]
    assert ids(await store.load_context("acme", "resp_2")) == [
        "resp_1_in0",
        "resp_1_in1",
        "resp_1_out0",
        "resp_2_in0",
        "resp_2_out0",
        "resp_2_out1",
        "resp_2_out2",
    ]
    assert ids(await store.load_context("acme", "resp_b")) == [
        "resp_1_in0",
        "resp_1_in1",
        "resp_1_out0",
        "resp_b_in0",
        "resp_b_out0",
    ]


async def test_long_chain_stores_own_items_and_loads_in_bounded_queries(store: SqlStore) -> None:
    short = await save_chain(store, "acme", "resp_short", 5)
    long = await save_chain(store, "acme", "resp_long", 200)

    # Each response stores only its own items: 2 per turn, not the whole history again.
    assert await count_rows(store, response_items) == 2 * (5 + 200)
    assert await count_rows(store, responses) == 205

    with count_statements(store) as short_statements:
        short_context = await store.load_context("acme", short[-1])
    with count_statements(store) as long_statements:
        long_context = await store.load_context("acme", long[-1])

    assert len(short_context or []) == 10
    assert ids(long_context) == [
        f"resp_long_{n}_{kind}0" for n in range(200) for kind in ("in", "out")
    ]
    assert len(short_statements) == len(long_statements) == 1


async def test_save_is_one_transaction_of_at_most_two_statements(store: SqlStore) -> None:
    response, input_items = make_turn("resp_many", inputs=30, outputs=30)
    with count_statements(store) as statements:
        await store.save_response("acme", response, input_items)
    # SQLite: the response row, then every item in one executemany; PostgreSQL: one statement.
    assert len(statements) == (1 if store.dialect == "postgresql" else 2)
    assert await count_rows(store, response_items) == 60


@pytest.mark.postgres
async def test_stored_responses_are_one_round_trip_each_on_postgresql(postgres_url: str) -> None:
    """Each write of a stored response is one statement, its own transaction. Before, a save
    was BEGIN, the response row, its items and COMMIT (4 round trips); a stored stream's
    writes (its response and run record as it starts, its final save, the record's removal)
    were 13 in three transactions."""
    store = await open_store(postgres_url)
    runs = RunLog(store, 30, stopping=asyncio.Event())
    try:
        response, input_items = make_turn("resp_trip", inputs=2, outputs=3)
        with count_round_trips(*store.db.engines) as saved:
            await store.save_response("acme", response, input_items)
        assert (len(saved.statements), saved.count) == (1, 1)
        assert await store.load_context("acme", "resp_trip") == [*input_items, *response["output"]]

        streamed, streamed_inputs = make_turn("resp_trip_stream", inputs=2, outputs=2)
        started = {**streamed, "status": "in_progress", "output": []}
        with count_round_trips(*store.db.engines) as begun:
            await runs.begin("acme", started, [], background=False)
        assert await store.get_response("acme", "resp_trip_stream") == started
        assert await runs.in_flight("resp_trip_stream")
        with count_round_trips(*store.db.engines) as ended:
            await store.save_response("acme", streamed, streamed_inputs)
            await runs.end("resp_trip_stream")
        assert (begun.count, ended.count) == (1, 2)
        assert await store.get_response("acme", "resp_trip_stream") == streamed
        assert ids(await store.load_context("acme", "resp_trip_stream")) == [
            "resp_trip_stream_in0",
            "resp_trip_stream_in1",
            "resp_trip_stream_out0",
            "resp_trip_stream_out1",
        ]
        assert not await runs.in_flight("resp_trip_stream")
    finally:
        await store.close()


async def test_concurrent_saves(store: SqlStore) -> None:
    turns = [make_turn(f"resp_c{n}", inputs=3, outputs=2) for n in range(25)]
    await asyncio.gather(*(store.save_response("acme", *turn) for turn in turns))
    assert await count_rows(store, response_items) == 25 * 5
    loaded = await asyncio.gather(*(store.get_response("acme", f"resp_c{n}") for n in range(25)))
    assert loaded == [response for response, _ in turns]


async def test_get_items_prefers_latest(store: SqlStore) -> None:
    old, _ = make_turn("resp_old", created_at=100)
    new, _ = make_turn("resp_new", created_at=200)
    shared = {"id": "fc_shared", "type": "function_call_output", "call_id": "c", "output": "x"}
    await store.save_response("acme", old, [shared])
    await store.save_response("acme", new, [{**shared, "output": "y"}])
    assert await store.get_items("acme", ["fc_shared", "fc_shared"]) == {
        "fc_shared": {**shared, "output": "y"}
    }


async def page_ids(
    store: SqlStore,
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int = 20,
    order: str = "asc",
) -> tuple[list[str], str | None, str | None, bool]:
    page = await store.list_input_items(
        "acme",
        "resp_p",
        after=after,
        before=before,
        limit=limit,
        order="desc" if order == "desc" else "asc",
    )
    assert page is not None
    return ids(page.data), page.first_id, page.last_id, page.has_more


async def test_list_input_items_pagination(store: SqlStore) -> None:
    response, input_items = make_turn("resp_p", inputs=7, outputs=2)
    await store.save_response("acme", response, input_items)
    item = [f"resp_p_in{n}" for n in range(7)]

    # Everything, both orders; output items are not input items.
    assert await page_ids(store) == (item, item[0], item[6], False)
    assert await page_ids(store, order="desc") == (item[::-1], item[6], item[0], False)
    assert await page_ids(store, limit=7) == (item, item[0], item[6], False)

    # Forward through the pages.
    assert await page_ids(store, limit=3) == (item[0:3], item[0], item[2], True)
    assert await page_ids(store, limit=3, after=item[2]) == (item[3:6], item[3], item[5], True)
    assert await page_ids(store, limit=3, after=item[5]) == ([item[6]], item[6], item[6], False)
    assert await page_ids(store, limit=3, after=item[6]) == ([], None, None, False)

    # Descending: "after" continues downwards.
    assert await page_ids(store, limit=3, order="desc") == (
        [item[6], item[5], item[4]],
        item[6],
        item[4],
        True,
    )
    assert await page_ids(store, limit=3, order="desc", after=item[4]) == (
        [item[3], item[2], item[1]],
        item[3],
        item[1],
        True,
    )
    assert await page_ids(store, limit=3, order="desc", after=item[1]) == (
        [item[0]],
        item[0],
        item[0],
        False,
    )

    # "before" pages back: the items just before the cursor, in the requested order.
    assert await page_ids(store, limit=2, before=item[4]) == (item[2:4], item[2], item[3], True)
    assert await page_ids(store, limit=5, before=item[4]) == (item[0:4], item[0], item[3], False)
    assert await page_ids(store, limit=2, order="desc", before=item[2]) == (
        [item[4], item[3]],
        item[4],
        item[3],
        True,
    )
    assert await page_ids(store, limit=9, order="desc", before=item[2]) == (
        [item[6], item[5], item[4], item[3]],
        item[6],
        item[3],
        False,
    )

    # Both cursors: a window between them.
    assert await page_ids(store, after=item[1], before=item[5]) == (
        item[2:5],
        item[2],
        item[4],
        False,
    )
    assert await page_ids(store, limit=2, after=item[1], before=item[5]) == (
        item[2:4],
        item[2],
        item[3],
        True,
    )
    assert await page_ids(store, order="desc", after=item[5], before=item[1]) == (
        [item[4], item[3], item[2]],
        item[4],
        item[2],
        False,
    )


async def test_list_input_items_rejects_unknown_cursor(store: SqlStore) -> None:
    response, input_items = make_turn("resp_p", inputs=3, outputs=1)
    await store.save_response("acme", response, input_items)

    # An output item is not a cursor into the input items, nor is an unknown id.
    for cursor in ("item_unknown", "resp_p_out0"):
        with pytest.raises(InvalidRequest) as raised:
            await page_ids(store, after=cursor)
        assert raised.value.param == "after"
        with pytest.raises(InvalidRequest) as raised:
            await page_ids(store, before=cursor, order="desc")
        assert raised.value.param == "before"
        with pytest.raises(InvalidRequest) as raised:
            await page_ids(store, after="resp_p_in0", before=cursor)
        assert raised.value.param == "before"
    with pytest.raises(InvalidRequest) as raised:
        await page_ids(store, limit=0)
    assert raised.value.param == "limit"
    # An unknown response is None, whatever the cursor.
    assert (
        await store.list_input_items(
            "acme", "resp_nope", after="x", before=None, limit=5, order="asc"
        )
        is None
    )


async def test_migrations_are_idempotent_and_match_tables(store_url: str) -> None:
    first = await open_store(store_url)
    await first.save_response("acme", *make_turn("resp_m"))
    await first.close()
    second = await open_store(store_url)  # upgrading an up-to-date schema changes nothing
    try:
        assert (await second.get_response("acme", "resp_m")) is not None

        def check(connection: Connection) -> tuple[str | None, list[Any]]:
            context = MigrationContext.configure(connection)
            return context.get_current_revision(), compare_metadata(context, metadata)

        revision, differences = await second.db.read(check)
        assert revision == ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert differences == [], "tables.py and the migrations disagree"
    finally:
        await second.close()


async def test_concurrent_opens_migrate_once(store_url: str) -> None:
    stores = await asyncio.gather(*(open_store(store_url) for _ in range(4)))
    try:
        await stores[0].save_response("acme", *make_turn("resp_x"))
        assert await stores[3].get_response("acme", "resp_x") is not None
    finally:
        await asyncio.gather(*(opened.close() for opened in stores))


async def test_opens_on_other_threads_migrate_once(store_url: str) -> None:
    """Servers in other threads run their own event loops; their migrations take turns too."""

    async def open_and_close() -> None:
        opened = await open_store(store_url)
        await opened.close()

    threads = [asyncio.to_thread(asyncio.run, open_and_close()) for _ in range(3)]
    await asyncio.gather(*threads, open_and_close())


async def test_migrations_of_different_databases_take_turns(tmp_path: Path) -> None:
    """No database lock orders these: only the process's own, which keeps Alembic's module-global
    migration context from serving two migrations at once."""

    async def open_and_close(name: str) -> None:
        opened = await open_store(f"sqlite+aiosqlite:///{tmp_path}/{name}.db")
        await opened.close()

    here = [open_and_close(f"loop{n}") for n in range(3)]
    threads = [asyncio.to_thread(asyncio.run, open_and_close(f"thread{n}")) for n in range(2)]
    await asyncio.gather(*here, *threads)


# Imports first, says so, then opens the store when told to: the processes race for real.
_OPEN_WHEN_TOLD = """
import asyncio, sys
from relay.storage.sql import open_store

async def main() -> None:
    print("ready", flush=True)
    sys.stdin.readline()
    opened = await open_store(sys.argv[1])
    await opened.close()

asyncio.run(main())
"""


async def test_processes_starting_together_migrate_once(store_url: str) -> None:
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _OPEN_WHEN_TOLD,
            store_url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(3)
    ]
    for process in processes:
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ready\n"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        await process.stdin.drain()
    for process in processes:
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, stderr.decode()
    opened = await open_store(store_url)
    try:
        await opened.save_response("acme", *make_turn("resp_x"))
        assert await opened.get_response("acme", "resp_x") is not None
    finally:
        await opened.close()


async def test_sqlite_file_setup(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "relay.db"
    opened = await open_store(f"sqlite:///{path}")
    try:
        assert path.is_file()

        def pragmas(conn: Connection) -> tuple[Any, Any]:
            mode = conn.execute(text("PRAGMA journal_mode")).scalar()
            return mode, conn.execute(text("PRAGMA busy_timeout")).scalar_one()

        mode, busy_timeout = await opened.db.read(pragmas)
        assert mode == "wal"
        assert busy_timeout >= 1000
    finally:
        await opened.close()


async def test_sqlite_open_waits_while_another_connection_writes(tmp_path: Path) -> None:
    """SQLite refuses to switch a file to WAL while another connection holds the write lock, at
    once, without waiting out the busy timeout; open_store must wait for its turn all the same."""
    path = tmp_path / "relay.db"
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process's migration, say
        opening = asyncio.create_task(open_store(f"sqlite:///{path}"))
        await asyncio.sleep(0.3)
        assert not opening.done()
        holder.execute("COMMIT")
    finally:
        holder.close()
    opened = await opening
    try:
        mode = await opened.db.read(lambda conn: conn.execute(text("PRAGMA journal_mode")).scalar())
        assert mode == "wal"
        await opened.save_response("acme", *make_turn("resp_w"))
    finally:
        await opened.close()


async def test_sqlite_in_memory() -> None:
    opened = await open_store("sqlite://")
    try:
        await opened.save_response("acme", *make_turn("resp_mem"))
        assert ids(await opened.load_context("acme", "resp_mem")) == [
            "resp_mem_in0",
            "resp_mem_out0",
        ]
    finally:
        await opened.close()


async def test_sqlite_writes_queue_behind_other_processes(tmp_path: Path) -> None:
    """Writers of different processes take turns on an advisory file lock (flock locks belong
    to an open file description, so a second descriptor here conflicts like another process)."""
    path = tmp_path / "relay.db"
    opened = await open_store(f"sqlite:///{path}")
    try:
        other = os.open(f"{path}.write-lock", os.O_RDWR)
        try:
            fcntl.flock(other, fcntl.LOCK_EX)
            saving = asyncio.create_task(opened.save_response("acme", *make_turn("resp_q")))
            await asyncio.sleep(0.3)
            assert not saving.done()
            # Reads never wait for the writer.
            assert await opened.get_response("acme", "resp_q") is None
            fcntl.flock(other, fcntl.LOCK_UN)
        finally:
            os.close(other)
        await asyncio.wait_for(saving, 10)
        assert await opened.get_response("acme", "resp_q") is not None
    finally:
        await opened.close()


@pytest.mark.postgres
async def test_postgresql_saves_go_past_sqlalchemy_and_their_connections_count(
    postgres_url: str,
) -> None:
    """A save on PostgreSQL runs on asyncpg's own pool (no reset query on release), and the
    connections gauge counts that pool's beside SQLAlchemy's."""
    store = await open_store(postgres_url)
    try:
        before = store.db.connections()
        assert before is not None
        await store.save_response("acme", *make_turn("resp_driver"))
        after = store.db.connections()
        # The driver pool's connections, all opened with the first save.
        assert after is not None and sum(after) == sum(before) + DRIVER_POOL_SIZE
        assert await store.get_response("acme", "resp_driver") is not None
        # A resave under another tenant writes nothing, and says so.
        with pytest.raises(RelayError, match="another tenant"):
            await store.save_response("other", *make_turn("resp_driver"))
    finally:
        await store.close()


async def test_sqlite_small_writes_run_on_the_loop_when_nothing_waits(tmp_path: Path) -> None:
    """A save (`write_awaited`) runs on the event loop, with the writer's settings, when no
    write is queued and the locks are free: no hop to the writer thread and back."""
    opened = await open_store(f"sqlite:///{tmp_path / 'relay.db'}")
    try:

        def where(conn: Connection) -> tuple[str, Any, Any]:
            foreign_keys = conn.execute(text("PRAGMA foreign_keys")).scalar()
            synchronous = conn.execute(text("PRAGMA synchronous")).scalar()
            return threading.current_thread().name, foreign_keys, synchronous

        assert await opened.db.write_awaited(where) == ("MainThread", 1, 1)  # 1: NORMAL
        await opened.save_response("acme", *make_turn("resp_inline"))
        assert await opened.get_response("acme", "resp_inline") is not None
    finally:
        await opened.close()


async def test_sqlite_small_writes_keep_the_order_of_queued_ones(tmp_path: Path) -> None:
    opened = await open_store(f"sqlite:///{tmp_path / 'relay.db'}")
    ran: list[tuple[str, str]] = []

    def slow(conn: Connection) -> None:
        time.sleep(0.2)
        ran.append(("queued", threading.current_thread().name))

    def small(conn: Connection) -> None:
        ran.append(("small", threading.current_thread().name))

    try:
        queued = asyncio.create_task(opened.db.write(slow))
        await asyncio.sleep(0.05)  # handed to the writer thread, which is in it
        await opened.db.write_awaited(small)
        await queued
        assert [what for what, _ in ran] == ["queued", "small"]
        assert all(thread.startswith("relay-sqlite-writer") for _, thread in ran)
    finally:
        await opened.close()


async def test_sqlite_small_writes_sqlite_refuses_wait_on_the_thread(tmp_path: Path) -> None:
    """Another connection holding SQLite's write lock (a process that does not take the file
    lock, such as the sqlite3 shell): the loop's attempt is refused at once, rolled back, and
    the save waits on the writer thread, the loop free meanwhile; it is written once."""
    path = tmp_path / "relay.db"
    opened = await open_store(f"sqlite:///{path}")
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        saving = asyncio.create_task(opened.save_response("acme", *make_turn("resp_busy")))
        ticks = 0
        for _ in range(10):
            await asyncio.sleep(0.02)
            ticks += 1
        assert ticks == 10 and not saving.done()
        holder.execute("COMMIT")
        await asyncio.wait_for(saving, 10)
        assert await count_rows(opened, responses) == 1
        assert await count_rows(opened, response_items) == 2
    finally:
        holder.close()
        await opened.close()


_SAVE_MANY = """
import asyncio, sys
sys.path.insert(0, sys.argv[3])
from relay.storage.sql import open_store
from test_storage import make_turn

async def main() -> None:
    opened = await open_store(sys.argv[1])
    try:
        await asyncio.gather(*(
            opened.save_response("acme", *make_turn(f"resp_{sys.argv[2]}_{n}", inputs=2))
            for n in range(60)
        ))
    finally:
        await opened.close()

asyncio.run(main())
"""


async def test_sqlite_processes_write_concurrently(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    await (await open_store(url)).close()
    here = str(Path(__file__).parent)
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _SAVE_MANY, url, name, here, stderr=asyncio.subprocess.PIPE
        )
        for name in ("a", "b", "c")
    ]
    for process in processes:
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, stderr.decode()
    opened = await open_store(url)
    try:
        assert await count_rows(opened, responses) == 180
        assert await count_rows(opened, response_items) == 180 * 3
    finally:
        await opened.close()


async def test_sqlite_lookups_on_the_loop_never_wait_there(tmp_path: Path) -> None:
    """is_visible runs on the event loop when SQLite answers at once. When it cannot, it must
    not wait there: it goes to a reader thread. A WAL reader is almost never refused, so the
    loop's connection is pointed at a file another connection holds exclusively."""
    path = tmp_path / "relay.db"
    opened = await open_store(f"sqlite:///{path}")
    blocker_path = tmp_path / "held.db"
    holder = sqlite3.connect(blocker_path, isolation_level=None)
    try:
        await opened.save_response("acme", *make_turn("resp_v"))
        assert await opened.is_visible("acme", "resp_v")
        assert not await opened.is_visible("other", "resp_v")
        holder.execute("CREATE TABLE responses (id TEXT)")
        holder.execute("BEGIN EXCLUSIVE")
        db = opened.db
        assert isinstance(db, SqliteDatabase)
        db._inline = create_engine(f"sqlite:///{blocker_path}", connect_args={"timeout": 0})
        # SQLite refuses the loop's connection at once (no busy timeout there); a reader thread
        # answers from the real file.
        assert await opened.is_visible("acme", "resp_v")
    finally:
        holder.close()
        await opened.close()


async def test_0011_takes_the_session_id_out_of_stored_bodies(store_url: str) -> None:
    """Responses stored before 0011 have their session_id in their body only: the migration
    copies it into the column that lists a session's responses."""
    store = await open_store(store_url)
    try:
        response, items = make_turn("resp_s")
        await store.save_response("acme", {**response, "session_id": "sess-1"}, items)
        await store.save_response("acme", *make_turn("resp_n"))

        def migrate(connection: Connection, target: str, up: bool) -> None:
            config = alembic_config()
            config.attributes["connection"] = connection
            (command.upgrade if up else command.downgrade)(config, target)

        await store.db.write(lambda conn: migrate(conn, "0010", up=False))
        await store.db.write(lambda conn: migrate(conn, "head", up=True))
        query = select(responses.c.id, responses.c.session_id).order_by(responses.c.id)
        rows = await store.db.read(lambda conn: conn.execute(query).all())
        assert [tuple(row) for row in rows] == [("resp_n", None), ("resp_s", "sess-1")]
    finally:
        await store.close()
