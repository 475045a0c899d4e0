"""Conversations in storage: their items in order, and the hold a response takes on one while
it continues it. Every call is scoped to a tenant, as responses are: another tenant's
conversation is indistinguishable from a missing one.

A hold lasts `hold_s` (the run lease) and is renewed with this process's run leases
(relay.runs.runner), so it lasts as long as its turn while its process lives, and lapses
soon after the process dies. Its release is conditioned on its token: a turn whose hold
lapsed (its process stalled past the lease) and was taken by another changes nothing."""

from __future__ import annotations

import time
from typing import Any, Literal

import orjson
from sqlalchemy import Connection, and_, bindparam, delete, insert, or_, select, update

from relay.errors import Conflict, NotFound
from relay.storage.base import ItemPage
from relay.storage.database import Database
from relay.storage.sql import json_text
from relay.storage.tables import conversation_items as items
from relay.storage.tables import conversations

_BUSY = "Another response is in progress for this conversation; retry when it has completed."
_HELD = and_(
    conversations.c.id == bindparam("cid"), conversations.c.active_token == bindparam("token")
)
_RENEW = update(conversations).where(_HELD).values(active_until=bindparam("until"))
_RELEASE = update(conversations).where(_HELD).values(active_token=None, active_until=None)


class HoldLost(Exception):
    """The hold lapsed and another response took it: the release changed nothing."""


def view(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "conversation",
        "created_at": row.created_at,
        "metadata": orjson.loads(row.metadata),
    }


def not_found(conversation_id: str) -> NotFound:
    return NotFound(
        f"Conversation with id '{conversation_id[:100]}' not found.",
        param="conversation",
        code="conversation_not_found",
    )


def _row(conn: Connection, tenant: str, conversation_id: str) -> Any:
    return conn.execute(
        select(conversations).where(
            conversations.c.id == conversation_id,
            conversations.c.tenant == tenant,
            conversations.c.deleted_at.is_(None),
        )
    ).first()


def _append(conn: Connection, row: Any, new_items: list[dict[str, Any]]) -> None:
    if new_items:
        conn.execute(
            insert(items),
            [
                {
                    "conversation_id": row.id,
                    "position": row.next_position + offset,
                    "item_id": item["id"],
                    "item": json_text(item),
                }
                for offset, item in enumerate(new_items)
            ],
        )
    conn.execute(
        update(conversations)
        .where(conversations.c.id == row.id)
        .values(
            version=conversations.c.version + 1,
            next_position=conversations.c.next_position + len(new_items),
        )
    )


class ConversationStore:
    def __init__(self, db: Database, hold_s: float) -> None:
        self.db = db
        self.hold_s = hold_s
        self._held: set[tuple[str, str]] = set()  # this process's holds: (conversation, token)

    async def create(
        self,
        tenant: str,
        conversation_id: str,
        metadata: dict[str, Any],
        first: list[dict[str, Any]],
    ) -> dict[str, Any]:
        def work(conn: Connection) -> dict[str, Any]:
            conn.execute(
                insert(conversations).values(
                    id=conversation_id,
                    tenant=tenant,
                    created_at=int(time.time()),
                    metadata=json_text(metadata),
                    version=0,
                    next_position=0,
                )
            )
            row = _row(conn, tenant, conversation_id)
            _append(conn, row, first)
            return view(row)

        return await self.db.write(work)

    async def get(self, tenant: str, conversation_id: str) -> dict[str, Any]:
        row = await self.db.read(lambda conn: _row(conn, tenant, conversation_id))
        if row is None:
            raise not_found(conversation_id)
        return view(row)

    async def update_metadata(
        self, tenant: str, conversation_id: str, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        def work(conn: Connection) -> dict[str, Any]:
            if _row(conn, tenant, conversation_id) is None:
                raise not_found(conversation_id)
            conn.execute(
                update(conversations)
                .where(conversations.c.id == conversation_id)
                .values(metadata=json_text(metadata))
            )
            return view(_row(conn, tenant, conversation_id))

        return await self.db.write(work)

    async def delete(self, tenant: str, conversation_id: str) -> None:
        def work(conn: Connection) -> None:
            if _row(conn, tenant, conversation_id) is None:
                raise not_found(conversation_id)
            conn.execute(
                update(conversations)
                .where(conversations.c.id == conversation_id)
                .values(deleted_at=int(time.time()), version=conversations.c.version + 1)
            )

        await self.db.write(work)

    async def add_items(
        self, tenant: str, conversation_id: str, new_items: list[dict[str, Any]]
    ) -> None:
        def work(conn: Connection) -> None:
            row = _row(conn, tenant, conversation_id)
            if row is None:
                raise not_found(conversation_id)
            _append(conn, row, new_items)

        await self.db.write(work)

    async def page(
        self,
        tenant: str,
        conversation_id: str,
        *,
        after: str | None,
        limit: int,
        order: Literal["asc", "desc"],
    ) -> ItemPage:
        def work(conn: Connection) -> list[str]:
            if _row(conn, tenant, conversation_id) is None:
                raise not_found(conversation_id)
            query = select(items.c.item).where(items.c.conversation_id == conversation_id)
            position = items.c.position
            if after is not None:
                cursor = conn.execute(
                    select(position).where(
                        items.c.conversation_id == conversation_id, items.c.item_id == after
                    )
                ).scalar()
                if cursor is None:
                    raise NotFound(f"Item with id '{after[:100]}' not found.", param="after")
                query = query.where(position > cursor if order == "asc" else position < cursor)
            query = query.order_by(position if order == "asc" else position.desc())
            return [row[0] for row in conn.execute(query.limit(limit + 1))]

        texts = await self.db.read(work)
        data = [orjson.loads(text) for text in texts[:limit]]
        return ItemPage(
            data=data,
            first_id=data[0]["id"] if data else None,
            last_id=data[-1]["id"] if data else None,
            has_more=len(texts) > limit,
        )

    async def get_item(self, tenant: str, conversation_id: str, item_id: str) -> dict[str, Any]:
        def work(conn: Connection) -> str | None:
            if _row(conn, tenant, conversation_id) is None:
                raise not_found(conversation_id)
            text: str | None = conn.execute(
                select(items.c.item).where(
                    items.c.conversation_id == conversation_id, items.c.item_id == item_id
                )
            ).scalar()
            return text

        text = await self.db.read(work)
        if text is None:
            raise NotFound(f"Item with id '{item_id[:100]}' not found.", param="item_id")
        item: dict[str, Any] = orjson.loads(text)
        return item

    async def delete_item(self, tenant: str, conversation_id: str, item_id: str) -> dict[str, Any]:
        def work(conn: Connection) -> dict[str, Any]:
            row = _row(conn, tenant, conversation_id)
            if row is None:
                raise not_found(conversation_id)
            gone = conn.execute(
                delete(items).where(
                    items.c.conversation_id == conversation_id, items.c.item_id == item_id
                )
            )
            if not gone.rowcount:
                raise NotFound(f"Item with id '{item_id[:100]}' not found.", param="item_id")
            conn.execute(
                update(conversations)
                .where(conversations.c.id == conversation_id)
                .values(version=conversations.c.version + 1)
            )
            return view(row)

        return await self.db.write(work)

    # a response's turn ----------------------------------------------------------------------

    async def hold(self, tenant: str, conversation_id: str, token: str) -> int:
        """Take the conversation for one response: its version, or 404 / 409 (another
        response holds it; a hold whose process died lapses `hold_s` after its last
        renewal)."""
        now = int(time.time())

        def work(conn: Connection) -> int:
            row = _row(conn, tenant, conversation_id)
            if row is None:
                raise not_found(conversation_id)
            taken = conn.execute(
                update(conversations)
                .where(
                    conversations.c.id == conversation_id,
                    or_(conversations.c.active_token.is_(None), conversations.c.active_until < now),
                )
                .values(active_token=token, active_until=now + int(self.hold_s))
            )
            if not taken.rowcount:
                raise Conflict(_BUSY, param="conversation", code="conversation_locked")
            # Read again under the hold: a turn released between the first read and the
            # update (PostgreSQL, read committed) has changed it.
            version = conn.execute(
                select(conversations.c.version).where(conversations.c.id == conversation_id)
            ).scalar()
            return int(version or 0)

        version = await self.db.write(work)
        self._held.add((conversation_id, token))
        return version

    async def renew(self) -> None:
        """Extend this process's holds by `hold_s` (none: no statement). A hold another
        response took meanwhile is left to it."""
        if not self._held:
            return
        until = int(time.time() + self.hold_s)
        params = [{"cid": held, "token": token, "until": until} for held, token in self._held]
        await self.db.write(lambda conn: conn.execute(_RENEW, params))

    async def items(self, conversation_id: str) -> list[dict[str, Any]]:
        """Every item, in order (under a hold: the tenant was checked as it was taken)."""
        query = (
            select(items.c.item)
            .where(items.c.conversation_id == conversation_id)
            .order_by(items.c.position)
        )
        texts = await self.db.read(lambda conn: [row[0] for row in conn.execute(query)])
        return [orjson.loads(text) for text in texts]

    async def release(
        self, conversation_id: str, token: str, new_items: list[dict[str, Any]] | None
    ) -> int | None:
        """End a response's hold, appending its items (when it completed) in the same
        transaction: the conversation's new version, None when it was deleted meanwhile.
        Raises HoldLost, changing nothing, when the hold is no longer this token's."""
        self._held.discard((conversation_id, token))

        def work(conn: Connection) -> int | None:
            # Conditioned on the token, and first: on PostgreSQL the row stays locked until
            # the items are appended, so another turn cannot take the hold in between.
            if not conn.execute(_RELEASE, {"cid": conversation_id, "token": token}).rowcount:
                raise HoldLost(conversation_id)
            row = conn.execute(
                select(conversations).where(conversations.c.id == conversation_id)
            ).one()
            if row.deleted_at is not None:
                return None
            if new_items is None:
                return int(row.version)
            _append(conn, row, new_items)
            return int(row.version) + 1

        return await self.db.write(work)
