"""The usage ledger (a row per settled response), spend per budget period, and budget checks.

Rows are written by one task in batches: the first row of a batch waits FLUSH_S for others
(and whatever queues during a write goes in the next), so settling a response never waits for
the database, and a busy process writes ten transactions a second, not one per response. A
crash loses at most the rows of the last FLUSH_S; rows the database refuses (an outage) are
kept and retried, and their spend still counts in this process's budget checks. Each batch
inserts its ledger rows and adds to the `spend` counters in one transaction. A budget check
reads those counters (one indexed query) plus what this process has queued but not written,
except while the budget is far from its cap: then it reads this process's view of them
(relay.access.spend_view), refreshed off the request's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache, partial
from typing import Any, NamedTuple

from sqlalchemy import Connection, Integer, func, insert, literal_column, select, tuple_

from relay.access.limits import Scope
from relay.access.spend_view import SpendKey, SpendViews
from relay.errors import QuotaExceeded
from relay.models.policy import NANOS_PER_USD, Policy
from relay.storage.database import Database
from relay.storage.dialects import driver_sql, postgresql, sqlite
from relay.storage.tables import spend, usage_ledger

log = logging.getLogger("relay.usage")
FLUSH_S = 0.1
# Rows the database refused are retried, backing off up to RETRY_MAX_S; at most
# MAX_UNWRITTEN are kept meanwhile (about 200 bytes each).
RETRY_MAX_S = 5.0
MAX_UNWRITTEN = 100_000
REPORT_FLUSH_S = 2.0
GROUPS = ("day", "hour", "model", "route", "deployment", "key", "project", "status")
HOUR_S = 3600
_COLUMNS = {
    "day": usage_ledger.c.day,
    # The hour a response settled in (UTC). A literal, not a parameter: PostgreSQL matches a
    # grouped expression to the selected one by its text, and two parameters differ.
    "hour": usage_ledger.c.created_at
    - usage_ledger.c.created_at % literal_column(str(HOUR_S), Integer),
    "model": usage_ledger.c.model,
    "route": usage_ledger.c.route,
    "deployment": usage_ledger.c.deployment,
    "key": usage_ledger.c.key_id,
    "project": usage_ledger.c.project_id,
    "status": usage_ledger.c.status,
}


class UsageRow(NamedTuple):
    """A ledger row; its fields are the table's columns (but the id)."""

    created_at: int
    day: str
    project_id: str
    key_id: str | None
    model: str
    route: str
    deployment: str | None
    response_id: str
    status: str
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    cost_nanos: int
    latency_ms: int
    estimated: bool  # tokens counted by Relay: the upstream reported none


_RENEWED = "Raise the budget, or wait for the next UTC {}."


def periods(now: float) -> tuple[str, str, str]:
    """The spend periods `now` falls in: its UTC day, its UTC month, all time."""
    return _periods(int(now))


@lru_cache(maxsize=4)
def _periods(second: int) -> tuple[str, str, str]:
    moment = datetime.fromtimestamp(second, UTC)
    return f"day:{moment:%Y-%m-%d}", f"month:{moment:%Y-%m}", "total"


def hour_name(second: int) -> str:
    """An hour of the usage report, as it names it: 2026-12-06T09:00Z (UTC)."""
    return f"{datetime.fromtimestamp(second, UTC):%Y-%m-%dT%H}:00Z"


def usd(nanos: int) -> float:
    return round(nanos / NANOS_PER_USD, 9)


SPEND_FIELDS = ("scope", "owner", "period", "cost_nanos")


class Ledger:
    def __init__(self, db: Database) -> None:
        self.db = db
        dialect = db.sync_engine.dialect.name
        # Both writes as the driver's own SQL, with the fields in its parameters' order: a
        # batch goes to the driver as tuples, with no per-row work of SQLAlchemy's (which cost
        # more than SQLite's insert itself, and a keyed request at C=1 a tenth of a millisecond).
        self._insert_sql, self._positions = driver_sql(
            insert(usage_ledger), UsageRow._fields, db.sync_engine.dialect
        )
        upsert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(spend)
        self._add_spend_sql, self._spend_positions = driver_sql(
            upsert.on_conflict_do_update(
                index_elements=[spend.c.scope, spend.c.owner, spend.c.period],
                set_={"cost_nanos": spend.c.cost_nanos + upsert.excluded.cost_nanos},
            ),
            SPEND_FIELDS,
            db.sync_engine.dialect,
        )
        self._queue: list[UsageRow] = []
        self._pending: defaultdict[SpendKey, int] = defaultdict(int)
        self._views = SpendViews(FLUSH_S)
        self._refreshing: set[SpendKey] = set()
        self._refreshes: set[asyncio.Task[None]] = set()
        self._writer: asyncio.Task[None] | None = None
        self._waiting: list[asyncio.Future[None]] = []  # for the rows queued `now`
        self._hurry = asyncio.Event()  # a row queued `now`: no wait for the batch
        # Rows queued so far, and of them those written (or lost): a report waits for the
        # rows queued before it, not for a writer that a steady flow keeps busy.
        self._added = 0
        self._through = 0
        self._progress = asyncio.Event()
        self._closing = False

    def add(self, row: UsageRow, *, now: bool = False) -> asyncio.Future[None] | None:
        """Queue `row`. `now`: write it without waiting for others to join its batch, and
        return what is done once it is written (or its write failed, which is logged): for
        rows that count against a budget, which other instances read from the database."""
        self._queue.append(row)
        self._added += 1
        if row.cost_nanos:
            for key in _spend_keys(row):
                self._pending[key] += row.cost_nanos
        written = None
        if now:
            written = asyncio.get_running_loop().create_future()
            self._waiting.append(written)
            self._hurry.set()
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write_all())
        return written

    async def flush(self) -> None:
        """Until everything added so far is written (while the database refuses rows, until
        it takes them again)."""
        while self._writer is not None:
            await asyncio.shield(self._writer)

    async def caught_up(self) -> None:
        """What this process queued so far, written: what a usage report or a response's cost
        reads first (unless the database is refusing rows just now: then after
        REPORT_FLUSH_S, without them). Rows queued meanwhile are not waited for."""
        target = self._added
        if self._through >= target:
            return
        self._hurry.set()  # the rows waited for go now, not after a batch's wait

        async def through() -> None:
            while self._through < target:
                await self._progress.wait()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(through(), REPORT_FLUSH_S)

    async def close(self) -> None:
        """Write what is queued; rows the database still refuses now are given up (logged)."""
        self._closing = True
        for refresh in self._refreshes:
            refresh.cancel()
        await asyncio.gather(*self._refreshes, return_exceptions=True)
        await self.flush()

    async def spent(self, owners: list[tuple[str, str]], now: float) -> dict[SpendKey, int]:
        """Spend of each (scope, owner) in each period `now` falls in, queued rows included."""
        keys = [(scope, owner, period) for scope, owner in owners for period in periods(now)]
        found = await self._read(keys)
        return {key: found[key] + self._pending.get(key, 0) for key in keys}

    async def _read(self, keys: list[SpendKey]) -> dict[SpendKey, int]:
        """The database's counters `keys` (0 where none), which this process's views take."""
        clock = time.monotonic()
        rows = await self.db.glance(
            lambda conn: conn.execute(
                select(spend.c.scope, spend.c.owner, spend.c.period, spend.c.cost_nanos).where(
                    tuple_(spend.c.scope, spend.c.owner, spend.c.period).in_(keys)
                )
            ).all()
        )
        found = {(row[0], row[1], row[2]): int(row[3]) for row in rows}
        values = {key: found.get(key, 0) for key in keys}
        for key, value in values.items():
            self._views.read(key, value, clock)
        return values

    def _refresh(self, keys: list[SpendKey]) -> None:
        """Read `keys` again, off the request's path (one read at a time per counter)."""
        keys = [key for key in keys if key not in self._refreshing]
        if not keys or self._closing:
            return
        self._refreshing.update(keys)
        task = asyncio.ensure_future(self._read_again(keys))
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)

    async def _read_again(self, keys: list[SpendKey]) -> None:
        try:
            await self._read(keys)
        except Exception as error:  # the views age, and budgets are checked by reads again
            log.warning("could not refresh spend counters: %s", error)
        finally:
            self._refreshing.difference_update(keys)

    async def standing(self, scope: str, owner: str, policy: Policy) -> dict[str, Any]:
        """What a project or key (`scope`) has spent in each budget period now, against its
        budgets (None: none), queued rows included: what its budget checks read."""
        now = time.time()
        spent = await self.spent([(scope, owner)], now)
        budgets = (policy.daily_budget_usd, policy.monthly_budget_usd, policy.credit_usd)
        return {
            "object": "spend",
            "scope": scope,
            "owner": owner,
            "periods": [
                {
                    "period": period.partition(":")[0],
                    "name": period.partition(":")[2] or None,
                    "spent_usd": usd(spent[(scope, owner, period)]),
                    "budget_usd": budget,
                }
                for period, budget in zip(periods(now), budgets, strict=True)
            ],
        }

    async def _write_all(self) -> None:
        failures = 0
        try:
            while self._queue:
                if failures:
                    await asyncio.sleep(min(RETRY_MAX_S, FLUSH_S * 2**failures))
                elif not self._hurry.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), FLUSH_S)
                self._hurry.clear()
                batch, self._queue = self._queue, []
                waiting, self._waiting = self._waiting, []
                try:
                    await self.db.write(partial(self._write, batch=batch))
                except Exception:
                    failures += 1
                    self._unwritten(batch, failures)
                else:
                    if failures:
                        log.warning("usage rows written again after %d failed tries", failures)
                    failures = 0
                    self._views.wrote(_totals(batch).items())
                    self._settled(batch)
                finally:
                    # A response waits for its budget's row no longer than one try: an
                    # outage must not hold answers back (the row is kept, and retried).
                    for future in waiting:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._writer = None

    def _unwritten(self, batch: list[UsageRow], failures: int) -> None:
        """Keep a batch the database refused, ahead of newer rows, to try again: a row is
        lost only past MAX_UNWRITTEN rows, or when the process stops before the database is
        back, and then the log names the responses."""
        if failures == 1:
            log.exception("could not write %d usage rows; retrying", len(batch))
        else:
            log.warning("could not write %d usage rows (try %d)", len(batch), failures)
        self._queue[:0] = batch
        excess = len(self._queue) - MAX_UNWRITTEN
        if self._closing or excess > 0:
            lost = self._queue if self._closing else self._queue[:excess]
            self._queue = [] if self._closing else self._queue[excess:]
            log.error(
                "%d usage rows lost (the database refused them): responses %s",
                len(lost),
                " ".join(row.response_id for row in lost),
            )
            self._settled(lost)

    def _settled(self, rows: list[UsageRow]) -> None:
        """Rows written (or lost): their spend is the database's now, no longer pending."""
        self._through += len(rows)
        # Wakes every report waiting; each checks whether its rows are through.
        self._progress.set()
        self._progress = asyncio.Event()
        for row in rows:
            for key in _spend_keys(row) if row.cost_nanos else ():
                self._pending[key] -= row.cost_nanos
                if not self._pending[key]:
                    del self._pending[key]

    def _write(self, conn: Connection, *, batch: list[UsageRow]) -> None:
        positions = self._positions
        conn.exec_driver_sql(
            self._insert_sql, [tuple(row[index] for index in positions) for row in batch]
        )
        totals = _totals(batch)
        if totals:
            positions = self._spend_positions
            conn.exec_driver_sql(
                self._add_spend_sql,
                [
                    tuple((*key, nanos)[index] for index in positions)
                    for key, nanos in totals.items()
                ],
            )

    async def check_budgets(self, scopes: list[Scope]) -> None:
        """Raise QuotaExceeded (402) when a scope has spent its budget for the period: read
        from the database, unless every budget is far from its cap (relay.access.spend_view)."""
        budgets = _budgets(scopes, time.time())
        if not budgets:
            return
        keys = [budget.key for budget in budgets]
        clock = time.monotonic()
        if self._far(budgets, clock):
            spent = {key: self._views.spent(key) + self._pending.get(key, 0) for key in keys}
            self._refresh(self._views.aging(keys, clock))
        else:
            found = await self._read(keys)
            spent = {key: found[key] + self._pending.get(key, 0) for key in keys}
        for budget in budgets:
            used = spent[budget.key]
            if used >= budget.cap_nanos:
                raise QuotaExceeded(
                    f"The {budget.scope.name} has used its {budget.what} of "
                    f"${budget.cap_usd:.2f} (spent ${usd(used):.4f}). {budget.remedy}"
                )

    def near(self, scopes: tuple[Scope, ...]) -> bool:
        """Whether a budget of `scopes` is near its cap (or not viewed well enough to tell):
        its spend must then be written before the response ends, for any instance to read."""
        budgets = _budgets(scopes, time.time())
        return bool(budgets) and not self._far(budgets, time.monotonic())

    def _far(self, budgets: list[_Budget], clock: float) -> bool:
        return all(
            self._views.far(budget.key, budget.cap_nanos, self._pending.get(budget.key, 0), clock)
            for budget in budgets
        )

    async def report(
        self,
        group_by: list[str],
        *,
        project: str | None,
        key: str | None,
        start: str | None,
        end: str | None,
    ) -> list[dict[str, Any]]:
        """Usage summed over `group_by` (of GROUPS), days from `start` to `end` inclusive."""
        await self.caught_up()
        columns = [_COLUMNS[name].label(name) for name in group_by]
        where = []
        if project is not None:
            where.append(usage_ledger.c.project_id == project)
        if key is not None:
            where.append(usage_ledger.c.key_id == key)
        if start is not None:
            where.append(usage_ledger.c.day >= start)
        if end is not None:
            where.append(usage_ledger.c.day <= end)
        query = (
            select(
                *columns,
                func.count().label("requests"),
                func.sum(usage_ledger.c.input_tokens).label("input_tokens"),
                func.sum(usage_ledger.c.cached_tokens).label("cached_tokens"),
                func.sum(usage_ledger.c.output_tokens).label("output_tokens"),
                func.sum(usage_ledger.c.cost_nanos).label("cost_nanos"),
                func.count().filter(usage_ledger.c.estimated).label("estimated"),
            )
            .where(*where)
            .group_by(*[_COLUMNS[name] for name in group_by])
            .order_by(*[_COLUMNS[name] for name in group_by])
        )
        rows = await self.db.read(lambda conn: conn.execute(query).mappings().all())
        report = []
        for row in rows:
            entry: dict[str, Any] = {name: row[name] for name in group_by}
            if "hour" in entry:
                entry["hour"] = hour_name(int(entry["hour"]))
            entry["requests"] = int(row["requests"])
            for name in ("input_tokens", "cached_tokens", "output_tokens"):
                entry[name] = int(row[name] or 0)
            entry["cost_usd"] = usd(int(row["cost_nanos"] or 0))
            # Of `requests`, those whose tokens Relay counted (the upstream reported none).
            entry["estimated_requests"] = int(row["estimated"] or 0)
            report.append(entry)
        return report


class _Budget(NamedTuple):
    scope: Scope
    key: SpendKey  # the counter it caps
    cap_usd: float
    cap_nanos: int
    what: str
    remedy: str


def _budgets(scopes: Iterable[Scope], now: float) -> list[_Budget]:
    """The budgets of `scopes` for the periods `now` falls in."""
    day, month, total = periods(now)
    found = []
    for scope in scopes:
        policy = scope.policy
        if not policy.has_budget:
            continue
        for period, cap, what, remedy in (
            (day, policy.daily_budget_usd, "daily budget", _RENEWED.format("day")),
            (month, policy.monthly_budget_usd, "monthly budget", _RENEWED.format("month")),
            (total, policy.credit_usd, "credit", "A credit never renews: raise it to top up."),
        ):
            if cap is not None:
                key = (scope.kind, scope.owner, period)
                found.append(_Budget(scope, key, cap, round(cap * NANOS_PER_USD), what, remedy))
    return found


def _totals(batch: list[UsageRow]) -> dict[SpendKey, int]:
    """What `batch` adds to each spend counter."""
    totals: defaultdict[SpendKey, int] = defaultdict(int)
    for row in batch:
        if row.cost_nanos:
            for key in _spend_keys(row):
                totals[key] += row.cost_nanos
    return totals


def _spend_keys(row: UsageRow) -> list[SpendKey]:
    owners = [("project", row.project_id)]
    if row.key_id is not None:
        owners.append(("key", row.key_id))
    return [(scope, owner, period) for scope, owner in owners for period in periods(row.created_at)]
