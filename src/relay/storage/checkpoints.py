"""SQLite's WAL checkpoints, on a thread of their own.

SQLite checkpoints by default in the connection whose commit takes the log past 1,000 pages,
inside that commit: the pages copied back into the database file and both files synced, some
milliseconds. When the commit was a save on the event loop (SqliteDatabase.write_awaited),
every request of the process waited for it: most of a stored response's p99 at one
connection (8-10 ms against 3-4 ms without). Relay's connections turn that off
(`PRAGMA wal_autocheckpoint = 0`) and this thread checkpoints instead, once
`CHECKPOINT_COMMITS` commits have added to the log since the last (about SQLite's threshold
for saves; a process that only writes the usage ledger's batches checkpoints every few
seconds), at most every `INTERVAL_S`:

- PASSIVE first: it copies what it can without waiting for readers or writers, nor they for
  it, beyond SQLite's brief locks.
- The log only starts over from its beginning when a writer finds every frame copied, which
  a checkpoint racing steady writes never leaves (it takes milliseconds: the log grew by a
  gigabyte in 20 seconds of saves at one connection). So once it holds `RESTART_FRAMES`,
  the thread takes the writers' lock (the advisory file lock every Relay writer of the file
  takes: relay.storage.database) and checkpoints in RESTART mode, which copies the few
  frames PASSIVE left and has the next write start the log over. Writers wait for that (two
  syncs, about 7 ms here), on the writer thread: the event loop's own writes see the lock
  taken and go there too, so the loop never waits. Under steady saves that happens about
  once a second, rarely enough to stay out of the p99; a log that starts over by itself
  (a checkpoint that no write raced) never gets there. A reader still on the log's old
  frames makes RESTART wait, the writers with it: RESTART_WAIT_S at most, and after one it
  stopped, the next waits for the log to double.

Every process on the file runs one; when two coincide, one finds the checkpoint taken and
leaves it to the other.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine

log = logging.getLogger("relay.storage")

# A save adds 10-20 pages to the log: 64 of them, about the 1,000 pages after which SQLite
# would have checkpointed.
CHECKPOINT_COMMITS = 64
# The shortest time between two checkpoints, so that one at a thousand saves a second copies
# back about 1,000 pages, not a few.
INTERVAL_S = 0.1
# How long a RESTART waits for readers still on the log's old frames (SQLite's busy timeout
# on the thread's connection), the writers waiting meanwhile: past it, the checkpoint gives up
# without restarting the log, and the next one tries again.
RESTART_WAIT_S = 0.1
# 64 MB of 4 KiB pages (SQLite's own threshold, `wal_autocheckpoint`, is 1,000): about a
# second of saves at a thousand a second (a save writes 10-20 pages).
RESTART_FRAMES = 16_384


class Checkpoints:
    """Checkpoints `engine`'s database (its own connection: a StaticPool engine) once
    `written` has been called CHECKPOINT_COMMITS times, at most every INTERVAL_S, until
    `close`. `lock_path`: the writers' advisory lock file (None: SQLite's busy handler is all
    that orders writers)."""

    def __init__(self, engine: Engine, lock_path: str | None) -> None:
        self._engine = engine
        self._lock = None if lock_path is None else os.open(lock_path, os.O_RDWR)
        self._commits = 0  # since the last checkpoint (an increment lost to a race is harmless)
        self._restart_at = RESTART_FRAMES  # the log's frames at which to restart it
        self._written = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="relay-sqlite-checkpoints", daemon=True
        )
        self._thread.start()

    def written(self) -> None:
        """A commit added to the log."""
        self._commits += 1
        if self._commits >= CHECKPOINT_COMMITS:
            self._written.set()

    def _run(self) -> None:
        while True:
            self._written.wait()
            if self._closing.is_set():
                return
            self._written.clear()
            self._commits = 0
            try:
                with self._engine.connect() as conn:
                    self._checkpoint(conn)
            except Exception as error:  # the next write asks again
                log.warning("SQLite checkpoint failed: %s", error)
            if self._closing.wait(INTERVAL_S):
                return

    def _checkpoint(self, conn: Connection) -> None:
        _, frames, _ = _checkpointed(conn, "PASSIVE")
        if frames < self._restart_at:
            return
        with writers_wait(self._lock):
            busy, _, _ = _checkpointed(conn, "RESTART")
        # A reader kept old frames past RESTART_WAIT_S: the next try once the log has doubled,
        # so that a long read keeps the writers waiting a few times, not at every checkpoint.
        self._restart_at = 2 * frames if busy else RESTART_FRAMES

    def close(self) -> None:
        """Stops the thread (a checkpoint under way finishes first); SQLite checkpoints the
        whole log itself as the last connection to the file closes."""
        self._closing.set()
        self._written.set()
        self._thread.join()
        self._engine.dispose()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None


@contextmanager
def writers_wait(lock: int | None) -> Iterator[None]:
    """Holds the writers' advisory file lock (`lock`: a descriptor of the lock file of one's
    own; flock excludes open file descriptions, not threads), or nothing where there is none."""
    if lock is None:
        yield
        return
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)


def _checkpointed(conn: Connection, mode: str) -> tuple[int, int, int]:
    """(busy, frames in the log, frames copied): SQLite's answer to a checkpoint."""
    busy, frames, copied = conn.exec_driver_sql(f"PRAGMA wal_checkpoint({mode})").one()
    return int(busy), int(frames), int(copied)
