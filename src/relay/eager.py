"""Running a coroutine eagerly: in the calling task, until it first has to wait.

Python 3.12 has eager tasks for this; on 3.11 a task always waits a turn of the event loop
before its first step. Relay uses it where the common case never waits (an upstream answer
that is already read): no task, no loop turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Suspended(Generic[T]):
    """The rest of a coroutine that suspended in its first step: awaiting this resumes it
    where it stopped, passing the event loop's wake-ups and cancellation through, as `await`
    on the coroutine itself would have. Await it once, or cancel it: a coroutine left
    half-run never finishes its cleanup (and an async generator whose step it is stays
    "already running", so that it cannot be closed)."""

    __slots__ = ("_coroutine", "_yielded")

    def __init__(self, coroutine: Coroutine[Any, Any, T], yielded: Any) -> None:
        self._coroutine = coroutine
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, T]:
        coroutine, yielded = self._coroutine, self._yielded
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coroutine.close()
                raise
            except BaseException as error:
                try:
                    yielded = coroutine.throw(error)
                except StopIteration as stop:
                    result: T = stop.value
                    return result
            else:
                try:
                    yielded = coroutine.send(sent)
                except StopIteration as stop:
                    result = stop.value
                    return result

    async def cancel(self) -> None:
        """Instead of awaiting the rest: cancel it where it waits, as cancelling a task would,
        and let its cleanup run to the end."""
        if isinstance(self._yielded, asyncio.Future):
            self._yielded.cancel()
        try:
            self._yielded = self._coroutine.throw(asyncio.CancelledError())
        except (StopIteration, asyncio.CancelledError):
            return
        with contextlib.suppress(asyncio.CancelledError):
            await self


def until_suspended(coroutine: Coroutine[Any, Any, T]) -> T | Suspended[T]:
    """Run `coroutine` in the current task until it first has to wait: its result if it
    never had to, else the Suspended rest of it. What an eager task does (Python 3.12's
    eager_start), without a task or a turn of the event loop."""
    try:
        yielded = coroutine.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    return Suspended(coroutine, yielded)
