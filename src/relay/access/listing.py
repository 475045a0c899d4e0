"""A project's responses and conversations as the admin API and the console list them: newest
first (by the second each was made, then by id), paged both ways from an id of the list; a
project's responses searched, and what each cost.

Filters on columns are exact and use the table's indexes (a session's responses, those that
continue a response) or read the project's rows in order (status, model, days). Filters that
look inside a row, a response's metadata or the text of its items, read each row they test,
so they are bounded: one page tests at most SEARCH_WINDOW responses past its cursor. A page
whose window ends before it is full says so (`Listed.stopped_at`: the last response it read),
and the next page goes on from there; a big project's search stays as fast as a small one's,
page by page, however rare its matches.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import JSON, Connection, and_, cast, func, literal, or_, select
from sqlalchemy import text as sql_text

from relay.errors import InvalidRequest
from relay.storage.tables import responses, usage_ledger

# Responses a search tests per page: on either database, a window of them is read in tens of
# milliseconds (docs/benchmarks.md, "Searching responses").
SEARCH_WINDOW = 2000


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a page starts: past `after` (older rows), or before `before` (newer rows), both
    ids of the list; neither: at the newest."""

    after: str | None = None
    before: str | None = None


@dataclass(frozen=True, slots=True)
class Listed:
    rows: list[Any]  # newest first
    has_more: bool  # more in the direction the page went (older; newer for `before`)
    stopped_at: str | None  # a search's window ended first: the last row it read


def _past(table: Any, created_at: int, row_id: str, newer: bool, inclusive: bool = False) -> Any:
    """The rows beyond (created_at, row_id) towards the newer or the older end of the list;
    with `inclusive`, that row too."""
    beyond = operator.gt if newer else operator.lt
    tie = (operator.ge if newer else operator.le) if inclusive else beyond
    return or_(
        beyond(table.c.created_at, created_at),
        and_(table.c.created_at == created_at, tie(table.c.id, row_id)),
    )


def _made_at(conn: Connection, table: Any, tenant: str, name: str, row_id: str) -> int:
    found = conn.execute(
        select(table.c.created_at).where(table.c.id == row_id, table.c.tenant == tenant)
    ).first()
    if found is None:
        raise InvalidRequest(
            f"Invalid '{name}': no '{row_id[:100]}' in this project's list.", param=name
        )
    made: int = found.created_at
    return made


def newest_first(
    conn: Connection,
    table: Any,
    tenant: str,
    where: Sequence[Any],
    cursor: Cursor,
    limit: int,
    inside: Sequence[Any] = (),
) -> Listed:
    """A page of a tenant's visible rows of `table` (responses, conversations) that meet
    `where`, and `inside` (conditions that read each row: tested on SEARCH_WINDOW rows at
    most)."""
    newer = cursor.before is not None
    conditions = [table.c.tenant == tenant, table.c.deleted_at.is_(None), *where]
    for name, row_id in (("after", cursor.after), ("before", cursor.before)):
        if row_id is not None:
            made = _made_at(conn, table, tenant, name, row_id)
            conditions.append(_past(table, made, row_id, newer))
    order = [table.c.created_at, table.c.id]
    order = [column.asc() if newer else column.desc() for column in order]
    stopped_at = None
    if inside:
        edge = conn.execute(
            select(table.c.created_at, table.c.id)
            .where(*conditions)
            .order_by(*order)
            .offset(SEARCH_WINDOW - 1)
            .limit(1)
        ).first()
        if edge is not None:  # a full window: no row past its edge is read
            conditions.append(_past(table, edge.created_at, edge.id, not newer, inclusive=True))
            stopped_at = edge.id
    query = select(table).where(*conditions, *inside).order_by(*order).limit(limit + 1)
    rows = list(conn.execute(query).all())
    has_more = len(rows) > limit or stopped_at is not None
    if len(rows) > limit:
        stopped_at = None  # the page is full before its window's edge
    rows = rows[:limit]
    if newer:
        rows.reverse()
    return Listed(rows, has_more, stopped_at)


def as_page(data: list[dict[str, Any]], listed: Listed, cursor: Cursor) -> dict[str, Any]:
    """A list's answer: `first_id` and `last_id` bound what the page covered (a search's
    window that ended first: the last response it read), so that `before=first_id` and
    `after=last_id` page on."""
    first_id = data[0]["id"] if data else None
    last_id = data[-1]["id"] if data else None
    if listed.stopped_at is not None:
        if cursor.before is not None:
            first_id = listed.stopped_at
        else:
            last_id = listed.stopped_at
    return {
        "object": "list",
        "data": data,
        "first_id": first_id,
        "last_id": last_id,
        "has_more": listed.has_more,
    }


# --- searching responses ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseSearch:
    """The filters of a list of responses, each exact but `text`; all must hold."""

    status: str | None = None
    model: str | None = None
    start: int | None = None  # unix seconds: made at or after
    end: int | None = None  # ... and before
    session_id: str | None = None
    previous_response_id: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()  # pairs the response's metadata holds
    text: str | None = None  # in the text of one of its input or output items

    def columns(self) -> list[Any]:
        """The filters on columns."""
        where = [
            column == value
            for column, value in (
                (responses.c.status, self.status),
                (responses.c.model, self.model),
                (responses.c.session_id, self.session_id),
                (responses.c.previous_response_id, self.previous_response_id),
            )
            if value is not None
        ]
        if self.start is not None:
            where.append(responses.c.created_at >= self.start)
        if self.end is not None:
            where.append(responses.c.created_at < self.end)
        return where

    def inside(self, dialect: str) -> list[Any]:
        """The filters that read each response (bounded: see newest_first)."""
        found = [_metadata_holds(dialect, key, value) for key, value in self.metadata]
        if self.text is not None:
            found.append(_text_holds(dialect, self.text))
        return found


def _metadata_holds(dialect: str, key: str, value: str) -> Any:
    """The stored body's metadata maps `key` to `value`. The key is a bound parameter on both
    databases (no JSON path is written with it), so any key is matched as it is."""
    if dialect == "postgresql":
        return cast(responses.c.body, JSON)["metadata"][key].as_string() == value
    pairs = func.json_each(responses.c.body, "$.metadata").table_valued("key", "value")
    return (
        select(literal(1)).select_from(pairs).where(pairs.c.key == key, pairs.c.value == value)
    ).exists()


# Where an item holds text: a message's parts and string content, a tool call's arguments or
# input, a tool's output, a refusal, a reasoning summary. Not ids, types, roles or statuses.
_TEXT_KEYS = ("text", "content", "output", "arguments", "input", "refusal")
_KEYS = ", ".join(f"'{key}'" for key in _TEXT_KEYS)

# An item holds the text if its stored JSON does (as JSON writes it: a cheap test that rules out
# most items), and then one of its strings under a key of _TEXT_KEYS does, read by each
# database's own JSON functions. Case aside: ASCII letters only, on SQLite (its LIKE's own rule).
_ITEM_TEXT = {
    "sqlite": f"""EXISTS (SELECT 1 FROM response_items AS i, json_tree(i.item) AS t
        WHERE i.response_id = responses.id AND i.item LIKE :written ESCAPE '\\'
        AND t.type = 'text' AND t.key IN ({_KEYS}) AND t.atom LIKE :typed ESCAPE '\\')""",
    "postgresql": f"""EXISTS (SELECT 1 FROM response_items AS i
        CROSS JOIN LATERAL jsonb_path_query(
            CAST(i.item AS JSONB), 'strict $.** ? (@.type() == "object")') AS o(node)
        CROSS JOIN LATERAL jsonb_each(o.node) AS e(key, value)
        WHERE i.response_id = responses.id AND i.item ILIKE :written ESCAPE '\\'
        AND e.key IN ({_KEYS}) AND jsonb_typeof(e.value) = 'string'
        AND e.value #>> '{{}}' ILIKE :typed ESCAPE '\\')""",
}


def _like(text: str) -> str:
    """A LIKE pattern that finds `text` anywhere, its wildcards taken as they are."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _text_holds(dialect: str, text: str) -> Any:
    """One of the response's items, input or output, holds `text` in its text."""
    written = orjson.dumps(text).decode()[1:-1]
    return sql_text(_ITEM_TEXT[dialect]).bindparams(written=_like(written), typed=_like(text))


def costs(conn: Connection, tenant: str, response_ids: list[str]) -> dict[str, int]:
    """What each response cost, in nano-dollars, from its usage rows (a response not yet
    settled has none)."""
    if not response_ids:
        return {}
    found = conn.execute(
        select(usage_ledger.c.response_id, func.sum(usage_ledger.c.cost_nanos))
        .where(
            usage_ledger.c.response_id.in_(response_ids),
            usage_ledger.c.project_id == tenant,
        )
        .group_by(usage_ledger.c.response_id)
    ).all()
    return {response_id: int(total) for response_id, total in found}
