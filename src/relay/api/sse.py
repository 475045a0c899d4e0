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
from collections.abc import AsyncIterator, Coroutine, Generator
from typing import Any, Generic, TypeVar, cast

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay.engine.builder import error_event

log = logging.getLogger("relay.sse")

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
FLUSH_BYTES = 64 * 1024
T = TypeVar("T")


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
            body = pump.result() + DONE
            await send({"type": "http.response.body", "body": body, "more_body": False})

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
                            await self._write(send, pending)
                            pending, size = [], 0
                        batch = await batch
                except StopAsyncIteration:
                    return b"".join(pending)
                batches += 1
                for event in batch:
                    data = frame(event)
                    pending.append(data)
                    size += len(data)
                sequence = batch[-1]["sequence_number"]
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


class Suspended(Generic[T]):
    """The rest of a coroutine that suspended in its first step: awaiting this resumes it
    where it stopped, passing the event loop's wake-ups and cancellation through, as `await`
    on the coroutine itself would have."""

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


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
