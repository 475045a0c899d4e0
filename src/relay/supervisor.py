"""The one owner of a process's background work: `relay serve` (each of its workers) and
`relay worker` start everything that outlives a request through a `Supervisor`, which names
their tasks and closes them in one defined order: the reverse of their start, so that what
was started last (and may use what came before it) stops first.

`process_id()` is this process's id, for what must be told apart across processes (rate
limit leases in a shared Redis). It is made on first use in each process, never at import:
workers forked from a parent that imported Relay would otherwise share it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("relay")
Close = Callable[[], Awaitable[None]]

_process_id: str | None = None


def process_id() -> str:
    global _process_id
    if _process_id is None:
        _process_id = secrets.token_hex(8)
    return _process_id


def _forget_process_id() -> None:
    global _process_id
    _process_id = None


# A forked child is another process: it makes its own id (a spawned one imports afresh).
os.register_at_fork(after_in_child=_forget_process_id)


class Supervisor:
    def __init__(self) -> None:
        self._closers: list[tuple[str, Close]] = []

    @property
    def names(self) -> list[str]:
        """What this supervisor closes, in the order it closes them."""
        return [name for name, _ in reversed(self._closers)]

    def closes(self, name: str, close: Close) -> None:
        """Close `name` with `close` when the process stops, before everything registered
        earlier."""
        self._closers.append((name, close))

    def start(self, name: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `work` as the task `relay:<name>` (named, for debuggers and task dumps),
        cancelled and awaited in its turn when the process stops."""
        task = asyncio.ensure_future(work)
        task.set_name(f"relay:{name}")

        async def cancel() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        self.closes(name, cancel)
        return task

    async def aclose(self) -> None:
        """Close everything, last started first. One that fails is logged and the others
        still close: a stuck listener must not leave the database's connections open."""
        while self._closers:
            name, close = self._closers.pop()
            log.debug("closing %s", name)
            try:
                await close()
            except Exception:
                log.exception("closing %s failed", name)
