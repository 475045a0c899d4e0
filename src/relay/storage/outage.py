"""A database that cannot be reached (stopped, restarting, failing over, a SQLite lock held past
its timeout): its errors told apart from the others, raised as `DatabaseUnavailable` (a 503
with retry-after for clients), and retried by the work that must not be lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy.exc import DBAPIError

from relay.errors import DatabaseUnavailable

T = TypeVar("T")
log = logging.getLogger("relay.storage")

# SQLSTATE classes of a server that cannot serve: connection exceptions (08), operator
# intervention (57P: shutting down, starting up), too many connections.
_SQLSTATES = ("08", "57P", "53300")
_SQLITE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_IOERR", "SQLITE_FULL")
FIRST_RETRY_S = 0.1
LAST_RETRY_S = 2.0


def unavailable(error: BaseException) -> bool:
    """Whether `error` says the database could not be reached or lost the connection (a later
    try may succeed), rather than that the statement was wrong. Looks through the driver's
    exception and what caused it (SQLAlchemy and procrastinate wrap them)."""
    seen: BaseException | None = error
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, OSError):  # refused, reset, timed out (TimeoutError included)
            return True
        if isinstance(seen, DBAPIError):
            if seen.connection_invalidated:
                return True
            seen = seen.orig
            continue
        sqlstate = getattr(seen, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_SQLSTATES):
            return True
        if str(getattr(seen, "sqlite_errorname", "")).startswith(_SQLITE):
            return True
        # psycopg (the job queue, the run signals) is only loaded with PostgreSQL: an error of
        # its own cannot exist before it is.
        psycopg = sys.modules.get("psycopg")
        if psycopg is not None and isinstance(seen, psycopg.OperationalError):
            return True
        seen = seen.__cause__
    return False


@contextmanager
def reachable() -> Iterator[None]:
    """Around database work: an error that says the database is unavailable leaves as
    `DatabaseUnavailable`, the one kind callers handle."""
    try:
        yield
    except DatabaseUnavailable:
        raise
    except Exception as error:
        if unavailable(error):
            cause = error.orig if isinstance(error, DBAPIError) else error
            raise DatabaseUnavailable(f"{type(cause).__name__}: {cause}") from error
        raise


async def retried(work: Callable[[], Awaitable[T]], *, what: str, until: asyncio.Event) -> T:
    """`work`, tried again while the database is unavailable (backing off from FIRST_RETRY_S
    to LAST_RETRY_S) for as long as that lasts, unless `until` is set (the process is
    stopping): then the last DatabaseUnavailable is raised. Other errors are raised at once."""
    delay = FIRST_RETRY_S
    waited = 0.0
    while True:
        try:
            done = await work()
        except DatabaseUnavailable as error:
            if until.is_set():
                raise
            if not waited:
                log.warning("database unavailable (%s); retrying %s", error.reason, what)
        else:
            if waited:
                log.info("%s done after the database was back (%.1f s)", what, waited)
            return done
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), delay)  # set: one more try, then give up
        waited += delay
        delay = min(delay * 2, LAST_RETRY_S)
