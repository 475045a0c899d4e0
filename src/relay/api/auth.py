"""Authentication by construction: `routes()` wraps every data-plane endpoint in
`client_endpoint` and every admin endpoint in `admin_endpoint`, so no handler runs without
its caller resolved, and handlers receive the caller instead of reading headers. The rules
themselves live in relay.access.gate.Access. The wrappers also refuse NUL characters in
path and query parameters, which every handler would otherwise have to remember."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from relay.access.gate import Access, Principal
from relay.api.errors import error_response
from relay.api.paging import refuse_nul
from relay.errors import RelayError
from relay.observe.access import note_caller

Endpoint = Callable[[Request], Awaitable[Response]]
ClientHandler = Callable[[Request, Principal], Awaitable[Response]]
AdminHandler = Callable[[Request, str], Awaitable[Response]]
SocketHandler = Callable[[WebSocket, Principal], Awaitable[None]]


def access(request: Request | WebSocket) -> Access:
    gate: Access = request.app.state.access
    return gate


def client_endpoint(handler: ClientHandler) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        principal = await access(request).principal(request)
        note_caller(principal.project, principal.key_id)
        refuse_nul(request)
        return await handler(request, principal)

    return endpoint


def admin_endpoint(handler: AdminHandler) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        actor = access(request).admin(request)
        note_caller(None, f"admin:{actor}")
        refuse_nul(request)
        return await handler(request, actor)

    return endpoint


def operator_endpoint(handler: AdminHandler) -> Endpoint:
    """An admin endpoint that a Relay without any key (loopback only) serves to its loopback
    clients, as it serves them everything else (/metrics)."""
    admin = admin_endpoint(handler)

    async def endpoint(request: Request) -> Response:
        gate = access(request)
        if not gate.open:
            return await admin(request)
        await gate.principal(request)  # refuses any but a loopback client
        return await handler(request, "loopback")

    return endpoint


def client_socket(handler: SocketHandler) -> Callable[[WebSocket], Awaitable[None]]:
    async def endpoint(websocket: WebSocket) -> None:
        try:
            principal = await access(websocket).principal(websocket)
            note_caller(principal.project, principal.key_id)
            refuse_nul(websocket)
        except RelayError as error:
            # Refused before the upgrade, with the status and envelope HTTP would get.
            await websocket.send_denial_response(error_response(error))
            return
        await handler(websocket, principal)

    return endpoint
