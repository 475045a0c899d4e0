"""Background runs handed out between instances through procrastinate, a job queue on
PostgreSQL (docs/design.md says why this one): the instance that receives a background
response stores its run record and defers a job naming it; whichever instance's worker is free
takes the job and runs it (`Runner.run_queued`). procrastinate keeps its own tables in the
same database; they are created at start-up, once, under an advisory lock.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import procrastinate
import psycopg
from procrastinate.schema import SchemaManager
from sqlalchemy.engine import make_url

from relay.storage.outage import reachable

log = logging.getLogger("relay.queue")
QUEUE = "relay-background"
_SCHEMA_LOCK = 7_366_100_261_625_119_077
# How long a statement of the queue's waits for a connection (psycopg_pool's default: 30 s).
# The worker records how each job ended before it stops: during an outage, a shutdown would
# wait that long for it.
_POOL_WAIT_S = 5.0


def conninfo(database_url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as libpq connection info."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class JobQueue:
    def __init__(
        self,
        database_url: str,
        run: Callable[[str, dict[str, str] | None], Awaitable[None]],
        *,
        concurrency: int,
    ) -> None:
        self._conninfo = conninfo(database_url)
        self.app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(conninfo=self._conninfo, timeout=_POOL_WAIT_S)
        )
        self._concurrency = concurrency

        # No retries: a run that started is never run twice (its client may have seen its
        # first events); one whose worker died is ended by the run sweep instead.
        @self.app.task(name="relay.background_run", queue=QUEUE, retry=False)
        async def background_run(response_id: str, trace: dict[str, str] | None = None) -> None:
            await run(response_id, trace)

        self._task: Any = background_run

    async def open(self) -> None:
        await self._ensure_schema()
        await self.app.open_async()

    async def work(self) -> None:
        """Run jobs until cancelled (a task of the process's supervisor, cancelled before
        `close`)."""
        await self.app.run_worker_async(
            queues=[QUEUE],
            concurrency=self._concurrency,
            wait=True,
            install_signal_handlers=False,
            listen_notify=True,
        )

    async def defer(self, response_id: str, trace: dict[str, str] | None = None) -> None:
        """`trace`: the trace context of the request that queued it (relay.observe.tracing),
        for the worker's spans; a job's argument only when there is one (tracing on)."""
        arguments: dict[str, Any] = {"response_id": response_id}
        if trace is not None:
            arguments["trace"] = trace
        with reachable():  # its database is Relay's: the same outage, the same 503
            await self._task.defer_async(**arguments)

    async def close(self) -> None:
        await self.app.close_async()

    async def _ensure_schema(self) -> None:
        """procrastinate's tables, created by the first instance to start."""
        async with await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True) as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
            try:
                found = await (
                    await conn.execute("SELECT to_regclass('procrastinate_jobs')")
                ).fetchone()
                if found is None or found[0] is None:
                    schema = SchemaManager.get_schema()
                    await conn.execute(schema)
                    log.info("created the job queue's tables")
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))
