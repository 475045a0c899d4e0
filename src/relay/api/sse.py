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
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay.api.disconnect import CancelOnDisconnect
from relay.engine.builder import TERMINAL, error_event

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
        self._keepalive: asyncio.Task[None] | None = None
        self._early: asyncio.Task[None] | None = None  # the start, written while waiting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
            *self.extra_headers,
        ]
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        loop = asyncio.get_running_loop()
        self._last_write = loop.time()
        # The keep-alive is a timer until a stream goes quiet for keepalive_s (most end
        # sooner): then a task of its own, which writes beside the pump.
        timer = loop.call_later(self.keepalive_s, self._start_keepalive, send)
        tail: bytes | None = None
        try:
            # The pump runs in this task; a client that leaves cancels it where it waits,
            # and the run records where it stopped.
            with CancelOnDisconnect(receive):
                tail = await self._pump(send)
        except ClientDisconnect:
            pass  # nobody to answer
        finally:
            timer.cancel()
            for writer in (self._keepalive, self._early):
                if writer is not None and not writer.done():
                    writer.cancel()
                    await _settle(writer)
            # Finalises the run: after a disconnect it stores where the run stopped.
            await self.events.aclose()  # type: ignore[attr-defined]
        if tail is not None:
            await send({"type": "http.response.body", "body": tail + DONE, "more_body": False})

    async def _pump(self, send: Send) -> bytes:
        """Stream the events; returns the last ones, unsent, for the closing write.

        Each batch (one step of the run: the start, an upstream delta, the end) is written as
        it comes, but for two: the start goes out with the first output when that is ready at
        once (one write, time to first token), and the batch that ends the run with `[DONE]`
        in the closing write. No write grows past FLUSH_BYTES."""
        pending: list[bytes] = []
        size = 0
        sequence = -1  # the last event framed
        events = aiter(self.events)
        try:
            batch = await anext(events, None)
            if batch is not None:
                sequence = batch[-1]["sequence_number"]
                pending = [frame(event) for event in batch]
                batch = await self._first_output(send, events, pending)
                if self._early is not None:
                    await self._early  # the start went out while the run waited
                    self._early = None  # done: not kept for as long as the stream is open
            while batch is not None:
                for event in batch:
                    data = frame(event)
                    pending.append(data)
                    size += len(data)
                    sequence = event["sequence_number"]
                if batch[-1]["type"] not in TERMINAL or size >= FLUSH_BYTES:
                    await self._write(send, pending)
                    pending, size = [], 0
                batch = await anext(events, None)
            return b"".join(pending)
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

    async def _first_output(
        self, send: Send, events: AsyncIterator[list[dict[str, Any]]], start: list[bytes]
    ) -> list[dict[str, Any]] | None:
        """The run's next batch. Should this task wait for it (the upstream's first token
        is not there yet), the event loop runs the callback scheduled here, which writes the
        start meanwhile, from a task that only writes: the run's own steps stay in this
        task, whose context and timeouts they were started with."""
        writing = asyncio.get_running_loop().call_soon(self._write_early, send, start)
        try:
            return await anext(events, None)
        finally:
            writing.cancel()

    def _write_early(self, send: Send, frames: list[bytes]) -> None:
        # The frames leave `frames`: whatever ends the stream next must not send them again.
        self._early = asyncio.ensure_future(self._write(send, frames[:]))
        frames.clear()

    def _start_keepalive(self, send: Send) -> None:
        self._keepalive = asyncio.ensure_future(self._keep_alive(send))

    async def _write(self, send: Send, frames: list[bytes]) -> None:
        await send({"type": "http.response.body", "body": b"".join(frames), "more_body": True})
        self._last_write = asyncio.get_running_loop().time()

    async def _keep_alive(self, send: Send) -> None:
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
