"""Server-sent events: the only module that knows the framing.

One event per write (`event: <type>` equal to the JSON `type`, one `data:` line, LF endings),
a comment line after `keepalive_s` of silence, `data: [DONE]` last. While streaming we listen
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
        events: AsyncIterator[dict[str, Any]],
        *,
        keepalive_s: float,
    ) -> None:
        self.events = events
        self.keepalive_s = keepalive_s
        self.background = None
        self.status_code = 200

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pump, watcher):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            # Finalises the run: after a disconnect it stores where the run stopped.
            await self.events.aclose()  # type: ignore[attr-defined]
        if pump.done() and not pump.cancelled() and pump.exception() is None:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _pump(self, send: Send) -> None:
        source = aiter(self.events)
        last_sequence = -1
        next_event: asyncio.Future[dict[str, Any]] | None = None
        try:
            while True:
                if next_event is None:
                    next_event = asyncio.ensure_future(anext(source))
                done, _ = await asyncio.wait({next_event}, timeout=self.keepalive_s)
                if not done:
                    await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
                    continue
                try:
                    event = next_event.result()
                except StopAsyncIteration:
                    break
                finally:
                    if next_event.done():
                        next_event = None
                last_sequence = event["sequence_number"]
                await send({"type": "http.response.body", "body": frame(event), "more_body": True})
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
        finally:
            if next_event is not None and not next_event.done():
                next_event.cancel()
                with contextlib.suppress(BaseException):
                    await next_event
        await send({"type": "http.response.body", "body": DONE, "more_body": True})


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
