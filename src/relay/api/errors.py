"""The one table from errors to HTTP: every failure leaves as the OpenAI error envelope."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from relay.errors import ClientError, InvalidRequest, NotFound, RelayError, ServerError

log = logging.getLogger("relay.api")

_BY_STATUS: dict[int, type[RelayError]] = {400: InvalidRequest, 404: NotFound}


def error_response(error: RelayError) -> Response:
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


def install(app: FastAPI) -> None:
    @app.exception_handler(RelayError)
    async def relay_error(_: Request, error: RelayError) -> Response:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_query(_: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0]
        # Only query and path parameters get here (bodies are parsed by the routes): loc is
        # ("query", name).
        param = ".".join(str(step) for step in first["loc"][1:])
        return error_response(InvalidRequest(f"Invalid '{param}': {first['msg']}", param=param))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> Response:
        kind = _BY_STATUS.get(error.status_code)
        if kind is not None:
            return error_response(kind(str(error.detail)))
        relay_error = ClientError(str(error.detail))
        relay_error.status = error.status_code
        return error_response(relay_error)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(ServerError("The server had an error processing your request."))
