"""What requests carry, read once for every endpoint: bodies within their size limit, path
and query parameters without NUL characters, and the query parameters of list endpoints
(cursors, page sizes, order)."""

from __future__ import annotations

import logging
import re
from typing import Any

from starlette.requests import HTTPConnection, Request

from relay.api.encoding import codings, decode
from relay.errors import InvalidRequest, NotFound, PayloadTooLarge
from relay.ids import looks_like_response_id
from relay.protocol import ID_PATTERN
from relay.storage.base import Store

log = logging.getLogger("relay.api")

MAX_PAGE = 100
DEFAULT_PAGE = 20
_ITEM_ID = re.compile(ID_PATTERN)


def int_or_none(text: str | None) -> int | None:
    """An ASCII decimal integer, or None. Not str.isdigit() + int(): '²' passes isdigit and
    int() refuses it, and int() refuses more than 4300 digits; either would answer 500."""
    if text is None or not text.isascii() or len(text) > 20:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def refuse_nul(connection: HTTPConnection) -> None:
    """A 400 naming the path or query parameter that holds a NUL character: PostgreSQL text
    cannot hold one, and any of them may reach SQL (an id, a cursor, a filter). Looked for
    in the raw path and query first, so a request without one pays two searches. (Headers
    cannot carry one: the HTTP parser refuses the request.)"""
    scope = connection.scope
    if "\x00" not in scope["path"] and b"%00" not in scope["query_string"]:
        return
    for name, value in [*connection.path_params.items(), *connection.query_params.multi_items()]:
        if "\x00" in value:
            raise InvalidRequest(f"Invalid '{name[:40]}': it contains a NUL character.", param=name)


def cursor(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    # fullmatch: with match, ID_PATTERN's '$' would let a trailing newline through.
    if value is not None and not _ITEM_ID.fullmatch(value):
        raise InvalidRequest(
            f"Invalid '{name}': expected an item id of 1 to 256 printable ASCII characters.",
            param=name,
        )
    return value


def limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_PAGE
    limit = int_or_none(raw)
    if limit is None or not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(
            f"Invalid 'limit': expected an integer from 1 to {MAX_PAGE}, got '{raw[:20]}'.",
            param="limit",
        )
    return limit


def order(request: Request) -> str:
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest(
            f"Invalid 'order': expected 'asc' or 'desc', got '{order[:20]}'.", param="order"
        )
    return order


async def read_body(request: Request, limit: int | None = None) -> bytes:
    """The body, refused with a 413 past `limit` bytes (default: max_body_bytes) before it
    is all in memory; decompressed when it came with a Content-Encoding, within the same
    limit (relay.api.encoding)."""
    if limit is None:
        limit = int(request.app.state.settings.max_body_bytes)
    applied = codings(request.headers.get("content-encoding"))  # a 415 before any reading
    declared = int_or_none(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise PayloadTooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not applied:
        return body
    decoded = decode(body, applied, limit)
    log.debug(
        "request body: %d bytes %s-encoded, %d decoded", size, "+".join(applied), len(decoded)
    )
    return decoded


def response_id_param(request: Request) -> str:
    """The `response_id` path parameter, when it can name a response (else a 400)."""
    value: str = request.path_params["response_id"]
    if not looks_like_response_id(value):
        raise InvalidRequest(
            f"Invalid 'response_id': '{value[:80]}'. Expected an ID that begins with 'resp_'.",
            param="response_id",
            code="invalid_response_id",
        )
    return value


def response_not_found(response_id: str) -> NotFound:
    return NotFound(
        f"Response with id '{response_id[:100]}' not found.",
        param="response_id",
        code="response_not_found",
    )


async def input_items(request: Request, store: Store, project: str) -> dict[str, Any]:
    """A stored response's input items as the list GET .../input_items answers (`after`,
    `before`, `limit`, `order`), for its project's keys and for an admin alike."""
    response_id = response_id_param(request)
    page = await store.list_input_items(
        project,
        response_id,
        after=cursor(request, "after"),
        before=cursor(request, "before"),
        limit=limit(request),
        order="asc" if order(request) == "asc" else "desc",
    )
    if page is None:
        raise response_not_found(response_id)
    return page.as_list()
