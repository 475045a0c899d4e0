"""A background response's events in this process, for the streams that follow it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

Event = dict[str, Any]


class Feed:
    """Every event of one run, in order (sequence number = index), and a wake-up for
    followers. Followers read from any point: the run never waits for them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = False
        self._changed = asyncio.Event()

    def publish(self, batch: list[Event]) -> None:
        self.events.extend(batch)
        self._wake()

    def close(self) -> None:
        self.done = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int) -> AsyncIterator[list[Event]]:
        """The events after sequence number `after`, then the live ones until the run ends."""
        position = after + 1
        while True:
            if position < len(self.events):
                batch = self.events[position:]
                position += len(batch)
                yield batch
            elif self.done:
                return
            else:
                await self._changed.wait()
