"""Log lines to stderr, written in batches.

A response ends with one log line. Written and flushed one at a time, each costs a write to
stderr on the response's path (Python's stderr is line-buffered); a handler on a thread of its
own (QueueHandler) moves that off the path, but wakes a thread per line, which cost more CPU
under load than the writes it saved. Here lines are buffered and written every FLUSH_S by
one daemon thread, and at once from WARNING up, so problems reach the log without delay; a
process killed outright loses at most FLUSH_S of info lines.

Each line carries its time and the id of the request it was written for (`REQUEST_ID`, set by
the application's outermost layer; tasks a request starts inherit it), so that an operator
can follow a client's X-Request-ID through the log.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from contextvars import ContextVar
from typing import TextIO

FLUSH_S = 0.1
FORMAT = "%(asctime)s %(levelname)s %(name)s%(request)s: %(message)s"
# The id of the request a line is written for ("": none, such as the start-up's lines).
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")


class WithRequestId(logging.Filter):
    """Adds the request id to each record, for FORMAT: ` [<id>]`, or nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request = f" [{request_id}]" if request_id else ""
        return True


class BatchedStderr(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self) -> None:
        super().__init__(_buffered_stderr())
        self._stop = threading.Event()
        threading.Thread(target=self._flush_now_and_then, name="relay-log", daemon=True).start()

    @property
    def writing(self) -> bool:
        """Whether its thread still writes its lines out (until it is closed)."""
        return not self._stop.is_set()

    def flush(self) -> None:
        """Called after each line: nothing (the thread writes them out)."""

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self.write_out()

    def write_out(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if not self.stream.closed:
                self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        self.write_out()
        super().close()

    def _flush_now_and_then(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self.write_out()


def _buffered_stderr() -> TextIO:
    """Standard error's file, block-buffered; or sys.stderr as it is where it has no file
    (a test's capture)."""
    try:
        descriptor = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return sys.stderr
    raw = io.FileIO(descriptor, "wb", closefd=False)
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", errors="backslashreplace")
