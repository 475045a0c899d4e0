"""Server-sent events: the only module that knows the framing.

Each event is `event: <type>` (equal to the JSON `type`), one `data:` line, LF endings; the
events of one batch (see Run.events) go out in one write. A comment line after `keepalive_s` of
silence, `data: [DONE]` last. While streaming we listen
for the client's disconnect and, when it comes, close the event source so that the run records
where it stopped instead of staying in_progress.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any, cast

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay.api.disconnect import wait_for_disconnect
from relay.eager import Suspended, until_suspended
from relay.engine.builder import error_event

log = logging.getLogger("relay.sse")

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
FLUSH_BYTES = 64 * 1024


def frame(event: dict[str, Any]) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


class EventStreamResponse(Response):
    """An ASGI response streaming `events` as SSE (a Response so that routes can return it)."""

    def __init__(
        self,
        events: AsyncIterator[list[dict[str, Any]]],
        *,
        keepalive_s: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.events = events
        self.extra_headers = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        self.keepalive_s = keepalive_s
        self.background = None
        self.status_code = 200
        self._last_write = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *self.extra_headers,
        ]
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        self._last_write = asyncio.get_running_loop().time()
        try:
            # The pump runs in this task until it first has to wait: an answer that is all
            # there already (a fast upstream) goes out without starting a task.
            started = until_suspended(self._pump(send))
            tail = (
                await self._watched(started, receive, send)
                if isinstance(started, Suspended)
                else started
            )
        finally:
            # Finalises the run: after a disconnect it stores where the run stopped.
            await self.events.aclose()  # type: ignore[attr-defined]
        if tail is not None:
            await send({"type": "http.response.body", "body": tail + DONE, "more_body": False})

    async def _watched(
        self, pump_rest: Suspended[bytes], receive: Receive, send: Send
    ) -> bytes | None:
        """The rest of the pump, beside a keep-alive timer and a listener for the client's
        disconnect: three tasks, however long the stream. None when the client left."""
        pump = asyncio.ensure_future(pump_rest)
        keepalive = asyncio.ensure_future(self._keepalive(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, keepalive, watcher):
                task.cancel()
            await _settle(pump, keepalive, watcher)
        if pump.cancelled() or pump.exception() is not None:
            return None
        return pump.result()

    async def _pump(self, send: Send) -> bytes:
        """Stream the events; returns the last ones, unsent, for the closing write.

        Batches that are ready at once (an upstream's deltas that came in one read) share a
        write: fewer writes, and fewer wake-ups of the client. Whatever is ready goes out before
        the pump waits for more, so a slow upstream never holds an event back; the start and the
        first output go out as soon as both are ready (time to first token); no write grows
        past FLUSH_BYTES."""
        pending: list[bytes] = []
        size = 0
        sequence = -1  # the last event framed
        batches = 0
        try:
            while True:
                step = cast(Coroutine[Any, Any, list[dict[str, Any]]], self.events.__anext__())
                try:
                    batch = until_suspended(step)
                    if isinstance(batch, Suspended):
                        if pending:
                            try:
                                await self._write(send, pending)
                            except BaseException:
                                # The step has begun: end it, or the events cannot close.
                                await batch.cancel()
                                raise
                            pending, size = [], 0
                        batch = await batch
                except StopAsyncIteration:
                    return b"".join(pending)
                batches += 1
                for event in batch:
                    data = frame(event)
                    pending.append(data)
                    size += len(data)
                    sequence = event["sequence_number"]
                if batches == 2 or size >= FLUSH_BYTES:
                    await self._write(send, pending)
                    pending, size = [], 0
        except Exception:
            # Run.events ends every run with a terminal event; this is the last resort for a
            # bug below it, so that the client at least learns the stream broke.
            log.exception("stream failed")
            event = error_event(
                sequence + 1,
                "server_error",
                "server_error",
                "The server had an error while streaming the response.",
            )
            return b"".join(pending) + frame(event)

    async def _write(self, send: Send, frames: list[bytes]) -> None:
        await send({"type": "http.response.body", "body": b"".join(frames), "more_body": True})
        self._last_write = asyncio.get_running_loop().time()

    async def _keepalive(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            idle = loop.time() - self._last_write
            if idle < self.keepalive_s:
                await asyncio.sleep(self.keepalive_s - idle)
                continue
            await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
            self._last_write = loop.time()


async def _settle(*tasks: asyncio.Task[Any]) -> None:
    """Wait until cancelled tasks have ended, cleanup included. Awaiting a task passes a
    cancel of the awaiter on to it, which would cut the run's cleanup short (a server
    shutting down as the client leaves): a cancel that comes meanwhile is raised after."""
    cancelled = False
    pending = set(tasks)
    while pending:
        try:
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError:
            cancelled = True
    for task in tasks:
        if not task.cancelled():
            # Read, so that asyncio does not log it: the keep-alive's failed write means the
            # client is gone, which the watcher has said already.
            task.exception()
    if cancelled:
        raise asyncio.CancelledError
