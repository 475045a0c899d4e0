"""Run signals between instances on PostgreSQL, by LISTEN/NOTIFY on one channel: "a run's
log grew" (its followers elsewhere read it now, not at their next poll) and "cancel this run"
(its instance stops it now, not at its next lease renewal). Sent inside the transaction that
makes them true, so a listener never reads too early. The polls stay as the fallback: a
signal lost while a listener reconnects costs at most one poll interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger("relay.runs")
CHANNEL = "relay_runs"
EVENT = "event"
CANCEL = "cancel"


class Listener:
    """One connection per process, listening; `on_signal(kind, response_id)` per signal."""

    def __init__(self, conninfo: str, on_signal: Callable[[str, str], None]) -> None:
        self._conninfo = conninfo
        self._on_signal = on_signal
        self.ready = asyncio.Event()

    async def listen(self) -> None:
        """Until cancelled (a task of the process's supervisor), reconnecting as needed."""
        import psycopg  # only with PostgreSQL: SQLite processes do without it

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.ready.set()
                    async for note in conn.notifies():
                        kind, _, response_id = note.payload.partition(":")
                        self._on_signal(kind, response_id)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self.ready.clear()
                log.warning("run signals lost their connection (%s); reconnecting", error)
                await asyncio.sleep(1)
