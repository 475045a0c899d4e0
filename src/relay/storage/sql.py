"""The Store, on SQLAlchemy Core (async): one implementation for SQLite (aiosqlite) and
PostgreSQL (asyncpg).

Every statement is built once, at import, with bound parameters, so SQLAlchemy compiles each
once per dialect and the hot path only binds values. A save is one transaction of two
statements (the response row, then all its items in one executemany); a read is one query
(two for a page of input items).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Connection,
    Integer,
    bindparam,
    delete,
    event,
    insert,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, StaticPool

from relay.errors import InvalidRequest, ServerError
from relay.storage.base import ItemPage, Store
from relay.storage.tables import response_items as items
from relay.storage.tables import responses

MIGRATIONS = Path(__file__).with_name("migrations")
# Guards the recursive walk against a cycle in previous_response_id, which Relay never writes.
_MAX_DEPTH = 100_000
# Key of the PostgreSQL advisory lock that serialises migrations of processes starting together.
_MIGRATION_LOCK = 7_366_100_261_625_119_076
_POSITION_MAX = 2**31 - 1
_BUSY_TIMEOUT_MS = 10_000
# Serialises migrations within this process (the advisory lock or BEGIN IMMEDIATE serialises
# processes); see _migration_turn.
_MIGRATING = threading.Lock()
_LOCK_POLL_S = 0.01


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


# --- statements ------------------------------------------------------------------------------

_visible = (
    responses.c.id == bindparam("rid"),
    responses.c.tenant == bindparam("t"),
    responses.c.deleted_at.is_(None),
)

_GET_BODY = select(responses.c.body).where(*_visible)

_SOFT_DELETE = update(responses).where(*_visible).values(deleted_at=bindparam("now"))

# A resave overwrites the row; the SET clause comes from the parameters given. deleted_at is
# kept: a deleted response stays deleted.
_UPDATE_RESPONSE = (
    update(responses)
    .where(responses.c.id == bindparam("rid"), responses.c.tenant == bindparam("t"))
    .returning(responses.c.id)
)

_DELETE_ITEMS = delete(items).where(items.c.response_id == bindparam("rid"))

_INSERT_ITEMS = insert(items)


def _context_query() -> Any:
    """The chain ending at :rid, walked through previous_response_id by a recursive CTE, joined
    to its items: oldest response first, inputs before outputs, by position. One query.

    Only the last response must be visible. Ancestors that were soft-deleted still contribute
    their items: a soft delete hides a response from the API, it does not rewrite the
    conversations that continued from it. The outer join keeps a response that has no items,
    so an empty result means exactly "not visible"."""
    anchor = select(
        responses.c.id,
        responses.c.previous_response_id,
        literal_column("0", Integer).label("depth"),
    ).where(*_visible)
    chain = anchor.cte("chain", recursive=True)
    parent = responses.alias("parent")
    chain = chain.union_all(
        select(
            parent.c.id,
            parent.c.previous_response_id,
            (chain.c.depth + literal_column("1", Integer)).label("depth"),
        ).where(
            parent.c.id == chain.c.previous_response_id,
            parent.c.tenant == bindparam("t"),
            chain.c.depth < literal_column(str(_MAX_DEPTH), Integer),
        )
    )
    # No tenant test on items: the chain is the tenant's already, and a test there leads
    # SQLite to the (tenant, item_id) index instead of the primary key.
    joined = chain.outerjoin(items, items.c.response_id == chain.c.id)
    return (
        select(items.c.item)
        .select_from(joined)
        # 'input' sorts before 'output' in every collation.
        .order_by(chain.c.depth.desc(), items.c.kind, items.c.position)
    )


_CONTEXT = _context_query()


def _cursor_position(name: str) -> Any:
    return (
        select(items.c.position)
        .where(
            items.c.response_id == responses.c.id,
            items.c.kind == "input",
            items.c.item_id == bindparam(name),
        )
        .order_by(items.c.position)
        .limit(1)
        .scalar_subquery()
    )


# One row when the response is visible: the positions of the cursors (NULL when not found).
_CURSORS = select(_cursor_position("after"), _cursor_position("before")).where(*_visible)


def _page_query(descending: bool) -> Any:
    position = items.c.position
    return (
        select(items.c.item)
        .where(
            # The response was found visible to the tenant (_CURSORS) on this connection.
            items.c.response_id == bindparam("rid"),
            items.c.kind == "input",
            position > bindparam("lo"),
            position < bindparam("hi"),
        )
        .order_by(position.desc() if descending else position.asc())
        .limit(bindparam("n", type_=Integer))
    )


_PAGE = {False: _page_query(False), True: _page_query(True)}

_GET_ITEMS = (
    select(items.c.item_id, items.c.item)
    .join(responses, responses.c.id == items.c.response_id)
    .where(
        items.c.tenant == bindparam("t"),
        items.c.item_id.in_(bindparam("ids", expanding=True)),
        responses.c.tenant == bindparam("t"),
        responses.c.deleted_at.is_(None),
    )
    .order_by(responses.c.created_at, items.c.kind, items.c.position)
)


# --- the store -------------------------------------------------------------------------------


class SqlStore:
    """relay.storage.base.Store on an AsyncEngine whose schema is migrated (see open_store)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        dialect = engine.dialect.name
        if dialect == "postgresql":
            insert_response: Any = postgresql.insert(responses)
            # Single-statement reads need no transaction: no BEGIN/ROLLBACK round trips.
            self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        elif dialect == "sqlite":
            insert_response = sqlite.insert(responses)
            # sqlite3's (legacy) transaction control begins transactions for writes only.
            self._reader = engine
        else:
            raise ValueError(f"unsupported database {dialect!r}: use SQLite or PostgreSQL")
        self._insert_response = insert_response.on_conflict_do_nothing(
            index_elements=[responses.c.id]
        ).returning(responses.c.id)

    async def save_response(
        self,
        tenant: str,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
    ) -> None:
        response_id = response["id"]
        columns = {
            "previous_response_id": response.get("previous_response_id"),
            "status": response.get("status") or "",
            "model": response.get("model") or "",
            "created_at": int(response.get("created_at") or 0),
            "body": _dumps(response),
        }
        rows = [
            {
                "response_id": response_id,
                "tenant": tenant,
                "kind": kind,
                "position": position,
                "item_id": item["id"],
                "item": _dumps(item),
            }
            for kind, group in (("input", input_items), ("output", response.get("output") or []))
            for position, item in enumerate(group)
        ]
        async with self.engine.begin() as conn:
            inserted = await conn.execute(
                self._insert_response, {"id": response_id, "tenant": tenant, **columns}
            )
            if inserted.first() is None:
                # Saved before: overwrite the row and replace its items.
                updated = await conn.execute(
                    _UPDATE_RESPONSE, {"rid": response_id, "t": tenant, **columns}
                )
                if updated.first() is None:
                    raise ServerError(f"response id {response_id} belongs to another tenant")
                await conn.execute(_DELETE_ITEMS, {"rid": response_id})
            if rows:
                await conn.execute(_INSERT_ITEMS, rows)

    async def get_response(self, tenant: str, response_id: str) -> dict[str, Any] | None:
        async with self._reader.connect() as conn:
            body = (await conn.execute(_GET_BODY, {"rid": response_id, "t": tenant})).scalar()
        return None if body is None else _loads_dict(body)

    async def delete_response(self, tenant: str, response_id: str) -> bool:
        params = {"rid": response_id, "t": tenant, "now": int(time.time())}
        async with self.engine.begin() as conn:
            result = await conn.execute(_SOFT_DELETE, params)
        return result.rowcount > 0

    async def load_context(self, tenant: str, response_id: str) -> list[dict[str, Any]] | None:
        async with self._reader.connect() as conn:
            rows = (await conn.execute(_CONTEXT, {"rid": response_id, "t": tenant})).all()
        if not rows:
            return None
        return [_loads_dict(row[0]) for row in rows if row[0] is not None]

    async def list_input_items(
        self,
        tenant: str,
        response_id: str,
        *,
        after: str | None,
        before: str | None,
        limit: int,
        order: Literal["asc", "desc"],
    ) -> ItemPage | None:
        """Cursors are item ids, relative to `order`: `after` pages on, `before` pages back (the
        `limit` items just before the cursor, still in `order`). `has_more` says whether items
        lie beyond the page in the direction of travel."""
        if limit < 1:
            raise InvalidRequest("'limit' must be at least 1.", param="limit")
        params = {"rid": response_id, "t": tenant, "after": after, "before": before}
        async with self._reader.connect() as conn:
            found = (await conn.execute(_CURSORS, params)).first()
            if found is None:
                return None
            after_at, before_at = found
            for name, cursor, at in (("after", after, after_at), ("before", before, before_at)):
                if cursor is not None and at is None:
                    raise InvalidRequest(
                        f"No input item with id '{cursor}' in response '{response_id}'.",
                        param=name,
                    )
            descending = order == "desc"
            # Exclusive bounds on position. In descending order "after" means a lower position.
            low, high = (before_at, after_at) if descending else (after_at, before_at)
            lo = -1 if low is None else low
            hi = _POSITION_MAX if high is None else high
            backwards = before is not None and after is None
            query = _PAGE[descending != backwards]
            page_params = {"rid": response_id, "lo": lo, "hi": hi, "n": limit + 1}
            rows = (await conn.execute(query, page_params)).all()
        has_more = len(rows) > limit
        data = [_loads_dict(row[0]) for row in rows[:limit]]
        if backwards:
            data.reverse()
        return ItemPage(
            data=data,
            first_id=data[0]["id"] if data else None,
            last_id=data[-1]["id"] if data else None,
            has_more=has_more,
        )

    async def get_items(self, tenant: str, item_ids: list[str]) -> dict[str, dict[str, Any]]:
        if not item_ids:
            return {}
        params = {"t": tenant, "ids": list(dict.fromkeys(item_ids))}
        async with self._reader.connect() as conn:
            rows = (await conn.execute(_GET_ITEMS, params)).all()
        # Oldest first, so when an id was stored twice the latest wins.
        return {item_id: _loads_dict(item) for item_id, item in rows}

    async def close(self) -> None:
        await self.engine.dispose()


def _loads_dict(text: str) -> dict[str, Any]:
    value = orjson.loads(text)
    assert isinstance(value, dict)
    return value


# --- engine and migrations -------------------------------------------------------------------


def create_engine(url: str) -> AsyncEngine:
    """An AsyncEngine for `url`. SQLite: the file's directory is created, and every connection
    gets a busy timeout (writers queue instead of failing). WAL journaling (readers never wait
    for the writer) is a property of the file, set once by `migrate`."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_async_engine(parsed)
    database = parsed.database or ""
    memory = database in ("", ":memory:")
    # sqlite3 calls sqlite3_busy_timeout() as it opens the file, before any statement runs.
    timeout = {"timeout": _BUSY_TIMEOUT_MS / 1000}
    if memory:
        # One connection holds an in-memory database; every checkout must share it.
        engine = create_async_engine(parsed, poolclass=StaticPool, connect_args=timeout)
    else:
        if not parsed.query.get("uri"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # aiosqlite runs each connection on its own thread: keep them open and reuse them.
        engine = create_async_engine(parsed, poolclass=AsyncAdaptedQueuePool, connect_args=timeout)

    @event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if not memory:
            cursor.execute("PRAGMA synchronous = NORMAL")  # durable across crashes in WAL mode
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    return engine


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration, built in code: no alembic.ini."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _upgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


@asynccontextmanager
async def _migration_turn() -> AsyncIterator[None]:
    """This process's turn to migrate. Alembic keeps the running migration in module globals
    (`alembic.op`, `alembic.context`), so two migrations in one process must not interleave,
    whether on one event loop (run_sync switches back to the loop at every statement) or on
    loops in different threads. The lock is polled, not waited on: a blocking wait would stall
    this thread's event loop, and with it the migration holding the lock if it runs there."""
    while not _MIGRATING.acquire(blocking=False):  # noqa: ASYNC110 (no awaitable wait)
        await asyncio.sleep(_LOCK_POLL_S)
    try:
        yield
    finally:
        _MIGRATING.release()


async def _use_wal(conn: AsyncConnection) -> None:
    """Switch a SQLite file to WAL journaling (a no-op once it is WAL: the mode is stored in
    the file). SQLite answers "database is locked" at once, without waiting out the busy
    timeout, when another connection holds a lock while a file changes mode; so retry, within
    the busy timeout, as the busy handler would have."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            await conn.exec_driver_sql("PRAGMA journal_mode = WAL")
        except OperationalError as error:
            if "locked" not in str(error.orig) or time.monotonic() > deadline:
                raise
            await conn.rollback()
            await asyncio.sleep(_LOCK_POLL_S)
        else:
            await conn.commit()
            return


async def migrate(engine: AsyncEngine) -> None:
    """alembic upgrade head, in one transaction that holds a lock, so that processes starting
    together take turns (and, within a process, a lock of its own: see _migration_turn).
    Alembic is synchronous: it runs on the async connection through run_sync, which needs no
    thread."""
    async with _migration_turn(), engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            if (engine.url.database or "") not in ("", ":memory:"):
                await _use_wal(conn)
            # Takes the write lock at once; and DDL inside an explicit transaction is not
            # autocommitted by sqlite3.
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
        await conn.run_sync(_upgrade)
        await conn.commit()


async def open_store(url: str) -> SqlStore:
    """The store at `url` (sqlite+aiosqlite:///path or postgresql+asyncpg://...), its schema
    migrated to the latest revision."""
    engine = create_engine(url)
    try:
        store = SqlStore(engine)
        await migrate(engine)
    except BaseException:
        await engine.dispose()
        raise
    return store


if TYPE_CHECKING:

    def _is_a_store(store: SqlStore) -> Store:  # mypy checks SqlStore against the protocol
        return store
