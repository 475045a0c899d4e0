"""One access line and one set of HTTP metrics for every request, refused ones included.

`ObservedRequests` is the application's outermost layer: it names the request (the client's
X-Request-ID, or a new id, echoed on the answer and set in `REQUEST_ID` for every log line
written while serving it), opens its `Exchange` and, when the answer's last byte is sent,
writes what the exchange gathered: the access line (`relay.access`) and the HTTP metrics.
What the layers below know is noted on the exchange where they know it: the caller (the
authentication wrappers), the error code (the error envelope), the model, deployment, tokens,
cost and time to first token (the run, once its response is settled).

A response that outlives its request (a background run) or shares one (a WebSocket's turns)
writes a line of its own when it settles (relay.engine.run).
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.errors import StartupError
from relay.log_lines import REQUEST_ID, plain
from relay.observe import tracing
from relay.observe.metrics import Metrics
from relay.observe.tally import CounterTally, HistogramTally

log = logging.getLogger("relay")
access_log = logging.getLogger("relay.access")
response_log = logging.getLogger("relay.engine")
MAX_PATH = 200
# A request whose answer never started: the client left first (nginx's code for it).
CLIENT_CLOSED = 499
EVENT_STREAM = b"text/event-stream; charset=utf-8"  # relay.api.sse's content type
METHODS = frozenset(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"])


@dataclass(slots=True)
class Exchange:
    """What one request became, noted as it is served."""

    request_id: str
    method: str
    path: str
    started: float  # time.monotonic() at its arrival
    websocket: bool = False
    streaming: bool = False  # its answer is a stream of server-sent events
    status: int = 0
    error_code: str = ""
    project: str | None = None
    key_id: str | None = None
    # The response it was answered with, and what response_fields tells of it beside it:
    # made into fields only when its access line is written.
    answer: tuple[dict[str, Any], str | None, float | None, float | None, Any] | None = None
    ended: bool = False

    @property
    def awaits_response(self) -> bool:
        """Whether a response settling now is this request's own answer (not a background
        run that outlived it, nor one turn of a WebSocket's)."""
        return not self.ended and not self.websocket

    def settled(
        self,
        response: dict[str, Any],
        deployment: str | None,
        first_token_s: float | None,
        cost_usd: float | None,
        trace: dict[str, Any] | None,
    ) -> None:
        self.answer = (response, deployment, first_token_s, cost_usd, trace)
        error = response.get("error")
        if not self.error_code and error and error.get("code"):
            self.error_code = error["code"]  # a failure after the stream began

    def fields(self, latency_s: float) -> dict[str, Any]:
        """The access line's fields (None: not known, or not this request's business)."""
        fields = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path[:MAX_PATH],
            "status": self.status,
            "latency_ms": round(latency_s * 1000, 2),
            "error_code": self.error_code or None,
            "project": self.project,
            "key_id": self.key_id,
        }
        if self.answer is not None:
            fields.update(response_fields(*self.answer))
        return fields


def log_response(
    response: dict[str, Any],
    who: tuple[str, str | None],
    deployment: str | None = None,
    first_token_s: float | None = None,
    cost_usd: float | None = None,
    trace: dict[str, Any] | None = None,
) -> None:
    """The line of a response that is not its request's answer (a background run, a
    WebSocket turn): the access line's response fields, with its project and key (`who`)."""
    project, key_id = who
    fields = response_fields(response, deployment, first_token_s, cost_usd, trace)
    response_log.info(
        "response %s %s",
        response["id"],
        response["status"],
        extra={"fields": {"project": project, "key_id": key_id, **fields}},
    )


def response_fields(
    response: dict[str, Any],
    deployment: str | None,
    first_token_s: float | None,
    cost_usd: float | None,
    trace: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a log line tells of a settled response (`trace`: the request's, seed 000's)."""
    usage = response.get("usage") or {}
    error = response.get("error")
    fields = {
        "model": response["model"],
        "deployment": deployment,
        "response_id": response["id"],
        "response_status": response["status"],
        "error_code": (error.get("code") if error else None) or None,
        "ttft_ms": None if first_token_s is None else round(first_token_s * 1000, 2),
        "input_tokens": usage.get("input_tokens"),
        "output_tokens": usage.get("output_tokens"),
        "cached_tokens": (usage.get("input_tokens_details") or {}).get("cached_tokens"),
        "cost_usd": cost_usd,
        "session_id": response.get("session_id"),
        "trace_id": str(trace.get("trace_id"))[:64] if trace and trace.get("trace_id") else None,
    }
    calls = sum(1 for item in response["output"] if item["type"] in SERVER_CALLS)
    if calls:  # server-side tool calls Relay ran (relay.engine.tool_loop)
        fields["tool_calls"] = calls
    return fields


SERVER_CALLS = frozenset({"mcp_call", "web_search_call"})


CURRENT: ContextVar[Exchange | None] = ContextVar("exchange", default=None)


def note_error(code: str) -> None:
    """The error code of the answer being sent (relay.api.errors)."""
    exchange = CURRENT.get()
    if exchange is not None:
        exchange.error_code = code


def note_caller(project: str | None, key_id: str | None) -> None:
    """Who the request acts for, once authentication resolved it (relay.api.auth): on its
    access line and its span."""
    tracing.caller(project, key_id)
    exchange = CURRENT.get()
    if exchange is not None:
        exchange.project, exchange.key_id = project, key_id


class ObservedRequests:
    """The application's outermost layer (so that even the answer to an unhandled error
    carries the request id and leaves a line); also the lifespan's, see `_briefly`."""

    def __init__(self, app: ASGIApp, metrics: Metrics, *, log_access: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.log_access = log_access
        self._requests: dict[tuple[str, str, int, str], CounterTally] = {}
        self._durations: dict[str, HistogramTally] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, _briefly(send) if kind == "lifespan" else send)
            return
        request_id = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value[:128]
                break
        if not request_id:
            request_id = b"req_" + secrets.token_hex(16).encode()
        websocket = kind == "websocket"
        method = "GET" if websocket else scope["method"]
        if method not in METHODS:
            method = "other"  # a metric label: bounded
        named = request_id.decode("latin-1")
        exchange = Exchange(named, method, scope["path"], time.monotonic(), websocket)

        async def send_observed(message: Message) -> None:
            sent = message["type"]
            if sent == "http.response.start" or sent == "websocket.http.response.start":
                exchange.status = message["status"]
                headers = message.get("headers", [])
                if (b"content-type", EVENT_STREAM) in headers:
                    exchange.streaming = True
                    self.metrics.active_streams.inc()
                message["headers"] = [*headers, (b"x-request-id", request_id)]
            elif sent == "websocket.accept":
                exchange.status = 101
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
                self.metrics.active_websockets.inc()
            await send(message)

        # Every log line written for the request names it (relay.log_lines).
        naming = REQUEST_ID.set(named)
        current = CURRENT.set(exchange)
        try:
            await self.app(scope, receive, send_observed)
        finally:
            exchange.ended = True
            self._write(scope, exchange)
            CURRENT.reset(current)
            REQUEST_ID.reset(naming)

    def _write(self, scope: Scope, exchange: Exchange) -> None:
        latency_s = time.monotonic() - exchange.started
        if exchange.status == 0:
            exchange.status = CLIENT_CLOSED
        elif exchange.status == 101:
            self.metrics.active_websockets.dec()
        elif exchange.streaming:
            self.metrics.active_streams.dec()
        route = scope.get("route")
        endpoint = route.path if route is not None else "unmatched"
        metrics = self.metrics
        key = (exchange.method, endpoint, exchange.status, exchange.error_code)
        requests = self._requests.get(key)
        if requests is None:
            labelled = metrics.http_requests.labels(
                exchange.method, endpoint, str(exchange.status), exchange.error_code
            )
            requests = self._requests[key] = metrics.tallies.counter(labelled)
        requests.inc()
        duration = self._durations.get(endpoint)
        if duration is None:
            series = metrics.http_duration.labels(endpoint)
            duration = self._durations[endpoint] = metrics.tallies.histogram(series)
        duration.observe(latency_s)
        if self.log_access:
            fields = exchange.fields(latency_s)
            access_log.info(
                "%s %s %s", exchange.method, plain(fields["path"]), exchange.status,
                extra={"fields": fields},
            )  # fmt: skip


def _briefly(send: Send) -> Send:
    """`send` for the lifespan, telling a start-up failure the user can fix (StartupError) in
    one log line: Starlette hands uvicorn the traceback of whatever stopped the start-up, to
    print."""

    async def send_briefly(message: Message) -> None:
        # Starlette sends the failure from inside its `except` clause: the exception being
        # handled is the one that stopped the start-up.
        error = sys.exception()
        if message["type"] == "lifespan.startup.failed" and isinstance(error, StartupError):
            log.error("%s", error)
            message = {"type": "lifespan.startup.failed", "message": ""}
        await send(message)

    return send_briefly
