"""Recent conversations' histories in memory, so that continuing one does not read and
translate its whole chain again at every turn.

Stored items never change once a response is saved, so a history kept here equals what the
store would rebuild; only visibility can change (a delete, maybe by another process), and the
engine asks the store about that on every hit. Each process keeps its own; a miss (another
worker, a restart, an evicted entry) reads the chain from the store as before.
"""

from __future__ import annotations

from collections import OrderedDict

from relay.providers.base import History


class HistoryCache:
    """Histories by (tenant, response id), least recently used out first, within a budget of
    items held (an item shared by several histories counts once per history)."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._entries: OrderedDict[tuple[str, str], History] = OrderedDict()
        self._held = 0

    def get(self, tenant: str, response_id: str) -> History | None:
        key = (tenant, response_id)
        history = self._entries.get(key)
        if history is not None:
            self._entries.move_to_end(key)
        return history

    def put(self, tenant: str, response_id: str, history: History) -> None:
        if not self.max_items or len(history.items) > self.max_items:
            return
        self.discard(tenant, response_id)
        self._entries[(tenant, response_id)] = history
        self._held += len(history.items)
        while self._held > self.max_items:
            _, evicted = self._entries.popitem(last=False)
            self._held -= len(evicted.items)

    def discard(self, tenant: str, response_id: str) -> None:
        history = self._entries.pop((tenant, response_id), None)
        if history is not None:
            self._held -= len(history.items)

    def __len__(self) -> int:
        return len(self._entries)
