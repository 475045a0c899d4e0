"""SQLite's WAL checkpoints run on a thread of their own (relay.storage.checkpoints), never in
a commit, and the log still starts over under steady saves: a real file, real saves."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

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


async def test_a_long_read_keeps_writers_waiting_briefly_and_seldom(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that holds the log's old frames (an open read transaction) stops a RESTART:
    the writers, who wait on its lock meanwhile, wait RESTART_WAIT_S at most, and the next
    try comes once the log has doubled."""
    monkeypatch.setattr(checkpoints, "RESTART_FRAMES", 100)
    monkeypatch.setattr(checkpoints, "CHECKPOINT_COMMITS", 1)
    monkeypatch.setattr(checkpoints, "INTERVAL_S", 0.005)
    restarts: list[tuple[int, int, int]] = []
    checkpointed = checkpoints._checkpointed

    def counted(conn: Any, mode: str) -> tuple[int, int, int]:
        answer = checkpointed(conn, mode)
        if mode == "RESTART":
            restarts.append(answer)
        return answer

    monkeypatch.setattr(checkpoints, "_checkpointed", counted)
    store = await open_store(f"sqlite:///{tmp_path}/relay.db")
    reader = sqlite3.connect(tmp_path / "relay.db", isolation_level=None)
    slowest, saves = 0.0, 0
    try:
        await store.save_response("tenant", *make_turn("resp_first"))
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM responses").fetchone() == (1,)
        deadline = time.monotonic() + 3
        # About 10 frames a save: the log doubles 5 times from the first restart's 100.
        while saves < 320 and time.monotonic() < deadline:
            started = time.monotonic()
            await store.save_response("tenant", *make_turn(f"resp_{saves}", inputs=2))
            slowest = max(slowest, time.monotonic() - started)
            saves += 1
    finally:
        reader.execute("ROLLBACK")
        reader.close()
        await store.db.close()
    # SQLite's busy timeout of 10 s held every save here until the reader left; a restart
    # tried at every checkpoint kept the writers waiting nearly all the time.
    assert slowest < 1.0, slowest
    assert saves == 320, f"{saves} saves in 3 s, after {len(restarts)} restarts"
    assert restarts and all(busy for busy, _, _ in restarts), restarts
    assert len(restarts) <= 8, restarts
