"""HTTP endpoints: authenticate, parse, call the engine or the store, frame the answer."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError
from starlette.responses import Response

from relay.api.auth import tenant_of
from relay.api.sse import EventStreamResponse
from relay.engine.run import Engine
from relay.errors import InvalidRequest, NotFound, PayloadTooLarge
from relay.ids import looks_like_response_id
from relay.protocol import ID_PATTERN, MAX_DEPTH, CreateResponse, invalid_request, too_deep
from relay.storage.base import Store

router = APIRouter()
Tenant = Annotated[str, Depends(tenant_of)]
STARTED = int(time.time())
MAX_SESSION_ID = 128


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 past `limit` bytes before it is all in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_create(body: bytes) -> CreateResponse:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if too_deep(data):
        raise InvalidRequest(f"The request body nests deeper than {MAX_DEPTH} levels.")
    try:
        return CreateResponse.model_validate(data)
    except ValidationError as error:
        raise invalid_request(error, data) from None


def _checked_id(response_id: str) -> str:
    if not looks_like_response_id(response_id):
        raise InvalidRequest(
            f"Invalid 'response_id': '{response_id[:80]}'. "
            "Expected an ID that begins with 'resp_'.",
            param="response_id",
            code="invalid_response_id",
        )
    return response_id


def _not_found(response_id: str) -> NotFound:
    return NotFound(
        f"Response with id '{response_id}' not found.",
        param="response_id",
        code="response_not_found",
    )


@router.post("/responses")
async def create_response(request: Request, tenant: Tenant) -> Response:
    body = parse_create(await read_body(request, request.app.state.settings.max_body_bytes))
    session = request.headers.get("x-session-id")
    if session is not None and len(session) > MAX_SESSION_ID:
        raise InvalidRequest(
            f"x-session-id is longer than {MAX_SESSION_ID} characters.", param="x-session-id"
        )
    run = await _engine(request).start(body, tenant=tenant, session_id=session)
    if body.stream:
        return EventStreamResponse(run.events(), keepalive_s=request.app.state.settings.keepalive_s)
    return json_response(await run.final())


@router.get("/responses")
async def responses_info(tenant: Tenant) -> Response:
    return json_response(
        {
            "object": "endpoint",
            "endpoint": "/v1/responses",
            "methods": {
                "POST /responses": "Create a response (JSON, or SSE with stream: true).",
                "GET /responses/{id}": "Retrieve a stored response.",
                "DELETE /responses/{id}": "Delete a stored response.",
                "GET /responses/{id}/input_items": "List a stored response's input items.",
            },
        }
    )


@router.get("/responses/{response_id}")
async def get_response(response_id: str, request: Request, tenant: Tenant) -> Response:
    stored = await _store(request).get_response(tenant, _checked_id(response_id))
    if stored is None:
        raise _not_found(response_id)
    return json_response(stored)


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request, tenant: Tenant) -> Response:
    if not await _store(request).delete_response(tenant, _checked_id(response_id)):
        raise _not_found(response_id)
    return json_response({"id": response_id, "object": "response", "deleted": True})


@router.get("/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    request: Request,
    tenant: Tenant,
    after: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    before: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
) -> Response:
    page = await _store(request).list_input_items(
        tenant, _checked_id(response_id), after=after, before=before, limit=limit, order=order
    )
    if page is None:
        raise _not_found(response_id)
    return json_response(
        {
            "object": "list",
            "data": page.data,
            "first_id": page.first_id,
            "last_id": page.last_id,
            "has_more": page.has_more,
        }
    )


@router.get("/models")
async def list_models(request: Request, tenant: Tenant) -> Response:
    names = request.app.state.engine.registry.names()
    return json_response(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": STARTED, "owned_by": "relay"}
                for name in names
            ],
        }
    )
