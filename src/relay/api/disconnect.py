"""Clients that leave: noticed while their request is worked on, and never an error.

A client that goes away stops the work done for it (an upstream request, a local generation),
streaming or not; the run records where it stopped (`Run.events`). The request then ends with
`ClientDisconnect`, which `api/errors.py` answers quietly: there is nobody to answer.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from starlette.requests import ClientDisconnect
from starlette.types import Receive

# How long a request runs before its client's departure is watched for (see CancelOnDisconnect).
WATCH_AFTER_S = 0.1


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects. Only once the request body has been read: this
    consumes whatever `receive` gives."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class CancelOnDisconnect:
    """`with CancelOnDisconnect(receive):` (inside a coroutine) cancels the task that entered
    it when the client disconnects, and turns that cancel into `ClientDisconnect` on the way
    out; as `asyncio.timeout` does with a deadline (entering and leaving need no await, so it
    is a plain context manager). A cancel of the task from elsewhere (a server
    shutting down) stays a cancel.

    The watching begins WATCH_AFTER_S after entry, with one task: most answers are ready
    sooner, and then cost a timer, not a task (the gateway benchmark saw the task per request
    at high concurrency). A client that leaves earlier is noticed at WATCH_AFTER_S."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._disconnected = False

    def __enter__(self) -> CancelOnDisconnect:
        self._task = asyncio.current_task()
        self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._start_watching)
        return self

    def _start_watching(self) -> None:
        self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        await wait_for_disconnect(self._receive)
        assert self._task is not None
        self._disconnected = True
        self._task.cancel()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._task is not None and self._timer is not None
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        # The watcher runs only while this task waits inside the block, so its cancel always
        # lands in the block: the work saw it, and it is taken back here.
        taken_back = self._disconnected and self._task.uncancel() == 0
        if taken_back and exc_type is asyncio.CancelledError:
            raise ClientDisconnect from None
