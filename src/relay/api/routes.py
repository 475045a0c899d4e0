"""HTTP endpoints: parse, call the engine or the store, frame the answer.

Plain Starlette routes, each wrapped by `routes()` in the authentication its plane needs
(relay.api.auth): a handler receives its caller and never reads credentials itself. No
dependency injection: the hot path (POST /responses) pays for none.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from relay.access.gate import Principal
from relay.access.idempotency import checked_key, request_digest
from relay.api import admin, background, conversations
from relay.api.auth import (
    ClientHandler,
    access,
    client_endpoint,
    client_socket,
    operator_endpoint,
)
from relay.api.disconnect import CancelOnDisconnect
from relay.api.idempotent import REPLAYED, recorded, replayed
from relay.api.paging import (
    input_items,
    read_body,
    response_id_param,
    response_not_found,
)
from relay.api.readiness import readyz
from relay.api.sse import EventStreamResponse
from relay.api.websocket import responses_socket
from relay.engine.run import Engine
from relay.errors import InvalidRequest
from relay.observe.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from relay.protocol import MAX_SESSION_ID, CreateResponse, create_request, json_object
from relay.storage.base import Store

STARTED = int(time.time())
OMITTED_TOOLS = "x-relay-omitted-tools"  # the hosted tool types a request had left out
DEPLOYMENT = "x-relay-deployment"  # the deployment that answered (relay.engine.routing)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def parse_create(body: bytes) -> CreateResponse:
    return create_request(json_object(body))


async def create_response(request: Request, principal: Principal) -> Response:
    raw = await read_body(request, request.app.state.settings.max_body_bytes)
    body = parse_create(raw)
    # Codex CLI sends its session as `session-id`.
    session = request.headers.get("x-session-id") or request.headers.get("session-id")
    if session is not None and len(session) > MAX_SESSION_ID:
        raise InvalidRequest(
            f"x-session-id is longer than {MAX_SESSION_ID} characters.", param="x-session-id"
        )
    idempotency_key = request.headers.get("idempotency-key")
    if idempotency_key is None:
        return await _respond(request, principal, body, raw, session, None)
    idempotency = access(request).idempotency
    key = checked_key(idempotency_key)
    replay = await idempotency.claim(principal.project, key, request_digest(raw))
    if replay is not None:
        if replay.media_type == background.BACKGROUND_STREAM:
            return background.replay_stream(request, replay.body.decode(), {REPLAYED: "true"})
        return replayed(replay)
    try:
        return await _respond(request, principal, body, raw, session, key)
    except BaseException:
        # No response came of it: a retry with this key runs again.
        access(request).track(idempotency.release(principal.project, key))
        raise


async def _respond(
    request: Request,
    principal: Principal,
    body: CreateResponse,
    raw: bytes,
    session: str | None,
    idempotency_key: str | None,
) -> Response:
    gate = access(request)
    accounting = await gate.admit(principal, body, len(raw))
    if body.background:
        try:
            return await background.submit(
                request, principal, body, session, accounting, idempotency_key
            )
        except BaseException:
            accounting.abandon()
            raise
    try:
        # A client that leaves before its answer is ready stops the work done for it (a
        # stream watches for that itself once it has begun).
        with CancelOnDisconnect(request.receive):
            runner = background.runner(request)
            run = await _engine(request).start(
                body,
                tenant=principal.project,
                session_id=session,
                on_settled=accounting.settle,
                key_id=principal.key_id,
                # A stored stream's id is in response.created: recorded first, so it never
                # 404s (beside the upstream's opening).
                record=runner.start_record(principal.project) if body.stream else None,
            )
            headers = accounting.headers.copy()
            if run.omitted_tools:
                headers[OMITTED_TOOLS] = ",".join(run.omitted_tools)
            if run.deployment is not None:
                headers[DEPLOYMENT] = run.deployment.name
            if body.stream:
                if run.response["store"]:
                    runner.follow_stream(run)
                events = run.events()
                if idempotency_key is not None:
                    events = recorded(events, gate, principal.project, idempotency_key)
                keepalive_s = request.app.state.settings.keepalive_s
                return EventStreamResponse(events, keepalive_s=keepalive_s, headers=headers)
            answer = await run.final()
    except BaseException:
        accounting.abandon()
        raise
    data = orjson.dumps(answer)
    if idempotency_key is not None:
        await gate.idempotency.complete(
            principal.project, idempotency_key, 200, "application/json", data
        )
    return Response(data, media_type="application/json", headers=headers)


async def count_input_tokens(request: Request, principal: Principal) -> Response:
    """POST /responses/input_tokens: what the same body would cost in input tokens. Exact
    where the model's tokenizer is at hand (the embedded model), else an estimate, and the
    answer says which (`estimated`)."""
    body = parse_create(await read_body(request, request.app.state.settings.max_body_bytes))
    count = await _engine(request).count_input_tokens(body, tenant=principal.project)
    return json_response(
        {
            "object": "response.input_tokens",
            "input_tokens": count.tokens,
            "estimated": not count.exact,
        }
    )


async def compact_response(request: Request, principal: Principal) -> Response:
    """POST /responses/compact: a shorter window for the context (see Engine.compact). It
    calls the model, so it is admitted and accounted as a response."""
    raw = await read_body(request, request.app.state.settings.max_body_bytes)
    body = parse_create(raw)
    accounting = await access(request).admit(principal, body, len(raw))
    try:
        compacted = await _engine(request).compact(
            body, tenant=principal.project, on_settled=accounting.settle, key_id=principal.key_id
        )
    finally:
        accounting.abandon()  # a no-op once the summary settled
    return json_response(compacted, headers=accounting.headers)


async def responses_info(request: Request, principal: Principal) -> Response:
    return json_response(
        {
            "object": "endpoint",
            "endpoint": "/v1/responses",
            "methods": {
                "POST /responses": "Create a response (JSON, or SSE with stream: true).",
                "POST /responses/input_tokens": "Count a would-be response's input tokens.",
                "POST /responses/compact": "Compact a context into a shorter window.",
                "GET /responses (WebSocket upgrade)": "WebSocket mode: response.create turns.",
                "GET /responses/{id}": "Retrieve a stored response; with stream=true and "
                "starting_after, replay and follow a background response's events.",
                "POST /responses/{id}/cancel": "Cancel a queued or running background response.",
                "DELETE /responses/{id}": "Delete a stored response.",
                "GET /responses/{id}/input_items": "List a stored response's input items.",
            },
        }
    )


async def get_response(request: Request, principal: Principal) -> Response:
    stored = await _stored(request, principal)
    if request.query_params.get("stream") == "true":
        return background.resume(request, stored)
    return json_response(stored)


async def cancel_response(request: Request, principal: Principal) -> Response:
    return await background.cancel(request, principal.project, await _stored(request, principal))


async def _stored(request: Request, principal: Principal) -> dict[str, Any]:
    response_id = response_id_param(request)
    stored = await _store(request).get_response(principal.project, response_id)
    if stored is None:
        raise response_not_found(response_id)
    return stored


async def delete_response(request: Request, principal: Principal) -> Response:
    response_id = response_id_param(request)
    if not await _store(request).delete_response(principal.project, response_id):
        raise response_not_found(response_id)
    return json_response({"id": response_id, "object": "response", "deleted": True})


async def list_input_items(request: Request, principal: Principal) -> Response:
    return json_response(await input_items(request, _store(request), principal.project))


async def list_models(request: Request, principal: Principal) -> Response:
    names = request.app.state.engine.registry.names()
    allowed = principal.key.models
    if allowed is not None:
        names = [name for name in names if name in allowed]
    return json_response(
        {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": STARTED, "owned_by": "relay"}
                for name in names
            ],
        }
    )


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def metrics(request: Request, _: str) -> Response:
    """Prometheus' text format (relay.observe.metrics)."""
    return Response(request.app.state.metrics.exposition(), media_type=METRICS_CONTENT_TYPE)


Endpoint = Callable[[Request], Awaitable[Response]]
_API: list[tuple[str, ClientHandler, str]] = [
    ("/responses", create_response, "POST"),
    ("/responses/input_tokens", count_input_tokens, "POST"),
    ("/responses/compact", compact_response, "POST"),
    ("/responses", responses_info, "GET"),
    ("/responses/{response_id}", get_response, "GET"),
    ("/responses/{response_id}", delete_response, "DELETE"),
    ("/responses/{response_id}/cancel", cancel_response, "POST"),
    ("/responses/{response_id}/input_items", list_input_items, "GET"),
    ("/models", list_models, "GET"),
    ("/conversations", conversations.create, "POST"),
    ("/conversations/{conversation_id}", conversations.retrieve, "GET"),
    ("/conversations/{conversation_id}", conversations.update, "POST"),
    ("/conversations/{conversation_id}", conversations.delete, "DELETE"),
    ("/conversations/{conversation_id}/items", conversations.list_items, "GET"),
    ("/conversations/{conversation_id}/items", conversations.add_items, "POST"),
    ("/conversations/{conversation_id}/items/{item_id}", conversations.get_item, "GET"),
    ("/conversations/{conversation_id}/items/{item_id}", conversations.delete_item, "DELETE"),
]


def _route(path: str, endpoint: Endpoint, method: str) -> Route:
    route = Route(path, endpoint, methods=[method])
    # Starlette adds HEAD to every GET route; the API never served HEAD (405), so it still
    # does not (and a HEAD on a stored response does not cost a database read).
    route.methods = {method}
    return route


def routes(prefixes: tuple[str, ...]) -> list[BaseRoute]:
    """The API under each prefix (every endpoint behind client authentication), WebSocket
    mode on /responses, the admin API (behind admin authentication), /healthz and /readyz
    (no authentication: they tell only whether this instance lives and can serve). POST
    /responses comes first: it is matched on every request that matters for speed."""
    table: list[BaseRoute] = [
        _route(prefix + path, client_endpoint(handler), method)
        for path, handler, method in _API
        for prefix in prefixes
    ]
    sockets = [
        WebSocketRoute(prefix + "/responses", client_socket(responses_socket))
        for prefix in prefixes
    ]
    return [
        *table,
        *sockets,
        *admin.routes(_route),
        _route("/healthz", healthz, "GET"),
        _route("/readyz", readyz, "GET"),
        _route("/metrics", operator_endpoint(metrics), "GET"),
    ]
