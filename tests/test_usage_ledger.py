"""The usage ledger while its database refuses writes: rows are kept and retried, their
spend still counts in budget checks, and none is lost silently."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from usage_rows import usage_row

from relay.access import usage
from relay.access.usage import Ledger, UsageRow, periods
from relay.storage.database import SqliteDatabase, open_database


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[tuple[SqliteDatabase, Path]]:
    path = tmp_path / "relay.db"
    opened = await open_database(f"sqlite:///{path}")
    assert isinstance(opened, SqliteDatabase)
    try:
        yield opened, path
    finally:
        await opened.close()


def row(number: int, cost_nanos: int = 1000) -> UsageRow:
    return usage_row(number, project_id="proj_ledger", key_id=None, cost_nanos=cost_nanos)


def take_table_away(path: Path, away: bool) -> None:
    """Make the ledger's inserts fail (the table gone), or work again."""
    names = ("usage_ledger", "usage_ledger_away")
    old, new = names if away else names[::-1]
    with sqlite3.connect(path) as conn:
        conn.execute(f"ALTER TABLE {old} RENAME TO {new}")


async def ledger_rows(db: SqliteDatabase) -> list[str]:
    rows = await db.read(
        lambda conn: conn.execute(text("SELECT response_id FROM usage_ledger")).all()
    )
    return sorted(str(found[0]) for found in rows)


async def test_rows_refused_by_the_database_are_retried_and_still_count(
    database: tuple[SqliteDatabase, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    db, path = database
    monkeypatch.setattr(usage, "FLUSH_S", 0.01)
    ledger = Ledger(db)
    take_table_away(path, away=True)
    for number in range(3):
        ledger.add(row(number))
    written = ledger.add(row(3), now=True)  # a budget's row: its response waits one try
    assert written is not None
    await asyncio.wait_for(written, 5)
    await asyncio.sleep(0.2)  # a few failed tries
    owner = [("project", "proj_ledger")]
    spent = await ledger.spent(owner, time.time())
    assert set(spent.values()) == {4000}  # the refused rows' spend still counts here
    take_table_away(path, away=False)
    await asyncio.wait_for(ledger.flush(), 10)
    assert await ledger_rows(db) == [f"resp_{number}" for number in range(4)]
    assert set((await ledger.spent(owner, time.time())).values()) == {4000}  # once, from the db


async def test_rows_still_refused_at_shutdown_are_named_in_the_log(
    database: tuple[SqliteDatabase, Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db, path = database
    monkeypatch.setattr(usage, "FLUSH_S", 0.01)
    ledger = Ledger(db)
    take_table_away(path, away=True)
    ledger.add(row(7))
    await asyncio.sleep(0.1)
    with caplog.at_level(logging.ERROR, logger="relay.usage"):
        await asyncio.wait_for(ledger.close(), 10)
    assert "1 usage rows lost" in caplog.text and "resp_7" in caplog.text


async def test_usage_by_the_hour_and_by_status(store_url: str) -> None:
    """What the console's charts read: the hour each response settled in (UTC) and its
    status, summed the same way on SQLite and PostgreSQL."""
    db = await open_database(store_url)
    ledger = Ledger(db)
    hour = 1_800_000_000 - 1_800_000_000 % 3600  # 2027-01-15T08:00Z
    try:
        for number, (second, status) in enumerate(
            [(hour + 5, "completed"), (hour + 3599, "failed"), (hour + 3600, "completed")]
        ):
            day = periods(second)[0].removeprefix("day:")
            ledger.add(row(number)._replace(created_at=second, day=day, status=status))
        report = await ledger.report(
            ["hour", "status"], project="proj_ledger", key=None, start=None, end=None
        )
        assert [(entry["hour"], entry["status"], entry["requests"]) for entry in report] == [
            ("2027-01-15T08:00Z", "completed", 1),
            ("2027-01-15T08:00Z", "failed", 1),
            ("2027-01-15T09:00Z", "completed", 1),
        ]
    finally:
        await ledger.close()
        await db.close()


async def test_a_report_waits_for_its_rows_not_for_a_steady_flow(
    database: tuple[SqliteDatabase, Path],
) -> None:
    """Under a steady flow of settled responses the writer never stops; a report (a
    response's cost in the console, a usage report) still returns once the rows queued
    before it are written, well before REPORT_FLUSH_S."""
    db, _ = database
    ledger = Ledger(db)
    stop = asyncio.Event()

    async def steady_flow() -> None:
        number = 1_000
        while not stop.is_set():
            for _ in range(5):  # busy enough that the queue is never empty between batches
                ledger.add(row(number))
                number += 1
            await asyncio.sleep(0.001)

    flow = asyncio.ensure_future(steady_flow())
    try:
        await asyncio.sleep(0.3)  # the writer busy with batch after batch
        ledger.add(row(1))
        started = time.monotonic()
        await ledger.caught_up()
        waited = time.monotonic() - started
        assert "resp_1" in await ledger_rows(db)
        assert waited < usage.REPORT_FLUSH_S / 2, waited
    finally:
        stop.set()
        await flow
        await ledger.close()
