"""Server-sent events: the only module that knows the framing.

Each event is `event: <type>` (equal to the JSON `type`), one `data:` line, LF endings; the
events of one batch (see Run.events) go out in one write. A comment line after `keepalive_s` of
silence, `data: [DONE]` last. While streaming we listen
for the client's disconnect and, when it comes, close the event source so that the run records
where it stopped instead of staying in_progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay.engine.builder import error_event

log = logging.getLogger("relay.sse")

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


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
    ) -> None:
        self.events = events
        self.keepalive_s = keepalive_s
        self.background = None
        self.status_code = 200
        self._last_write = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        loop = asyncio.get_running_loop()
        self._last_write = loop.time()
        # Three tasks a stream, whatever its length: the events, the keep-alive timer, and a
        # listener for the client's disconnect.
        pump = asyncio.ensure_future(self._pump(send))
        keepalive = asyncio.ensure_future(self._keepalive(send))
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, keepalive, watcher):
                task.cancel()
            for task in (pump, keepalive, watcher):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # Finalises the run: after a disconnect it stores where the run stopped.
            await self.events.aclose()  # type: ignore[attr-defined]
        if not pump.cancelled() and pump.exception() is None:
            await send({"type": "http.response.body", "body": DONE, "more_body": False})

    async def _pump(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        last_sequence = -1
        try:
            async for batch in self.events:
                last_sequence = batch[-1]["sequence_number"]
                body = b"".join(frame(event) for event in batch)
                await send({"type": "http.response.body", "body": body, "more_body": True})
                self._last_write = loop.time()
        except Exception:
            # Run.events ends every run with a terminal event; this is the last resort for a
            # bug below it, so that the client at least learns the stream broke.
            log.exception("stream failed")
            event = error_event(
                last_sequence + 1,
                "server_error",
                "server_error",
                "The server had an error while streaming the response.",
            )
            await send({"type": "http.response.body", "body": frame(event), "more_body": True})

    async def _keepalive(self, send: Send) -> None:
        loop = asyncio.get_running_loop()
        while True:
            idle = loop.time() - self._last_write
            if idle < self.keepalive_s:
                await asyncio.sleep(self.keepalive_s - idle)
                continue
            await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
            self._last_write = loop.time()


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
