"""Log lines to stderr, written in batches.

A response ends with one log line. Written and flushed one at a time, each costs a write to
stderr on the response's path (Python's stderr is line-buffered); a handler on a thread of its
own (QueueHandler) moves that off the path, but wakes a thread per line, which cost more CPU
under load than the writes it saved. Here lines are buffered and written every FLUSH_S by
one daemon thread, and at once from WARNING up, so problems reach the log without delay; a
process killed outright loses at most FLUSH_S of info lines.

Each line carries its time and the id of the request it was written for (`REQUEST_ID`, set by
the application's outermost layer; tasks a request starts inherit it), so that an operator
can follow a client's X-Request-ID through the log. A line may carry `fields` (an access
line's, relay.observe.access): as `name=value` after the message in text, as keys in JSON
(`log_format = "json"`, one object a line, for log pipelines).
"""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

FLUSH_S = 0.1
FORMAT = "%(asctime)s %(levelname)s %(name)s%(request)s: %(message)s"
# The id of the request a line is written for ("": none, such as the start-up's lines).
REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")


# Fields a text line shows already (the request id in its prefix, the access line's message
# "POST /v1/responses 200"): JSON keeps them as keys, text does not repeat them.
SHOWN = frozenset(["request_id", "method", "path", "status"])


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        # Formatted as the line is written, in the thread and context that wrote it.
        request_id = REQUEST_ID.get()
        record.request = f" [{request_id}]" if request_id else ""
        line = super().format(record)
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        if fields is None:
            return line
        shown = [
            f"{name}={plain(value) if type(value) is str else value}"
            for name, value in fields.items()
            if value is not None and name not in SHOWN
        ]
        return f"{line} {' '.join(shown)}"


# Text shown as it is in a line: printable ASCII but for the space, '"' and '=' (numbers are
# shown as they are).
_BARE = re.compile(r"[!#-<>-~]*")


def plain(text: str) -> str:
    """A field's text in a text line: as it is, or quoted where a client's text could
    otherwise pass for another field or start a line of its own."""
    if _BARE.fullmatch(text):
        return text
    return orjson.dumps(text).decode()


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, request_id, message, the
    line's fields, and the exception's traceback where there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "request_id": REQUEST_ID.get() or None,
            "message": record.getMessage(),
        }
        fields: dict[str, Any] | None = getattr(record, "fields", None)
        if fields is not None:
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class BatchedStderr(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self) -> None:
        super().__init__(_buffered_stderr())
        self._stop = threading.Event()
        threading.Thread(target=self._flush_now_and_then, name="relay-log", daemon=True).start()

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


def configure(level: str, log_format: str) -> None:
    """Relay's handler on the root logger, at `level` ("info"...), in `log_format` ("text" or
    "json")."""
    root = logging.getLogger()
    if root.handlers:
        return  # another's (a test's capture): as basicConfig, leave a configured root be
    # What the format does not show is not gathered for each line (the logging docs'
    # "Optimization"): the caller's frame, thread, process names.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = BatchedStderr()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    if level != "debug":
        # The migration tool's plugin set-up and dialect notes are not for a user's eyes.
        logging.getLogger("alembic").setLevel(logging.WARNING)
