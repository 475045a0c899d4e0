"""What a process knows of the `spend` counters, so that a budget far from its cap is checked
without a database read, and one near it is checked exactly.

Each counter (scope, owner, period) is viewed as the highest value this process has read of it
(counters only grow), plus what this process itself wrote since, with the time of its last read
and the counter's rate, measured between reads: what every instance together spends. A budget
is *far* while its view is at most REFRESH_S old and what is left of it exceeds the headroom:
HEADROOM_SHARE of the budget, or HEADROOM_RATE times what the scope spends, at that rate, in the
time another instance's spend can stay unseen (REFRESH_S for the view, plus the ledger's batch
wait). Far: the request is admitted against the view, its spend is batched, and the view is
refreshed by a read off the request's path. Otherwise (near, no view yet, a view too old, a rate
not yet measured): the database is read before admission and the spend written before the
response's last event, so the client's next request on any instance is admitted against it.

The bound: admission against a view misses only what other instances spent since its read
(at most REFRESH_S plus a batch), and then only when that exceeds the headroom: a budget is
overshot beyond the responses running at once only by a scope whose spend grows, within a
second, past a tenth of the budget and past HEADROOM_RATE times its measured rate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

SpendKey = tuple[str, str, str]  # scope, owner, period

REFRESH_S = 1.0
HEADROOM_SHARE = 0.1
HEADROOM_RATE = 4.0
# A rate measured over less than this is too noisy to trust (a burst's first few requests).
MIN_SAMPLE_S = REFRESH_S / 2
# Counters viewed in a process (the least lately read dropped first): three per budgeted scope.
MAX_VIEWS = 30_000


@dataclass(slots=True)
class _View:
    spent: int  # nano-dollars: the highest value read, plus this process's writes since
    read_at: float  # monotonic seconds of the last read
    sample: int  # the counter where the rate's current interval began
    sample_at: float
    rate: float | None = None  # nano-dollars a second, all instances; None: not yet measured


class SpendViews:
    def __init__(self, unseen_s: float) -> None:
        # How long a spend can stay unseen by another instance: the view's age and a batch.
        self._horizon_s = REFRESH_S + unseen_s
        self._views: dict[SpendKey, _View] = {}

    def read(self, key: SpendKey, value: int, clock: float) -> None:
        """The database's counter `key` read as `value` at `clock`."""
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= MAX_VIEWS:
                del self._views[next(iter(self._views))]
            self._views[key] = _View(value, clock, value, clock)
            return
        # Last in the dict again: the oldest dropped first are those read least lately.
        self._views[key] = self._views.pop(key)
        view.spent = max(view.spent, value)
        view.read_at = clock
        if clock - view.sample_at >= MIN_SAMPLE_S:
            view.rate = (view.spent - view.sample) / (clock - view.sample_at)
            view.sample, view.sample_at = view.spent, clock

    def wrote(self, totals: Iterable[tuple[SpendKey, int]]) -> None:
        """This process added these amounts to the counters: they are at least that higher."""
        for key, nanos in totals:
            view = self._views.get(key)
            if view is not None:
                view.spent += nanos

    def far(self, key: SpendKey, cap: int, pending: int, clock: float) -> bool:
        """Whether the budget `cap` (nano-dollars) of `key` is far enough from what is spent,
        `pending` (this process's unwritten spend) included, to be checked against the view."""
        view = self._views.get(key)
        if view is None or view.rate is None or clock - view.read_at > REFRESH_S:
            return False
        headroom = max(HEADROOM_SHARE * cap, HEADROOM_RATE * view.rate * self._horizon_s)
        return view.spent + pending + headroom < cap

    def spent(self, key: SpendKey) -> int:
        """The counter as viewed (0 where there is no view)."""
        view = self._views.get(key)
        return 0 if view is None else view.spent

    def aging(self, keys: Iterable[SpendKey], clock: float) -> list[SpendKey]:
        """Those of `keys` whose view is older than half REFRESH_S: to read again now, so
        that a view in use never gets too old to trust."""
        return [key for key in keys if clock - self._views[key].read_at > REFRESH_S / 2]
