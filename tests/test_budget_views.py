"""Budgets checked against a process's view of the spend counters while far from their cap
(no database read on the request's path), and exactly near it: the bound relay.access.spend_view
states, with two ledgers on one database as two instances."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from usage_rows import usage_row

from relay.access import spend_view, usage
from relay.access.limits import Scope
from relay.access.spend_view import SpendViews
from relay.access.usage import Ledger, UsageRow
from relay.errors import QuotaExceeded
from relay.models.policy import NANOS_PER_USD, Policy
from relay.storage.database import open_database

KEY = ("key", "key_a", "total")
REFRESH_S = spend_view.REFRESH_S


def test_a_view_is_far_only_when_fresh_measured_and_clear_of_the_headroom() -> None:
    views = SpendViews(unseen_s=0.1)  # horizon: REFRESH_S (1 s) + 0.1 s
    assert not views.far(KEY, 100_000, 0, 0.0)  # no view
    views.read(KEY, 0, 0.0)
    assert not views.far(KEY, 100_000, 0, 0.1)  # no rate measured yet
    views.read(KEY, 1000, 1.0)  # 1000 nanos a second, all instances together
    assert views.far(KEY, 100_000, 0, 1.0)  # headroom: a tenth of the budget
    assert not views.far(KEY, 100_000, 89_500, 1.0)  # pending spend counts
    assert views.far(KEY, 12_000, 0, 1.0)  # headroom: 4 x 1000/s x 1.1 s = 4400
    assert not views.far(KEY, 5_000, 0, 1.0)
    assert not views.far(KEY, 100_000, 0, 2.1)  # read more than REFRESH_S ago
    views.wrote([(KEY, 50_000)])
    assert views.spent(KEY) == 51_000
    views.read(KEY, 40_000, 2.2)  # a read that began before the write: counters only grow
    assert views.spent(KEY) == 51_000
    assert views.aging([KEY], 2.2) == []
    assert views.aging([KEY], 2.8) == [KEY]


@pytest.fixture
async def two_ledgers(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Ledger, Ledger, Callable[[], int]]]:
    """Two instances' ledgers on one database, and how many reads the first has made."""
    monkeypatch.setattr(usage, "FLUSH_S", 0.01)
    db = await open_database(store_url)
    reads = 0
    glance = db.glance

    async def counted(work: Any) -> Any:
        nonlocal reads
        reads += 1
        return await glance(work)

    first, second = Ledger(db), Ledger(db)
    monkeypatch.setattr(first, "db", type("Counted", (), {"glance": staticmethod(counted)})())
    try:
        yield first, second, lambda: reads
    finally:
        await first.close()
        await second.close()
        await db.close()


def credit(usd: float) -> list[Scope]:
    return [Scope("key", "key_a", Policy(credit_usd=usd))]


def spending(cost_usd: float, number: int = 0) -> UsageRow:
    return usage_row(
        number, project_id="proj_views", key_id="key_a", cost_nanos=round(cost_usd * NANOS_PER_USD)
    )


async def warm(ledger: Ledger, scopes: list[Scope]) -> None:
    """Two reads MIN_SAMPLE_S apart: the view has a rate, and may be far."""
    await ledger.check_budgets(scopes)
    await asyncio.sleep(spend_view.MIN_SAMPLE_S)
    await ledger.check_budgets(scopes)


async def test_a_budget_far_from_its_cap_is_checked_without_a_read(
    two_ledgers: tuple[Ledger, Ledger, Callable[[], int]],
) -> None:
    ledger, _, reads = two_ledgers
    scopes = credit(10.0)
    await warm(ledger, scopes)
    assert reads() == 2
    for _ in range(20):
        await ledger.check_budgets(scopes)
    assert reads() == 2  # far: the view answers
    assert not ledger.near(tuple(scopes))  # and a response's spend is batched
    await asyncio.sleep(REFRESH_S * 0.6)
    await ledger.check_budgets(scopes)  # admitted at once, the view read again meanwhile
    await asyncio.sleep(0.1)
    assert reads() == 3

    ledger.add(spending(9.5))  # its own spend, not written yet, counts at once
    assert ledger.near(tuple(scopes))
    await ledger.check_budgets(scopes)  # near: read (still $0.50 left)
    assert reads() == 4


async def test_another_instance_spend_is_seen_within_refresh_s_and_at_once_near_the_cap(
    two_ledgers: tuple[Ledger, Ledger, Callable[[], int]],
) -> None:
    first, second, _ = two_ledgers
    scopes = credit(1.0)
    await warm(first, scopes)

    # The bound: far, the first instance misses what the second spent since its last read...
    written = second.add(spending(1.0), now=True)
    assert written is not None
    await asyncio.wait_for(written, 5)
    await first.check_budgets(scopes)
    # ... for at most REFRESH_S: then its view is too old to trust, and it reads.
    await asyncio.sleep(REFRESH_S)
    with pytest.raises(QuotaExceeded):
        await first.check_budgets(scopes)
    assert first.near(tuple(scopes))

    # Near the cap every check reads: a top-up's spend, written by the other instance, is
    # seen by the very next check.
    topped_up = credit(3.0)
    await first.check_budgets(topped_up)  # $1 of $3 spent: near (within 4x the rate)
    written = second.add(spending(2.0, 1), now=True)
    assert written is not None
    await asyncio.wait_for(written, 5)
    with pytest.raises(QuotaExceeded):
        await first.check_budgets(topped_up)
