"""WebSocket mode: `GET /v1/responses` upgraded; each `response.create` message is a turn.

The events of a turn are those of the SSE stream, from the same producer (`Run.events`), one
JSON object per text message. Turns run one at a time, in the order they were sent; up to
`websocket_max_queued_turns` messages that arrive meanwhile wait, and more are refused at once
with an error event (they are not kept: the memory a socket holds is bounded by that, by the
few messages the protocol library buffers (relay.launch.WS_MAX_QUEUE) and by uvicorn's
`ws_max_size`, `max_body_bytes` a message, over which the socket is closed with 1009
"message too big"). Each socket keeps the latest response it produced, so a
`store: false` chain can continue on the same socket; a continuation that fails evicts the
response it named. Errors that end a turn before it streams are sent as
`{"type": "error", "status", "error": {...}}` and the socket stays open. A socket serves new
turns for `websocket_max_age_s` (60 minutes by default), then says so and closes.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from relay.access.gate import Access, Principal
from relay.api.auth import access
from relay.api.errors import error_response
from relay.engine.run import Run
from relay.errors import InvalidRequest, PermissionDenied, RateLimited, RelayError
from relay.observe import tracing
from relay.protocol import CreateResponse, create_request, json_object
from relay.providers.base import History
from relay.runs.runner import Runner

CLOSE_NORMAL = 1000  # RFC 6455


async def responses_socket(websocket: WebSocket, principal: Principal) -> None:
    try:
        _check_origin(websocket)
    except RelayError as error:
        # Refused before the upgrade, with the status and envelope an HTTP request would get.
        await websocket.send_denial_response(error_response(error))
        return
    await websocket.accept()
    settings = websocket.app.state.settings
    await _Socket(
        websocket,
        websocket.app.state.runner,
        access(websocket),
        principal,
        settings.websocket_max_age_s,
        settings.websocket_max_queued_turns,
    ).serve()


def _check_origin(websocket: WebSocket) -> None:
    """Browsers send Origin; other clients do not. A browser's origin must be one the CORS
    settings allow, as for HTTP."""
    origin = websocket.headers.get("origin")
    allowed: list[str] = websocket.app.state.settings.cors_origins
    if origin is not None and "*" not in allowed and origin not in allowed:
        raise PermissionDenied(
            f"Origin '{origin[:200]}' is not allowed.", code="origin_not_allowed"
        )


class _Socket:
    def __init__(
        self,
        websocket: WebSocket,
        runner: Runner,
        gate: Access,
        principal: Principal,
        max_age_s: float,
        max_queued: int,
    ) -> None:
        self.websocket = websocket
        self.runner = runner
        self.engine = runner.engine
        self.gate = gate
        self.principal = principal
        self.deadline = time.monotonic() + max_age_s
        self.max_queued = max_queued
        # The latest response of this socket: its id, the chain it ends, whether it is stored.
        self.latest: tuple[str, History, bool] | None = None
        self.gone = False
        self.turn: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        inbox: asyncio.Queue[str | None] = asyncio.Queue()
        reader = asyncio.ensure_future(self._read(inbox))
        try:
            while (text := await inbox.get()) is not None:
                if time.monotonic() > self.deadline:
                    await self._error(
                        InvalidRequest(
                            "This WebSocket has reached its connection time limit; "
                            "open a new one to continue.",
                            code="websocket_connection_limit_reached",
                        )
                    )
                    await self.websocket.close(CLOSE_NORMAL)
                    return
                self.turn = asyncio.ensure_future(self._turn(text))
                try:
                    await self.turn
                except asyncio.CancelledError:
                    if not self.gone or _cancelling():
                        raise
                    return  # the client left mid-turn: the run recorded where it stopped
        except (WebSocketDisconnect, OSError):
            return  # a send to a client that has gone
        finally:
            reader.cancel()

    async def _read(self, inbox: asyncio.Queue[str | None]) -> None:
        """Every message, in order, to `inbox`, or refused when `max_queued` already wait
        there; at the client's departure, None, and the turn in flight is cancelled."""
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if inbox.qsize() >= self.max_queued:
                    await self._error(
                        RateLimited(
                            f"This WebSocket already has {self.max_queued} turns waiting; this "
                            "one was not queued. Send it again when a turn has finished.",
                            code="websocket_queue_full",
                        )
                    )
                    continue
                text = message.get("text")
                if text is None:  # a binary frame: taken as UTF-8 JSON all the same
                    text = (message.get("bytes") or b"").decode("utf-8", "replace")
                inbox.put_nowait(text)
        finally:
            self.gone = True
            inbox.put_nowait(None)
            if self.turn is not None and not self.turn.done():
                self.turn.cancel()

    async def _turn(self, text: str) -> None:
        # Each turn is traced as a request would be (a task of its own: its span is its own).
        with tracing.turn(self.websocket.scope):
            await self._traced_turn(text)

    async def _traced_turn(self, text: str) -> None:
        previous: str | None = None
        accounting = None
        try:
            body, generate = _parse_create(text)
            previous = body.previous_response_id
            continuing, stored = None, True
            if self.latest is not None and previous == self.latest[0]:
                _, continuing, stored = self.latest
            # Each turn is a request as far as keys, limits and budgets go: a key revoked or
            # expired meanwhile (or its project archived) ends there.
            self.principal = await self.gate.principal(self.websocket)
            tracing.caller(self.principal.project, self.principal.key_id)
            accounting = await self.gate.admit(self.principal, body, len(text))
            run = await self.engine.start(
                body,
                tenant=self.principal.project,
                continuing=continuing,
                continuing_is_stored=stored,
                generate=generate,
                on_settled=accounting.settle,
                key_id=self.principal.key_id,
                # Its id is in response.created: recorded first, as a stored SSE stream is.
                record=self.runner.start_record(self.principal.project),
            )
            if run.response["store"]:
                self.runner.follow_stream(run)
        except RelayError as error:
            if accounting is not None:
                accounting.abandon()
            self._evict(previous)
            await self._error(error)
            return
        except BaseException:
            if accounting is not None:
                accounting.abandon()
            raise
        await self._stream(run, previous)

    async def _stream(self, run: Run, previous: str | None) -> None:
        # Closed however the loop ends: a send that fails (the client gone) must still let
        # the run record where it stopped, as SSE does.
        async with aclosing(run.events()) as events:
            async for batch in events:
                for event in batch:
                    await self.websocket.send_text(orjson.dumps(event).decode())
        response = run.response
        if response["status"] in ("completed", "incomplete"):
            self.latest = (response["id"], run.resulting_history(), response["store"])
        else:
            self._evict(previous)

    def _evict(self, response_id: str | None) -> None:
        if self.latest is not None and self.latest[0] == response_id:
            self.latest = None

    async def _error(self, error: RelayError) -> None:
        event = {"type": "error", "status": error.status, "error": error.envelope()["error"]}
        await self.websocket.send_text(orjson.dumps(event).decode())


def _parse_create(text: str) -> tuple[CreateResponse, bool]:
    """A `response.create` message as a create request, and whether to generate."""
    data = json_object(text, "A message")
    kind = data.pop("type", None)
    if kind != "response.create":
        raise InvalidRequest(
            f"Unknown message type {str(kind)[:60]!r}; send 'response.create'.",
            param="type",
            code="unknown_event_type",
        )
    generate = data.pop("generate", True)
    if not isinstance(generate, bool):
        raise InvalidRequest("'generate' must be a boolean.", param="generate")
    if data.get("stream") is False:
        raise InvalidRequest("A WebSocket turn always streams.", param="stream")
    if data.get("background"):
        raise InvalidRequest(
            "Background mode is not available over a WebSocket.", param="background"
        )
    data.pop("stream", None)
    return create_request(data), generate


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
