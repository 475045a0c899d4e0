"""The one table from errors to HTTP: every failure leaves as the OpenAI error envelope, but
for a body that fails validation on a server set to answer as FastAPI does (a 422 listing each
failure: `error_format = "fastapi"`)."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ExceptionHandler

from relay.errors import (
    ClientError,
    InvalidFields,
    InvalidRequest,
    NotFound,
    RelayError,
    ServerError,
    UpstreamRejected,
)
from relay.observe.access import note_error
from relay.protocol import body_location

log = logging.getLogger("relay.api")

_BY_STATUS: dict[int, type[RelayError]] = {400: InvalidRequest, 404: NotFound}


def error_response(error: RelayError) -> Response:
    note_error(error.code or error.type)
    headers = dict(error.headers)
    if error.status >= 500:
        # Deterministic server faults should not be hammered by SDK retries.
        headers.setdefault("x-should-retry", "false" if error.status == 500 else "true")
    return Response(
        orjson.dumps(error.envelope()),
        status_code=error.status,
        media_type="application/json",
        headers=headers,
    )


async def _relay_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RelayError)
    if (
        isinstance(error, InvalidRequest)
        and not isinstance(error, UpstreamRejected)  # the upstream's word: the envelope
        and request.app.state.settings.error_format == "fastapi"
    ):
        note_error(error.code or error.type)
        return Response(
            orjson.dumps({"detail": fastapi_detail(error)}, default=str),
            status_code=422,
            media_type="application/json",
        )
    return error_response(error)


def fastapi_detail(error: InvalidRequest) -> list[dict[str, Any]]:
    """A request's fault as FastAPI lists it: a schema's failures as pydantic gave them;
    another (a body that is not JSON, a missing model, a rule across fields) as one failure
    located at the field it names, else at the body."""
    if isinstance(error, InvalidFields):
        return error.details
    return [
        {
            "type": "json_invalid" if error.code == "invalid_json" else error.code or "value_error",
            "loc": body_location(error.param or ""),
            "msg": error.message,
            "input": None,
        }
    ]


async def _http_error(_: Request, error: Exception) -> Response:
    """Starlette's own answers (unknown path: 404, wrong method: 405) in the envelope."""
    assert isinstance(error, HTTPException)
    kind = _BY_STATUS.get(error.status_code)
    if kind is not None:
        return error_response(kind(str(error.detail)))
    relay_error = ClientError(str(error.detail))
    relay_error.status = error.status_code
    return error_response(relay_error)


async def _client_gone(_: Request, error: Exception) -> Response:
    """The client disconnected (mid-upload, or before its answer was ready): whatever it had
    asked for was stopped; the answer goes nowhere, and is no error of the server's."""
    log.debug("client disconnected before its answer was sent")
    gone = ClientError("The client closed the connection before the answer was sent.")
    gone.status = 499  # nginx's "client closed request": seen by no one but access logs
    return error_response(gone)


async def _unexpected(_: Request, error: Exception) -> Response:
    log.exception("unhandled error", exc_info=error)
    return error_response(ServerError("The server had an error processing your request."))


# For Starlette(exception_handlers=...): the Exception entry is the last resort, served by
# Starlette's ServerErrorMiddleware, so even a bug answers with the envelope.
HANDLERS: dict[type[Exception], ExceptionHandler] = {
    RelayError: _relay_error,
    ClientDisconnect: _client_gone,
    HTTPException: _http_error,
    Exception: _unexpected,
}
