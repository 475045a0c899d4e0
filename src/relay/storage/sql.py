"""The Store, on SQLAlchemy Core: one implementation for SQLite and PostgreSQL. Each operation
is a synchronous function of a Connection that `relay.storage.database` runs where its database
wants it (SQLite: on a thread; PostgreSQL: on asyncpg through run_sync).

Every statement is built once (at import; PostgreSQL's save at its first use), with bound
parameters, so SQLAlchemy compiles each once per dialect and the hot path only binds values.
A read is one query (two for a page of input items). A save is one statement on PostgreSQL,
its own transaction (`_save_at_once`: a round trip to the server, where BEGIN, two statements
and COMMIT were four), sent past SQLAlchemy to asyncpg (`Database.execute_one`); on SQLite,
where a statement costs no round trip, one transaction of two statements (the response row,
then all its items in one executemany).
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any, Literal

import orjson
from sqlalchemy import (
    Connection,
    CursorResult,
    Integer,
    String,
    Table,
    Text,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal_column,
    select,
    true,
    update,
)

from relay.errors import InvalidRequest, ServerError
from relay.observe import tracing
from relay.storage.base import ItemPage, Store
from relay.storage.database import (
    AsyncDatabase,
    Database,
    SqliteDatabase,
    alembic_config,
    open_database,
)
from relay.storage.dialects import driver_sql, postgresql, sqlite
from relay.storage.tables import response_items as items
from relay.storage.tables import responses

__all__ = ["SqlStore", "alembic_config", "json_text", "open_store"]
# Guards the recursive walk against a cycle in previous_response_id, which Relay never writes.
_MAX_DEPTH = 100_000
_POSITION_MAX = 2**31 - 1


def json_text(value: Any) -> str:
    """JSON as stored: text, serialised by orjson."""
    return orjson.dumps(value).decode()


# --- statements ------------------------------------------------------------------------------

_visible = (
    responses.c.id == bindparam("rid"),
    responses.c.tenant == bindparam("t"),
    responses.c.deleted_at.is_(None),
)

_GET_BODY = select(responses.c.body).where(*_visible)

_IS_VISIBLE = select(responses.c.id).where(*_visible)

_SOFT_DELETE = update(responses).where(*_visible).values(deleted_at=bindparam("now"))

# A resave overwrites the row; the SET clause comes from the parameters given. deleted_at is
# kept: a deleted response stays deleted.
_UPDATE_RESPONSE = (
    update(responses)
    .where(responses.c.id == bindparam("rid"), responses.c.tenant == bindparam("t"))
    .returning(responses.c.id)
)

_DELETE_ITEMS = delete(items).where(items.c.response_id == bindparam("rid"))
_DELETE_OUTPUTS = delete(items).where(
    items.c.response_id == bindparam("rid"), items.c.kind == "output"
)
# The count of input items a resave that keeps them gives the one-statement save: no
# stored input item is at or past it, so none is deleted.
_KEPT = 2**31 - 1

# SQLite's save (`_save`): the response row, unless it is there already (then None comes back).
_INSERT_RESPONSE = (
    sqlite.insert(responses)
    .on_conflict_do_nothing(index_elements=[responses.c.id])
    .returning(responses.c.id)
)

_INSERT_ITEMS = insert(items)
# The order of an item row's values in _save (the item's JSON last).
_ITEM_KEYS = ("response_id", "tenant", "kind", "position", "item_id", "item")


@functools.cache
def _insert_into(table: Table) -> Any:
    return insert(table)


# The columns a save writes besides the id and the tenant (a resave overwrites them).
_RESPONSE_COLUMNS = (
    "previous_response_id",
    "status",
    "model",
    "created_at",
    "session_id",
    "body",
)


@functools.cache
def _save_at_once_statement(also: Table | None = None) -> Any:
    """A save, or a resave, as one PostgreSQL statement: the response row upserted (only over a
    row of the same tenant: else nothing is written and no id comes back), its items upserted
    from arrays (one parameter per column, whatever their number), and the items a resave no
    longer has (positions beyond the new counts) deleted. The deleted and the upserted items
    are different rows, so the order in which PostgreSQL runs the parts does not matter; the
    statement is atomic, its own transaction outside one. Returns the id when written.

    `also`: a table that gets a row with the response (`also_<column>` parameters, one for
    each of its columns), such as the run record of a response that starts."""
    upsert = postgresql.insert(responses)
    saved = (
        upsert.values(
            id=bindparam("id"),
            tenant=bindparam("tenant"),
            **{name: bindparam(name) for name in _RESPONSE_COLUMNS},
        )
        .on_conflict_do_update(
            index_elements=[responses.c.id],
            set_={name: upsert.excluded[name] for name in _RESPONSE_COLUMNS},
            where=responses.c.tenant == upsert.excluded.tenant,
        )
        .returning(responses.c.id)
        .cte("saved")
    )
    given = (
        func.unnest(
            bindparam("kinds", type_=postgresql.ARRAY(String)),
            bindparam("positions", type_=postgresql.ARRAY(Integer)),
            bindparam("item_ids", type_=postgresql.ARRAY(String)),
            bindparam("items", type_=postgresql.ARRAY(Text)),
        )
        .table_valued("kind", "position", "item_id", "item")
        .render_derived()
    )
    stale = (
        delete(items)
        .where(
            items.c.response_id.in_(select(saved.c.id)),
            items.c.position
            >= case(
                (items.c.kind == "input", bindparam("inputs", type_=Integer)),
                else_=bindparam("outputs", type_=Integer),
            ),
        )
        .cte("stale")
    )
    upsert_items = postgresql.insert(items)
    written = (
        upsert_items.from_select(
            ["response_id", "tenant", "kind", "position", "item_id", "item"],
            select(
                saved.c.id,
                bindparam("tenant"),
                given.c.kind,
                given.c.position,
                given.c.item_id,
                given.c.item,
            ).select_from(saved.join(given, true())),
        )
        .on_conflict_do_update(
            index_elements=[items.c.response_id, items.c.kind, items.c.position],
            set_={name: upsert_items.excluded[name] for name in ("tenant", "item_id", "item")},
        )
        .cte("written")
    )
    ctes = [stale, written]
    if also is not None:
        names = [column.name for column in also.columns]
        values = [bindparam(f"also_{column.name}", type_=column.type) for column in also.columns]
        ctes.append(insert(also).from_select(names, select(*values).select_from(saved)).cte("also"))
    return select(saved.c.id).add_cte(*ctes)


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


def _response_columns(response: dict[str, Any]) -> dict[str, Any]:
    return {
        "previous_response_id": response.get("previous_response_id"),
        "status": response.get("status") or "",
        "model": response.get("model") or "",
        "created_at": int(response.get("created_at") or 0),
        "session_id": response.get("session_id"),
        "body": json_text(response),
    }


def _item_groups(
    response: dict[str, Any], input_items: list[dict[str, Any]] | None
) -> tuple[tuple[str, list[dict[str, Any]]], ...]:
    outputs = ("output", response.get("output") or [])
    return (outputs,) if input_items is None else (("input", input_items), outputs)


def _save(
    conn: Connection,
    tenant: str,
    response: dict[str, Any],
    input_items: list[dict[str, Any]] | None,
) -> int:
    """A save as SQLite runs it, inside a transaction: the response row, then its items."""
    response_id = response["id"]
    columns = _response_columns(response)
    rows = [
        (response_id, tenant, kind, position, item["id"], json_text(item))
        for kind, group in _item_groups(response, input_items)
        for position, item in enumerate(group)
    ]
    inserted = _insert_row(conn, _INSERT_RESPONSE, {"id": response_id, "tenant": tenant, **columns})
    if inserted.first() is None:
        # Saved before: overwrite the row and replace its items.
        updated = conn.execute(_UPDATE_RESPONSE, {"rid": response_id, "t": tenant, **columns})
        if updated.first() is None:
            raise _another_tenants(response_id)
        conn.execute(
            _DELETE_ITEMS if input_items is not None else _DELETE_OUTPUTS, {"rid": response_id}
        )
    if rows:
        sql, order = driver_sql(_INSERT_ITEMS, _ITEM_KEYS, conn.dialect)
        conn.exec_driver_sql(sql, [tuple(row[index] for index in order) for row in rows])
    return sum(len(item) for *_, item in rows)


def _insert_row(conn: Connection, statement: Any, values: dict[str, Any]) -> CursorResult[Any]:
    """`statement` (an insert) of `values`, by column, as the driver's own SQL (driver_sql)."""
    keys = tuple(values)
    sql, order = driver_sql(statement, keys, conn.dialect)
    return conn.exec_driver_sql(sql, tuple(values[keys[index]] for index in order))


async def _save_at_once(
    db: Database,
    tenant: str,
    response: dict[str, Any],
    input_items: list[dict[str, Any]] | None,
    also: tuple[Table, dict[str, Any]] | None = None,
) -> int:
    """A save as PostgreSQL runs it: one statement (_save_at_once_statement), its items as
    arrays, sent past SQLAlchemy (Database.execute_one); `also`: a table and the row it gets
    with the response."""
    kinds: list[str] = []
    positions: list[int] = []
    item_ids: list[str] = []
    texts: list[str] = []
    for kind, group in _item_groups(response, input_items):
        for position, item in enumerate(group):
            kinds.append(kind)
            positions.append(position)
            item_ids.append(item["id"])
            texts.append(json_text(item))
    params = {
        "id": response["id"],
        "tenant": tenant,
        **_response_columns(response),
        "kinds": kinds,
        "positions": positions,
        "item_ids": item_ids,
        "items": texts,
        "inputs": _KEPT if input_items is None else len(input_items),
        "outputs": len(kinds) - len(input_items or ()),
    }
    table = None
    if also is not None:
        table, row = also
        params.update((f"also_{name}", value) for name, value in row.items())
    if await db.execute_one(_save_at_once_statement(table), params) is None:
        raise _another_tenants(response["id"])
    return sum(len(text) for text in texts)


def _another_tenants(response_id: str) -> ServerError:
    return ServerError(f"response id {response_id} belongs to another tenant")


def _get_body(conn: Connection, tenant: str, response_id: str) -> dict[str, Any] | None:
    body = conn.execute(_GET_BODY, {"rid": response_id, "t": tenant}).scalar()
    return None if body is None else _loads_dict(body)


def _is_visible(conn: Connection, tenant: str, response_id: str) -> bool:
    return conn.execute(_IS_VISIBLE, {"rid": response_id, "t": tenant}).first() is not None


def _soft_delete(conn: Connection, tenant: str, response_id: str) -> bool:
    params = {"rid": response_id, "t": tenant, "now": int(time.time())}
    return conn.execute(_SOFT_DELETE, params).rowcount > 0


def _context(conn: Connection, tenant: str, response_id: str) -> list[dict[str, Any]] | None:
    texts = conn.execute(_CONTEXT, {"rid": response_id, "t": tenant}).scalars().all()
    if not texts:
        return None
    # One parse of one JSON array: a thousand-turn chain is thousands of items, and a parse
    # per item costs several times more.
    context = orjson.loads("[" + ",".join(text for text in texts if text is not None) + "]")
    assert isinstance(context, list)
    return context


def _page(
    conn: Connection,
    tenant: str,
    response_id: str,
    after: str | None,
    before: str | None,
    limit: int,
    descending: bool,
) -> tuple[list[str], bool] | None:
    """Stored texts of one page of input items in the order of travel, and whether the walk is
    backwards (from `before`); None when the response is not visible."""
    params = {"rid": response_id, "t": tenant, "after": after, "before": before}
    found = conn.execute(_CURSORS, params).first()
    if found is None:
        return None
    after_at, before_at = found
    for name, cursor, at in (("after", after, after_at), ("before", before, before_at)):
        if cursor is not None and at is None:
            raise InvalidRequest(
                f"No input item with id '{cursor}' in response '{response_id}'.", param=name
            )
    # Exclusive bounds on position. In descending order "after" means a lower position.
    low, high = (before_at, after_at) if descending else (after_at, before_at)
    lo = -1 if low is None else low
    hi = _POSITION_MAX if high is None else high
    backwards = before is not None and after is None
    query = _PAGE[descending != backwards]
    page_params = {"rid": response_id, "lo": lo, "hi": hi, "n": limit + 1}
    return list(conn.execute(query, page_params).scalars().all()), backwards


def _items(conn: Connection, tenant: str, item_ids: list[str]) -> list[tuple[str, str]]:
    rows = conn.execute(_GET_ITEMS, {"t": tenant, "ids": item_ids}).all()
    return [(item_id, item) for item_id, item in rows]


class SqlStore:
    """relay.storage.base.Store on a migrated Database (see open_store)."""

    def __init__(self, db: SqliteDatabase | AsyncDatabase) -> None:
        self.db = db
        self.dialect = db.sync_engine.dialect.name
        self._at_once = self.dialect == "postgresql"

    async def save_response(
        self,
        tenant: str,
        response: dict[str, Any],
        input_items: list[dict[str, Any]] | None,
    ) -> int:
        with tracing.storage(self.dialect, "save_response", response["id"]):
            if self._at_once:  # one statement on PostgreSQL: no transaction around it
                return await _save_at_once(self.db, tenant, response, input_items)
            return await self.db.write_awaited(
                lambda conn: _save(conn, tenant, response, input_items)
            )

    async def save_with(
        self,
        tenant: str,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        table: Table,
        row: dict[str, Any],
    ) -> None:
        """save_response, and `row` (a value for each column of `table`) inserted with it,
        atomically: a run's record with the response it runs. One statement on PostgreSQL."""
        if self._at_once:
            await _save_at_once(self.db, tenant, response, input_items, (table, row))
            return

        def work(conn: Connection) -> None:
            _save(conn, tenant, response, input_items)
            _insert_row(conn, _insert_into(table), row)

        await self.db.write_awaited(work)

    async def get_response(self, tenant: str, response_id: str) -> dict[str, Any] | None:
        return await self.db.read(lambda conn: _get_body(conn, tenant, response_id))

    async def is_visible(self, tenant: str, response_id: str) -> bool:
        return await self.db.glance(lambda conn: _is_visible(conn, tenant, response_id))

    async def delete_response(self, tenant: str, response_id: str) -> bool:
        return await self.db.write_one(lambda conn: _soft_delete(conn, tenant, response_id))

    async def load_context(self, tenant: str, response_id: str) -> list[dict[str, Any]] | None:
        with tracing.storage(self.dialect, "load_context", response_id):
            return await self.db.read(lambda conn: _context(conn, tenant, response_id))

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
        descending = order == "desc"
        found = await self.db.read(
            lambda conn: _page(conn, tenant, response_id, after, before, limit, descending)
        )
        if found is None:
            return None
        texts, backwards = found
        has_more = len(texts) > limit
        data = [_loads_dict(text) for text in texts[:limit]]
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
        unique = list(dict.fromkeys(item_ids))
        rows = await self.db.read(lambda conn: _items(conn, tenant, unique))
        # Oldest first, so when an id was stored twice the latest wins.
        return {item_id: _loads_dict(item) for item_id, item in rows}

    async def close(self) -> None:
        await self.db.close()


def _loads_dict(text: str) -> dict[str, Any]:
    value = orjson.loads(text)
    assert isinstance(value, dict)
    return value


async def open_store(url: str) -> SqlStore:
    """The store at `url` (sqlite:///path or postgresql+asyncpg://...), its schema migrated to
    the latest revision."""
    return SqlStore(await open_database(url))


if TYPE_CHECKING:

    def _is_a_store(store: SqlStore) -> Store:  # mypy checks SqlStore against the protocol
        return store
