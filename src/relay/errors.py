"""Errors raised anywhere in Relay; `api/errors.py` maps them to HTTP once.

Each error carries the OpenAI envelope fields (type, code, param) and its HTTP status, so the
layer that detects a problem says what it is and the API layer only frames it.
"""

from __future__ import annotations

from typing import Any


class RelayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def envelope(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class ClientError(RelayError):
    """Another 4xx of the HTTP layer (405 and the like): no code of ours to name."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None


class InvalidRequest(RelayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class UpstreamRejected(InvalidRequest):
    """A 400 that is the upstream's refusal of the request (a parameter it does not take, a
    context over its window), not a fault the request's own fields show."""


class InvalidFields(InvalidRequest):
    """A body that fails its schema: a 400 like any InvalidRequest, which also carries every
    failure as FastAPI lists them (`details`: loc, msg, type, input, ctx), for servers set to
    answer in that shape (`error_format = "fastapi"`)."""

    def __init__(
        self, message: str, *, param: str, code: str, details: list[dict[str, Any]]
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.details = details


class AuthenticationError(RelayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PayloadTooLarge(RelayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"

    def __init__(self, limit: int, *, decompressed: bool = False) -> None:
        once = " once decompressed" if decompressed else ""
        super().__init__(f"The request body is larger than {limit} bytes{once}.")


class UnsupportedMediaType(RelayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class PermissionDenied(RelayError):
    status = 403
    type = "permission_denied_error"
    code = "permission_denied"


class NotFound(RelayError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class RequestTimeout(RelayError):
    """The upstream did not answer in time (408, as the documents Relay implements list it;
    clients retry it)."""

    status = 408
    type = "server_error"
    code = "request_timeout"


class QuotaExceeded(RelayError):
    """A budget or credit is used up (402, as the documents Relay implements list it)."""

    status = 402
    type = "insufficient_quota"
    code = "insufficient_quota"


class Conflict(RelayError):
    """An Idempotency-Key used with another body, or whose first request still runs."""

    status = 409
    type = "invalid_request_error"
    code = "idempotency_key_reused"


class RateLimited(RelayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(RelayError):
    """The provider failed or could not be reached (502), or is overloaded (503)."""

    status = 502
    type = "server_error"
    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, headers=headers)
        self.status = status


class ServerError(RelayError):
    status = 500
    type = "server_error"
    code = "server_error"


class DatabaseUnavailable(RelayError):
    """The database cannot be reached (stopped, restarting, failing over): a 503 that clients
    retry (relay.storage.outage tells these errors apart)."""

    status = 503
    type = "server_error"
    code = "database_unavailable"

    def __init__(self, reason: str) -> None:
        super().__init__(
            "The server's database is unavailable; retry shortly.", headers={"retry-after": "2"}
        )
        self.reason = reason  # the driver's words, for the log (no statement, no parameters)


class StartupError(Exception):
    """Something a user can fix stops Relay from starting (the database cannot be reached, or
    another instance seals with another key): said in one line, without a traceback."""
