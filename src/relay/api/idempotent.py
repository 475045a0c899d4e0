"""Idempotency-Key answers on the wire: a stream recorded as it goes out, and a replay."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator

from starlette.responses import Response

from relay.access.gate import Access
from relay.access.idempotency import Replay
from relay.api.sse import DONE, frame
from relay.engine.builder import TERMINAL, Event
from relay.errors import DatabaseUnavailable

log = logging.getLogger("relay.api")

REPLAYED = "idempotent-replayed"


def replayed(replay: Replay) -> Response:
    return Response(
        replay.body,
        status_code=replay.status_code,
        media_type=replay.media_type,
        headers={REPLAYED: "true"},
    )


async def recorded(
    events: AsyncIterator[list[Event]], gate: Access, project: str, key: str
) -> AsyncGenerator[list[Event], None]:
    """`events`, passed on, and kept as SSE for replays once the response has ended. A
    stream cut short (the client left: the response was cancelled) releases the key."""
    frames: list[bytes] = []
    kept = False
    try:
        async for batch in events:
            frames.extend(frame(event) for event in batch)
            if batch and batch[-1]["type"] in TERMINAL:
                body = b"".join(frames) + DONE
                try:
                    await gate.idempotency.complete(
                        project, key, 200, "text/event-stream; charset=utf-8", body
                    )
                except DatabaseUnavailable as error:
                    # The stream still ends on its terminal event; the claim, no longer
                    # renewed, lapses, and a retry runs again.
                    log.warning("could not keep the answer of an Idempotency-Key: %s", error.reason)
                kept = True
            yield batch
    finally:
        await events.aclose()  # type: ignore[attr-defined]
        if not kept:
            gate.track(gate.idempotency.release(project, key))
