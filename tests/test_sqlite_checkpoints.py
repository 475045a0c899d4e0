"""SQLite's WAL checkpoints run on a thread of their own (relay.storage.checkpoints), never in
a commit, and the log still starts over under steady saves: a real file, real saves."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from test_storage import make_turn

from relay.storage import checkpoints
from relay.storage.sql import open_store


async def test_no_commit_checkpoints(tmp_path: Path) -> None:
    """Every connection Relay writes with has SQLite's automatic checkpoint off: a save on the
    event loop never copies the log back inside its commit."""
    store = await open_store(f"sqlite:///{tmp_path}/relay.db")
    try:
        for engine in store.db.engines:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        for n in range(150):  # past SQLite's own threshold (1,000 pages)
            await store.save_response("tenant", *make_turn(f"resp_{n}"))
    finally:
        await store.db.close()
    # Closing checkpoints the whole log: every save is in the database file alone.
    assert not (tmp_path / "relay.db-wal").exists()
    with sqlite3.connect(tmp_path / "relay.db") as conn:
        assert conn.execute("SELECT count(*) FROM responses").fetchone() == (150,)


async def test_the_log_starts_over_under_steady_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saves that never pause: a checkpoint beside them never finds every frame copied, so
    the log would never start over by itself and grew by every page of every save (over a
    hundred megabytes here). It stays near RESTART_FRAMES, and nothing is lost."""
    monkeypatch.setattr(checkpoints, "RESTART_FRAMES", 300)
    monkeypatch.setattr(checkpoints, "INTERVAL_S", 0.005)
    store = await open_store(f"sqlite:///{tmp_path}/relay.db")
    wal = tmp_path / "relay.db-wal"
    largest, saving = 0, threading.Event()

    def watch() -> None:  # a thread: the saves below never leave the event loop to a task
        nonlocal largest
        while not saving.wait(0.002):
            largest = max(largest, wal.stat().st_size if wal.exists() else 0)

    watcher = threading.Thread(target=watch)
    watcher.start()
    saves = 3000
    try:
        for n in range(saves):
            await store.save_response("tenant", *make_turn(f"resp_{n}", inputs=2))
    finally:
        saving.set()
        watcher.join()
        await store.db.close()
    # 1.2 MB of frames at the restart, some more of saves meanwhile: 3-4 MB here, against
    # 130 MB without restarts.
    assert largest < 16e6, f"the log grew to {largest / 1e6:.1f} MB"
    with sqlite3.connect(tmp_path / "relay.db") as conn:
        assert conn.execute("SELECT count(*) FROM responses").fetchone() == (saves,)
