"""The one way into the console: every page is wrapped by `console_page` (relay.ui.routes
wraps the whole table), so no handler runs without its viewer resolved, its form checked
against CSRF, and its project checked against what the viewer may see.

- Sign-in takes a key in a POSTed form, never in a URL. An admin key signs in to the whole
  console; a client key to its own project's pages. The key is checked by the API's own
  gate (`Access.admin_of`, `Access.principal_of`) and then forgotten: the session keeps
  the key's id, and every page reads that key again through the same gate, so a revoked or
  expired key, or an archived project, ends its sessions within `key_cache_s`.
- Failed sign-ins are logged (the address and the refusal's code, never the key) and counted
  per client address, across every worker and instance when Redis is configured: past
  `SIGN_IN_FAILURES` in a minute, the address is refused (429) before any key it sends is
  read.
- Every POST carries the session's CSRF token in its form (the sign-in form a token of its
  own, doubled in a cookie) and, when the browser sends an Origin, comes from this host.
  The cookie is HttpOnly and SameSite=Strict (and Secure over HTTPS), so it is neither
  readable by scripts nor sent along by another site's pages.
- Another project's pages answer what an unknown project gets (404); an admin's pages
  answer a client key's session 403.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay.access.admin import Admin
from relay.access.gate import Access, Principal
from relay.access.keys import KeyRecord
from relay.access.limits import Admission, RateLimiter, Scope
from relay.api.auth import access
from relay.api.paging import read_body, refuse_nul
from relay.errors import (
    AuthenticationError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    RelayError,
)
from relay.models.policy import Policy
from relay.observe.access import note_caller
from relay.ui import render
from relay.ui.sessions import Session, Sessions

log = logging.getLogger("relay.console")

ROOT = "/console"
SIGN_IN = ROOT + "/sign-in"
COOKIE = "relay_console"
SIGN_IN_COOKIE = "relay_console_sign_in"  # the sign-in form's own CSRF token, doubled
SIGN_IN_FAILURES = 5  # per client address and minute
_MAX_FORM_BYTES = 64 * 1024

Form = dict[str, str]


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who a console page is for: an admin (`admin`, its key's name), or a client key acting
    for its project (`principal`, as the API would resolve it)."""

    session: Session
    admin: str | None
    principal: Principal | None
    # A key allowed several projects: those it may switch between now, as (id, name).
    projects: tuple[tuple[str, str], ...] = ()

    @property
    def actor(self) -> str:
        """Who the audit log says made a change."""
        return f"console:{self.admin}"

    def sees(self, project_id: str) -> bool:
        return self.admin is not None or (
            self.principal is not None and self.principal.project == project_id
        )


Page = Callable[[Request, Viewer, Form], Awaitable[Response]]
Endpoint = Callable[[Request], Awaitable[Response]]


class SignInThrottle:
    """Failed sign-ins per client address over a sliding minute, counted where the API's rate
    limits are (relay.access.limits): in Redis with `redis_url`, so that every worker and
    instance reads the same count, in this process's memory otherwise. Failures are kept as
    a scope's token window, whose admission only tests that one more would fit and counts
    nothing: a sign-in is let in while the window has room, and only a failed one is added.
    Where the API's limits let requests through unchecked (Redis failing), sign-ins are
    still counted, in this process: guessing keys is never unlimited."""

    def __init__(self, limiter: RateLimiter, limit: int = SIGN_IN_FAILURES) -> None:
        self.limiter = limiter
        self.fallback = RateLimiter()
        self.policy = Policy(tpm=limit)

    async def admit(self, address: str) -> SignInAttempt:
        """The right to try a key from `address`, or 429 while it has failed too often."""
        scope = Scope("console-sign-in", address, self.policy)
        try:
            admission = await self.limiter.admit([scope], estimated_tokens=1)
            if admission.lease is not None:
                return SignInAttempt(self.limiter, admission)
            # The shared store was skipped: counted here instead.
            return SignInAttempt(self.fallback, await self.fallback.admit([scope], 1))
        except RateLimited as refused:
            raise RateLimited(
                "Too many failed sign-ins from this address: try again in a minute.",
                headers={"retry-after": refused.headers["retry-after"]},
            ) from None


@dataclass(slots=True)
class SignInAttempt:
    limiter: RateLimiter
    admission: Admission

    async def end(self, failed: bool) -> None:
        """Free what the attempt held, counting it against its address when it `failed`
        (nothing else is ever counted)."""
        waiting = self.limiter.settle(self.admission, 1 if failed else 0)
        if waiting is not None:
            await waiting


@dataclass(frozen=True, slots=True)
class Console:
    """What the console keeps in the application (app.state.console)."""

    sessions: Sessions
    throttle: SignInThrottle


def _console(request: Request) -> Console:
    console: Console = request.app.state.console
    return console


def admin_api(request: Request) -> Admin:
    admin: Admin = request.app.state.admin
    return admin


def _address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


async def _form(request: Request) -> Form:
    """A POSTed form (application/x-www-form-urlencoded), each name's last value. A NUL
    character anywhere is refused: values become columns."""
    body = await read_body(request, _MAX_FORM_BYTES)
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=100)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("The form could not be read.") from None
    form = dict(pairs)
    if any("\x00" in text for pair in form.items() for text in pair):
        raise InvalidRequest("The form holds a NUL character.")
    return form


def _same_origin(request: Request) -> bool:
    """Whether the browser says the form came from a page of this host (a browser that
    sends no Origin still needs the CSRF token)."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host")


def _check_csrf(request: Request, sent: str | None, expected: str | None) -> None:
    if not (expected and sent and hmac.compare_digest(sent, expected)) or not _same_origin(request):
        raise PermissionDenied(
            "The form's CSRF token is missing or wrong: reload the page and try again.",
            code="csrf_failed",
        )


async def _viewer(request: Request, token: str) -> Viewer | None:
    """The session's viewer, its key read again through the gate (401/403 when it no
    longer may: revoked, expired, its project archived, an admin key removed)."""
    session = await _console(request).sessions.find(token)
    if session is None:
        return None
    gate = access(request)
    if session.kind == "admin":
        name = gate.admin_named(session.subject)
        if name is None:
            raise AuthenticationError(
                "This admin key is no longer configured.", code="invalid_admin_key"
            )
        return Viewer(session, name, None)
    record = await gate.keys.by_id(session.subject)
    try:
        principal = await gate.principal_of(record, session.project_id)
        allowed = None
    except PermissionDenied:
        # The session's project archived: a key of several goes on with those it may still
        # act for (a revoked or expired key is an AuthenticationError: the session ends).
        if record is None or len(record.projects) == 1:
            raise
        allowed = await _allowed(gate, record)
        if not allowed:
            raise
        principal = await gate.principal_of(record, allowed[0])
    assert record is not None  # principal_of refuses None
    if len(record.projects) == 1:
        return Viewer(session, None, principal)
    if allowed is None:
        allowed = await _allowed(gate, record)
    picked = request.path_params.get("project_id")
    if picked in allowed and picked != principal.project:
        principal = await gate.principal_of(record, picked)
    names = await admin_api(request).project_names(allowed)
    return Viewer(session, None, principal, tuple((id_, names[id_]) for id_ in allowed))


async def _allowed(gate: Access, record: KeyRecord) -> list[str]:
    """The projects a key may act for now, as the gate decides for X-Project-ID (an archived
    or missing one left out): a page of any other answers 404, as an unknown project's."""
    allowed = []
    for project_id in sorted(record.projects):
        try:
            await gate.principal_of(record, project_id)
        except (AuthenticationError, PermissionDenied):
            continue
        allowed.append(project_id)
    return allowed


def console_page(handler: Page, *, admins_only: bool = False) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        viewer = None
        try:
            refuse_nul(request)
            token = request.cookies.get(COOKIE)
            try:
                viewer = None if not token else await _viewer(request, token)
            except (AuthenticationError, PermissionDenied) as refused:
                assert token is not None
                await _console(request).sessions.close(token)
                return _signed_out(request, refused.message, refused.status)
            if viewer is None:
                if request.method == "GET":
                    return RedirectResponse(SIGN_IN, status_code=303)
                raise PermissionDenied("Sign in first.", code="not_signed_in")
            if viewer.admin is not None:
                note_caller(None, f"admin:{viewer.admin}")
            else:
                assert viewer.principal is not None
                note_caller(viewer.principal.project, viewer.principal.key_id)
            form: Form = {}
            if request.method == "POST":
                form = await _form(request)
                _check_csrf(request, form.get("csrf"), viewer.session.csrf)
            project_id = request.path_params.get("project_id")
            if project_id is not None and not viewer.sees(project_id):
                # What a project that does not exist gets: nothing tells them apart.
                raise NotFound(f"Project '{project_id[:100]}' not found.", code="project_not_found")
            if admins_only and viewer.admin is None:
                raise PermissionDenied("This page is for admin keys' sessions.", code="admins_only")
            return await handler(request, viewer, form)
        except RelayError as error:
            return render.error(request, viewer, error)

    return endpoint


async def sign_in_page(request: Request) -> Response:
    return _sign_in_form(request, None, 200)


def _sign_in_form(request: Request, message: str | None, status: int) -> Response:
    """The sign-in form, with a fresh token for its CSRF check, doubled in a cookie."""
    token = secrets.token_urlsafe(24)
    if access(request).open:
        message = (
            "This Relay has no keys configured: the console needs an admin key "
            "(admin_keys) or client keys."
        )
    answer = render.page(request, None, "sign_in.html", status, csrf=token, message=message)
    answer.set_cookie(
        SIGN_IN_COOKIE,
        token,
        max_age=3600,
        path=ROOT,
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    return answer


async def sign_in(request: Request) -> Response:
    address = _address(request)
    console = _console(request)
    attempt: SignInAttempt | None = None
    failed = False
    try:
        refuse_nul(request)
        attempt = await console.throttle.admit(address)
        form = await _form(request)
        _check_csrf(request, form.get("csrf"), request.cookies.get(SIGN_IN_COOKIE))
        session, who = await _open_session(request, access(request), form.get("key", "").strip())
    except (AuthenticationError, PermissionDenied) as refused:
        failed = refused.code != "csrf_failed"  # a stale form is no guess at a key
        if failed:
            log.warning("console sign-in from %s refused: %s", address, refused.code)
        return _sign_in_form(request, refused.message, refused.status)
    except RelayError as error:
        if isinstance(error, RateLimited):
            log.warning("console sign-in from %s refused: too many failures", address)
        return render.error(request, None, error)
    finally:
        if attempt is not None:
            await attempt.end(failed)
    log.info("console sign-in from %s: %s", address, who)
    previous = request.cookies.get(COOKIE)
    if previous:  # the session this browser had, replaced: ended, not left to expire
        await console.sessions.close(previous)
    answer = RedirectResponse(ROOT, status_code=303)
    answer.set_cookie(
        COOKIE,
        session.token,
        max_age=max(1, session.expires_at - int(time.time())),
        path=ROOT,
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    answer.delete_cookie(SIGN_IN_COOKIE, path=ROOT)
    return answer


async def _open_session(request: Request, gate: Access, key: str) -> tuple[Session, str]:
    """A session for `key` (and who it is, for the log), or the gate's 401/403."""
    sessions = _console(request).sessions
    if gate.open:
        raise PermissionDenied("This Relay has no keys configured.", code="no_keys")
    admin = gate.admin_of(key) if key else None
    if admin is not None:
        return await sessions.open("admin", admin[0], None), f"admin '{admin[1]}'"
    record = await gate.keys.find(key) if key else None
    principal = await gate.principal_of(record, None)
    assert record is not None  # principal_of refuses None
    session = await sessions.open("project", record.key_id, principal.project)
    return session, f"key {record.key_id} of project {principal.project}"


async def sign_out(request: Request, viewer: Viewer, form: Form) -> Response:
    await _console(request).sessions.close(viewer.session.token)
    return _signed_out(request, "Signed out.", 200)


def _signed_out(request: Request, message: str, status: int) -> Response:
    """The sign-in form, saying why, with the session's cookie cleared."""
    answer = _sign_in_form(request, message, status)
    answer.delete_cookie(COOKIE, path=ROOT)
    return answer
