"""The console's routes, under /console, and the headers every answer there carries: a
Content-Security-Policy that lets a page load only this server's own scripts, styles and
images (no inline script or style, no other origin, no framing), and no caching of pages
(a new key is shown once; a signed-out browser's back button shows nothing)."""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.ui import pages, projects
from relay.ui.guard import (
    ROOT,
    Endpoint,
    Page,
    console_page,
    sign_in,
    sign_in_page,
    sign_out,
)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "object-src 'none'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
_NO_STORE = (b"cache-control", b"no-store")
STATIC = "/static"

# (path, handler, method, for admins only)
_PAGES: list[tuple[str, Page, str, bool]] = [
    ("", pages.home, "GET", False),
    ("/overview", pages.overview, "GET", True),
    ("/projects/{project_id}/overview", pages.overview, "GET", False),
    ("/sign-out", sign_out, "POST", False),
    ("/projects", projects.projects, "GET", True),
    ("/projects", projects.create_project, "POST", True),
    ("/projects/{project_id}", projects.project, "GET", False),
    ("/projects/{project_id}/policy", projects.update_policy, "POST", True),
    ("/projects/{project_id}/keys", projects.create_key, "POST", True),
    ("/projects/{project_id}/archive", projects.archive_project, "POST", True),
    ("/projects/{project_id}/keys/{key_id}", projects.key, "GET", True),
    ("/projects/{project_id}/keys/{key_id}", projects.update_key, "POST", True),
    ("/projects/{project_id}/keys/{key_id}/revoke", projects.revoke_key, "POST", True),
    ("/projects/{project_id}/responses", pages.responses, "GET", False),
    ("/projects/{project_id}/responses/{response_id}", pages.response, "GET", False),
    ("/projects/{project_id}/responses/{response_id}/events", pages.response_events, "GET", False),
    ("/projects/{project_id}/responses/{response_id}/cancel", pages.cancel_response, "POST", False),
    ("/projects/{project_id}/conversations", pages.conversations, "GET", False),
    ("/projects/{project_id}/conversations/{conversation_id}", pages.conversation, "GET", False),
    (
        "/projects/{project_id}/conversations/{conversation_id}",
        pages.update_conversation,
        "POST",
        False,
    ),
    (
        "/projects/{project_id}/conversations/{conversation_id}/delete",
        pages.delete_conversation,
        "POST",
        False,
    ),
    ("/audit", pages.audit, "GET", True),
]


class _Guarded:
    """Adds the console's headers to every answer under /console, errors and static files
    included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        static = scope["path"].startswith(ROOT + STATIC + "/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), *_HEADERS]
                if not static and not any(name == b"cache-control" for name, _ in headers):
                    headers.append(_NO_STORE)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _Static(StaticFiles):
    """The console's own files; a missing one is a plain 404 answered here, inside the
    headers' layer (StaticFiles raises it to the application's handlers, outside it)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        try:
            return await super().get_response(path, scope)
        except HTTPException as missing:
            return PlainTextResponse(missing.detail, status_code=missing.status_code)


def _route(path: str, endpoint: Endpoint, method: str) -> Route:
    route = Route(ROOT + path, endpoint, methods=[method], middleware=[Middleware(_Guarded)])
    route.methods = {method}  # no HEAD, as the API
    return route


def console_routes() -> list[BaseRoute]:
    """Every console page behind `console_page`; the sign-in form and the static files
    (the console's own CSS and JavaScript) are all that is served without a session."""
    static = _Static(directory=Path(__file__).with_name("static"))
    return [
        *(
            _route(path, console_page(handler, admins_only=admins_only), method)
            for path, handler, method, admins_only in _PAGES
        ),
        _route("/sign-in", sign_in_page, "GET"),
        _route("/sign-in", sign_in, "POST"),
        Mount(ROOT + STATIC, static, middleware=[Middleware(_Guarded)]),
    ]
