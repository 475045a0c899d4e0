"""Background responses on the wire: create (JSON at once, or the stream, which the client
may leave and resume), resume with `GET /responses/{id}?stream=true&starting_after=N`, and
`POST /responses/{id}/cancel`. The runs themselves are relay.runs.runner's."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from relay.access.gate import Accounting, Principal
from relay.api.paging import int_or_none
from relay.api.sse import EventStreamResponse
from relay.errors import InvalidRequest
from relay.protocol import CreateResponse
from relay.runs.runner import Runner

_LIVE = ("queued", "in_progress")
# The media type of an Idempotency-Key record that stands for a background stream: its body
# is the response id, and a replay follows the run's event log.
BACKGROUND_STREAM = "application/x-relay-background-stream"
# After a cancel asked of another instance, how long to wait for it to take effect before
# answering with the response as it stands.
_CANCEL_WAIT_S = 10.0


def runner(request: Request) -> Runner:
    found: Runner = request.app.state.runner
    return found


async def submit(
    request: Request,
    principal: Principal,
    body: CreateResponse,
    session: str | None,
    accounting: Accounting,
    idempotency_key: str | None,
) -> Response:
    """Queue the response; answer it queued (JSON), or stream it as it runs."""
    gate = request.app.state.access
    response, here = await runner(request).submit(
        body,
        tenant=principal.project,
        session_id=session,
        key_id=principal.key_id,
        on_settled=accounting.settle,
    )
    if not here:
        accounting.abandon()  # the worker that runs it keeps its books
    data = orjson.dumps(response)
    if idempotency_key is not None:
        # Kept now: the run goes on whatever the client does, so a retry must find it (a
        # stream's retry follows its event log from the start).
        kept, media = (
            (response["id"].encode(), BACKGROUND_STREAM)
            if body.stream
            else (data, "application/json")
        )
        await gate.idempotency.complete(principal.project, idempotency_key, 200, media, kept)
    if body.stream:
        keepalive_s = request.app.state.settings.keepalive_s
        return EventStreamResponse(
            runner(request).follow(response["id"], -1),
            keepalive_s=keepalive_s,
            headers=accounting.headers,
        )
    return Response(data, media_type="application/json", headers=accounting.headers)


def _starting_after(request: Request) -> int:
    value = int_or_none(request.query_params.get("starting_after", "-1"))
    if value is None or not -1 <= value < 2**31:
        raise InvalidRequest(
            "Invalid 'starting_after': expected a sequence number (an integer >= -1).",
            param="starting_after",
        )
    return value


def resume(request: Request, stored: dict[str, Any]) -> Response:
    """GET /responses/{id}?stream=true: the events after `starting_after`, then the live
    ones until the response ends (background responses only: others keep no event log)."""
    if not stored.get("background"):
        raise InvalidRequest(
            "Only background responses can be streamed after their creation.",
            param="stream",
        )
    events = runner(request).follow(stored["id"], _starting_after(request))
    return EventStreamResponse(events, keepalive_s=request.app.state.settings.keepalive_s)


async def cancel(request: Request, project: str, stored: dict[str, Any]) -> Response:
    """POST /responses/{id}/cancel (and the admin API's, for `project`): a queued or running
    background response is cancelled (where it runs: here, or on the instance that holds
    it); a finished one is answered as it is, so a repeated cancel is harmless."""
    if not stored.get("background"):
        raise InvalidRequest("Only background responses can be cancelled.", param="response_id")
    store = request.app.state.store
    if stored["status"] in _LIVE:
        await runner(request).cancel(project, stored["id"])
        deadline = time.monotonic() + _CANCEL_WAIT_S
        while True:
            stored = await store.get_response(project, stored["id"]) or stored
            if stored["status"] not in _LIVE or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    return Response(orjson.dumps(stored), media_type="application/json")


def replay_stream(request: Request, response_id: str, headers: dict[str, str]) -> Response:
    """An Idempotency-Key replay of a background stream: its events, from the first."""
    events = runner(request).follow(response_id, -1)
    keepalive_s = request.app.state.settings.keepalive_s
    return EventStreamResponse(events, keepalive_s=keepalive_s, headers=headers)
