"""The storage contract. Storage writes what it is given: the engine makes every id and time.

Every call is scoped to a tenant: a row of another tenant is indistinguishable from a missing
one, so ownership checks cannot fail open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol


@dataclass(slots=True)
class ItemPage:
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool

    def as_list(self) -> dict[str, Any]:
        """The page as the API answers it (`"object": "list"`, its ids and whether more
        follow)."""
        return {
            "object": "list",
            "data": self.data,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "has_more": self.has_more,
        }


class Store(Protocol):
    async def save_response(
        self,
        tenant: str,
        response: dict[str, Any],
        input_items: list[dict[str, Any]] | None,
    ) -> int:
        """Persist a finished response (its `output` holds the output items) and its own input
        items, in one transaction (None: those stored before are kept, as a queued response's
        end that never ran keeps the input it was asked with). Items already carry their ids.
        Returns the size of the items' JSON, which a history holding them costs in memory."""
        ...

    async def get_response(self, tenant: str, response_id: str) -> dict[str, Any] | None:
        """The stored response object, or None when unknown, deleted or another tenant's."""
        ...

    async def is_visible(self, tenant: str, response_id: str) -> bool:
        """Whether get_response would find it (one indexed lookup)."""
        ...

    async def delete_response(self, tenant: str, response_id: str) -> bool:
        """Soft-delete; False when there was nothing (visible) to delete."""
        ...

    async def load_context(self, tenant: str, response_id: str) -> list[dict[str, Any]] | None:
        """The conversation up to and including `response_id`: for each response of the chain,
        oldest first, its input items then its output items. None when `response_id` itself is
        unknown, deleted or another tenant's. Costs a bounded number of queries, whatever the
        chain's length."""
        ...

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
        """A page of one response's own input items; None when the response is not visible."""
        ...

    async def get_items(self, tenant: str, item_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Stored items (input or output) of this tenant's visible responses, by item id, for
        item_reference inputs. Unknown ids are simply absent from the result."""
        ...

    async def close(self) -> None: ...
