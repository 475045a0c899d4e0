"""Recent conversations' histories in memory, so that continuing one does not read and
translate its whole chain again at every turn.

Stored items never change once a response is saved, so a history kept here equals what the
store would rebuild; only visibility can change (a delete, maybe by another process), and the
engine asks the store about that on every hit. Each process keeps its own; a miss (another
worker, a restart, an evicted or never-kept entry) reads the chain from the store as before.
"""

from __future__ import annotations

from collections import OrderedDict

from relay.providers.base import History

# What a history costs per byte of its items' JSON: the items themselves, and the upstream
# translation a provider derives from them and keeps with the history (see History.derive).
COST_PER_BYTE = 2
# A history costing more than 1/MAX_SHARE of the byte budget is never kept: one huge input
# would otherwise push most other conversations out, and still pin the memory. Long agent
# sessions (a few MB of JSON) stay within it at the default budget.
MAX_SHARE = 4


def cost(history: History) -> int:
    return COST_PER_BYTE * history.size()


class HistoryCache:
    """Histories by (tenant, response id), least recently used out first, within a budget of
    items and one of bytes (an item shared by several histories counts once per history: each
    holds its own translation of it)."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], History] = OrderedDict()
        self._items = 0
        self._bytes = 0
        # Lookups so far, for the metrics (read now and then: relay.observe.metrics).
        self.hits = 0
        self.misses = 0

    def get(self, tenant: str, response_id: str) -> History | None:
        key = (tenant, response_id)
        history = self._entries.get(key)
        if history is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return history

    def put(self, tenant: str, response_id: str, history: History) -> None:
        too_big = len(history.items) > self.max_items or cost(history) > self.max_bytes // MAX_SHARE
        if too_big or not self.max_items or not self.max_bytes:
            return
        self.discard(tenant, response_id)
        self._entries[(tenant, response_id)] = history
        self._items += len(history.items)
        self._bytes += cost(history)
        while self._items > self.max_items or self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._forget(evicted)

    def discard(self, tenant: str, response_id: str) -> None:
        history = self._entries.pop((tenant, response_id), None)
        if history is not None:
            self._forget(history)

    def _forget(self, history: History) -> None:
        self._items -= len(history.items)
        self._bytes -= cost(history)

    @property
    def held_bytes(self) -> int:
        """The cost of what is kept, as charged against `max_bytes`."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)
