"""Conversations in storage: their items in order, and the hold a response takes on one while
it continues it. Every call is scoped to a tenant, as responses are: another tenant's
conversation is indistinguishable from a missing one."""

from __future__ import annotations

import time
from typing import Any, Literal

import orjson
from sqlalchemy import Connection, delete, insert, or_, select, update

from relay.errors import Conflict, NotFound
from relay.storage.base import ItemPage
from relay.storage.database import Database
from relay.storage.sql import json_text
from relay.storage.tables import conversation_items as items
from relay.storage.tables import conversations

_BUSY = "Another response is in progress for this conversation; retry when it has completed."


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
    def __init__(self, db: Database) -> None:
        self.db = db

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

    async def hold(self, tenant: str, conversation_id: str, token: str, hold_s: float) -> int:
        """Take the conversation for one response: its version, or 404 / 409 (another
        response holds it; a hold whose process died lapses after `hold_s`)."""
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
                .values(active_token=token, active_until=now + int(hold_s))
            )
            if not taken.rowcount:
                raise Conflict(_BUSY, param="conversation", code="conversation_locked")
            # Read again under the hold: a turn released between the first read and the
            # update (PostgreSQL, read committed) has changed it.
            version = conn.execute(
                select(conversations.c.version).where(conversations.c.id == conversation_id)
            ).scalar()
            return int(version or 0)

        return await self.db.write(work)

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
        transaction; the conversation's new version (None when it was deleted meanwhile)."""

        def work(conn: Connection) -> int | None:
            row = conn.execute(
                select(conversations).where(conversations.c.id == conversation_id)
            ).first()
            if row is None or row.active_token != token:
                return None
            if new_items is not None and row.deleted_at is None:
                _append(conn, row, new_items)
            conn.execute(
                update(conversations)
                .where(conversations.c.id == conversation_id)
                .values(active_token=None, active_until=None)
            )
            version = conn.execute(
                select(conversations.c.version).where(conversations.c.id == conversation_id)
            ).scalar()
            return None if row.deleted_at is not None else int(version or 0)

        return await self.db.write(work)
