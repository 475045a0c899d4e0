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


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client disconnects. Only once the request body has been read: this
    consumes whatever `receive` gives."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class CancelOnDisconnect:
    """`async with CancelOnDisconnect(receive):` cancels the task that entered it when the
    client disconnects, and turns that cancel into `ClientDisconnect` on the way out; as
    `asyncio.timeout` does with a deadline. One watcher task, cancelled on exit.

    A cancel of the task from elsewhere (a server shutting down) stays a cancel."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._task: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._disconnected = False

    async def __aenter__(self) -> CancelOnDisconnect:
        self._task = asyncio.current_task()
        self._watcher = asyncio.ensure_future(self._watch())
        return self

    async def _watch(self) -> None:
        await wait_for_disconnect(self._receive)
        assert self._task is not None
        self._disconnected = True
        self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._task is not None and self._watcher is not None
        self._watcher.cancel()
        # The watcher runs only while this task waits inside the block, so its cancel always
        # lands in the block: the work saw it, and it is taken back here.
        taken_back = self._disconnected and self._task.uncancel() == 0
        if taken_back and exc_type is asyncio.CancelledError:
            raise ClientDisconnect from None
