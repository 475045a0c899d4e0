"""The console's pages. Each runs behind `guard.console_page` (relay.ui.routes), receives its
viewer and form, and calls only the operations the admin API documents: the project and
key operations and the lists of relay.access.admin, and the store's reads of a response.
After a change the page redirects (POST, then GET), so a reload never repeats it; the one
exception is a new key, shown on the answer to its POST and nowhere else."""

from __future__ import annotations

import calendar
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relay.access.admin import RESPONSE_STATUSES, Admin
from relay.api import background
from relay.api.admin import deployments, response_filters
from relay.api.auth import access
from relay.api.paging import int_or_none
from relay.errors import InvalidRequest, NotFound
from relay.ids import looks_like_response_id
from relay.models.policy import Policy
from relay.storage.base import ItemPage, Store
from relay.storage.conversations import ConversationStore
from relay.ui import charts, render, transcript
from relay.ui.guard import ROOT, Form, Viewer

PAGE = 50  # rows a list shows at once
TRANSCRIPT_ITEMS = 1000  # input items a transcript shows at most
_WHOLE_LIMITS = ("rpm", "tpm", "max_concurrent")
_USD_LIMITS = ("daily_budget_usd", "monthly_budget_usd", "credit_usd")


def _admin(request: Request) -> Admin:
    admin: Admin = request.app.state.admin
    return admin


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _see_other(path: str) -> Response:
    return RedirectResponse(path, status_code=303)


def _project_path(project_id: str, rest: str = "") -> str:
    return f"{ROOT}/projects/{project_id}{rest}"


async def home(request: Request, viewer: Viewer, form: Form) -> Response:
    if viewer.principal is not None:
        return _see_other(_project_path(viewer.principal.project, "/overview"))
    return _see_other(ROOT + "/overview")


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _dollars(value: float) -> str:
    return f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


async def overview(request: Request, viewer: Viewer, form: Form) -> Response:
    """Requests (by status), tokens and cost over the last days or hours, the same window
    by model, deployment and project, and each deployment's health: the usage report of GET
    /admin/v1/usage and GET /admin/v1/deployments. Every project's (an admin's page), or the
    one of the path."""
    project_id = request.path_params.get("project_id")
    by: charts.Bucket = "hour" if request.query_params.get("by") == "hour" else "day"
    now = time.time()
    names = charts.buckets(by, now)
    ledger = access(request).ledger

    start = names[0][:10]  # the first bucket's day

    async def report(*group_by: str) -> list[dict[str, Any]]:
        return await ledger.report(
            list(group_by), project=project_id, key=None, start=start, end=None
        )

    over_time = [entry for entry in await report(by, "status") if entry[by] in names]
    statuses = charts.by_bucket(over_time, by, "status", "requests")
    tokens = {
        "input": charts.by_bucket(over_time, by, None, "input_tokens").get("input_tokens", {}),
        "output": charts.by_bucket(over_time, by, None, "output_tokens").get("output_tokens", {}),
    }
    cost = charts.by_bucket(over_time, by, None, "cost_usd").get("cost_usd", {})
    ordered = {name: statuses[name] for name in RESPONSE_STATUSES if name in statuses}
    ordered |= statuses  # a status Relay does not write today, last
    shown = [
        charts.stacked("Requests", names, ordered, _count),
        charts.stacked("Tokens", names, tokens, _count),
        charts.stacked("Cost", names, {"cost": cost}, _dollars),
    ]
    breakdowns = [("Model", await report("model")), ("Deployment", await report("deployment"))]
    if project_id is None:
        breakdowns.append(("Project", await report("project")))
    return render.page(
        request,
        viewer,
        "overview.html",
        project_id=project_id,
        by=by,
        start=start,
        charts=shown,
        breakdowns=breakdowns,
        # Routes serve every project: their health is shown where every project's usage is.
        deployments=deployments(request) if project_id is None else [],
    )


async def projects(request: Request, viewer: Viewer, form: Form) -> Response:
    after = request.query_params.get("after") or None
    listed = await _admin(request).list_projects(after, PAGE)
    older = f"?{urlencode({'after': listed['last_id']})}" if listed["has_more"] else None
    return render.page(request, viewer, "projects.html", projects=listed["data"], more=older)


async def create_project(request: Request, viewer: Viewer, form: Form) -> Response:
    body = {"name": form.get("name", "").strip(), "id": form.get("id", "").strip() or None}
    created = await _admin(request).create_project(viewer.actor, body)
    return _see_other(_project_path(created["id"]))


async def project(request: Request, viewer: Viewer, form: Form) -> Response:
    return await _project_page(request, viewer)


async def _standing(request: Request, scope: str, owner: str, policy: dict[str, Any]) -> Any:
    """What GET /admin/v1/projects/{id}/spend (or /keys/{id}/spend) answers."""
    return await access(request).ledger.standing(scope, owner, Policy.model_validate(policy))


async def _project_page(
    request: Request, viewer: Viewer, status: int = 200, problem: str | None = None
) -> Response:
    """A project: its policy (an admin edits it), its spend against its budgets, and its
    keys (an admin makes, edits and revokes them); a client key's session sees the policy,
    the spend and its own key."""
    project_id = request.path_params["project_id"]
    admin = _admin(request)
    try:
        found: dict[str, Any] | None = await admin.get_project(project_id)
    except NotFound:
        if viewer.admin is not None:
            raise
        found = None  # a config file's tenant: its keys need no project row
    if viewer.admin is not None:
        keys = (await admin.list_keys(project_id, None, PAGE))["data"]
    else:
        assert viewer.principal is not None
        key = viewer.principal.key
        keys = [await admin.get_key(key.key_id)] if key.in_database else []
    standings = []
    if found is not None:
        standings.append(await _standing(request, "project", project_id, found["policy"]))
    if viewer.admin is None and keys:
        standings.append(await _standing(request, "key", keys[0]["id"], keys[0]["policy"]))
    return render.page(
        request,
        viewer,
        "project.html",
        status,
        project_id=project_id,
        project=found,
        keys=keys,
        standings=standings,
        saved=request.query_params.get("saved"),
        problem=problem,
    )


def _number(name: str, raw: str, whole: bool) -> int | float | None:
    """A policy field as typed: empty lifts the limit."""
    text = raw.strip()
    if not text:
        return None
    if whole:
        value = int_or_none(text)
        if value is not None:
            return value
    else:
        try:
            return float(text)
        except ValueError:
            pass
    kind = "a whole number" if whole else "an amount in US dollars"
    raise InvalidRequest(f"Invalid '{name}': expected {kind}, or nothing for no limit.")


def _policy_changes(form: Form, current: dict[str, Any]) -> dict[str, Any]:
    """The policy form's fields that differ from `current` (so that the audit log says what
    changed); an empty field lifts its limit."""
    typed = {
        name: _number(name, form.get(name, ""), name in _WHOLE_LIMITS)
        for name in (*_WHOLE_LIMITS, *_USD_LIMITS)
    }
    return {name: value for name, value in typed.items() if current.get(name) != value}


async def update_policy(request: Request, viewer: Viewer, form: Form) -> Response:
    project_id = request.path_params["project_id"]
    admin = _admin(request)
    current = (await admin.get_project(project_id))["policy"]
    try:
        changes = _policy_changes(form, current)
        if changes:
            await admin.update_project(viewer.actor, project_id, {"policy": changes})
    except InvalidRequest as refused:
        return await _project_page(request, viewer, 400, problem=refused.message)
    access(request).keys.forget()  # this process applies the change at once
    return _see_other(_project_path(project_id, "?saved=policy"))


async def archive_project(request: Request, viewer: Viewer, form: Form) -> Response:
    """Archived, not deleted: its responses and usage stay; its keys stop working."""
    project_id = request.path_params["project_id"]
    await _admin(request).archive_project(viewer.actor, project_id)
    access(request).keys.forget()
    return _see_other(_project_path(project_id, "?saved=archived"))


def _expiry(raw: str) -> int | None:
    """A key's expiry from a date field (YYYY-MM-DD): the end of that day, UTC."""
    if not raw.strip():
        return None
    try:
        day = time.strptime(raw.strip(), "%Y-%m-%d")
    except ValueError:
        raise InvalidRequest("Invalid 'expires': expected a date (YYYY-MM-DD).") from None
    return calendar.timegm(day) + 24 * 3600


def _models(raw: str) -> list[str] | None:
    """A model allowlist as typed (commas or spaces between names); empty: every model."""
    return [name for name in raw.replace(",", " ").split() if name] or None


async def create_key(request: Request, viewer: Viewer, form: Form) -> Response:
    project_id = request.path_params["project_id"]
    try:
        body = {
            "project_id": project_id,
            "name": form.get("name", "").strip(),
            "models": _models(form.get("models", "")),
            "expires_at": _expiry(form.get("expires", "")),
        }
        created = await _admin(request).create_key(viewer.actor, body)
    except InvalidRequest as refused:
        return await _project_page(request, viewer, 400, problem=refused.message)
    return render.page(request, viewer, "key_created.html", 201, key=created)


async def _project_key(request: Request) -> dict[str, Any]:
    """The key of the path, which must be the project's (else the 404 an unknown key gets)."""
    key = await _admin(request).get_key(request.path_params["key_id"])
    if key["project_id"] != request.path_params["project_id"]:
        raise NotFound(f"API key '{key['id']}' not found.", code="api_key_not_found")
    return key


async def key(request: Request, viewer: Viewer, form: Form) -> Response:
    return await _key_page(request, viewer)


async def _key_page(
    request: Request, viewer: Viewer, status: int = 200, problem: str | None = None
) -> Response:
    """A key: its name, models, expiry and policy (an admin edits them), and its spend."""
    found = await _project_key(request)
    return render.page(
        request,
        viewer,
        "key.html",
        status,
        project_id=found["project_id"],
        key=found,
        standing=await _standing(request, "key", found["id"], found["policy"]),
        saved=request.query_params.get("saved"),
        problem=problem,
    )


async def update_key(request: Request, viewer: Viewer, form: Form) -> Response:
    current = await _project_key(request)
    try:
        body: dict[str, Any] = {}
        name = form.get("name", "").strip()
        if name != current["name"]:
            body["name"] = name
        models = _models(form.get("models", ""))
        if models != current["models"]:
            body["models"] = models
        expires = form.get("expires", "").strip()
        if expires != render.expiry_day(current["expires_at"]):
            body["expires_at"] = _expiry(expires)
        policy = _policy_changes(form, current["policy"])
        if policy:
            body["policy"] = policy
        if body:
            await _admin(request).update_key(viewer.actor, current["id"], body)
    except InvalidRequest as refused:
        return await _key_page(request, viewer, 400, problem=refused.message)
    access(request).keys.forget()
    return _see_other(_project_path(current["project_id"], f"/keys/{current['id']}?saved=key"))


async def revoke_key(request: Request, viewer: Viewer, form: Form) -> Response:
    found = await _project_key(request)
    await _admin(request).revoke_key(viewer.actor, found["id"])
    access(request).keys.forget()
    return _see_other(_project_path(found["project_id"], "?saved=revoked"))


async def responses(request: Request, viewer: Viewer, form: Form) -> Response:
    project_id = request.path_params["project_id"]
    filters = response_filters(request)
    after = request.query_params.get("after") or None
    listed = await _admin(request).list_responses(project_id, after, PAGE, **filters)
    older = None
    if listed["has_more"]:
        shown = {name: value for name, value in filters.items() if value}
        older = "?" + urlencode({**shown, "after": listed["last_id"]})
    return render.page(
        request,
        viewer,
        "responses.html",
        project_id=project_id,
        responses=listed["data"],
        filters=filters,
        statuses=RESPONSE_STATUSES,
        more=older,
    )


async def response(request: Request, viewer: Viewer, form: Form) -> Response:
    project_id = request.path_params["project_id"]
    response_id = request.path_params["response_id"]
    store = _store(request)
    stored = None
    if looks_like_response_id(response_id):
        stored = await store.get_response(project_id, response_id)
    if stored is None:
        raise NotFound(f"Response '{response_id[:100]}' not found.", code="response_not_found")

    async def input_items(after: str | None) -> ItemPage:
        found = await store.list_input_items(
            project_id, response_id, after=after, before=None, limit=100, order="asc"
        )
        if found is None:  # deleted meanwhile
            raise NotFound(f"Response '{response_id}' not found.", code="response_not_found")
        return found

    items, cut = await _all_items(input_items)
    return render.page(
        request,
        viewer,
        "response.html",
        project_id=project_id,
        response=stored,
        entries=transcript.transcript(items, stored.get("output") or []),
        cut=cut,
        live=stored.get("background") and stored["status"] in ("queued", "in_progress"),
    )


async def _all_items(
    pages: Callable[[str | None], Awaitable[ItemPage]],
) -> tuple[list[dict[str, Any]], bool]:
    """Items page after page, up to TRANSCRIPT_ITEMS; and whether some were left out."""
    items: list[dict[str, Any]] = []
    after = None
    while len(items) < TRANSCRIPT_ITEMS:
        found = await pages(after)
        items.extend(found.data)
        if not found.has_more:
            return items, False
        after = found.last_id
    return items, True


async def response_events(request: Request, viewer: Viewer, form: Form) -> Response:
    """A background response's events, replayed then followed live until it ends: what GET
    /admin/v1/projects/{id}/responses/{id}?stream=true answers (and the project's keys get
    from GET /v1/responses/{id}?stream=true). The response page's script reads it."""
    project_id = request.path_params["project_id"]
    response_id = request.path_params["response_id"]
    stored = None
    if looks_like_response_id(response_id):
        stored = await _store(request).get_response(project_id, response_id)
    if stored is None:
        raise NotFound(f"Response '{response_id[:100]}' not found.", code="response_not_found")
    return background.resume(request, stored)


async def conversations(request: Request, viewer: Viewer, form: Form) -> Response:
    project_id = request.path_params["project_id"]
    after = request.query_params.get("after") or None
    listed = await _admin(request).list_conversations(project_id, after, PAGE)
    older = "?" + urlencode({"after": listed["last_id"]}) if listed["has_more"] else None
    return render.page(
        request,
        viewer,
        "conversations.html",
        project_id=project_id,
        conversations=listed["data"],
        more=older,
    )


async def conversation(request: Request, viewer: Viewer, form: Form) -> Response:
    project_id = request.path_params["project_id"]
    conversation_id = request.path_params["conversation_id"]
    store: ConversationStore = request.app.state.conversations
    found = await store.get(project_id, conversation_id)

    async def pages(after: str | None) -> ItemPage:
        return await store.page(project_id, conversation_id, after=after, limit=100, order="asc")

    items, cut = await _all_items(pages)
    return render.page(
        request,
        viewer,
        "conversation.html",
        project_id=project_id,
        conversation=found,
        entries=transcript.conversation(items),
        cut=cut,
    )


async def audit(request: Request, viewer: Viewer, form: Form) -> Response:
    query = request.query_params
    filters = {name: query.get(name) or None for name in ("action", "actor", "target")}
    raw = query.get("after")
    after = int_or_none(raw)
    if raw is not None and (after is None or not 0 <= after < 2**62):
        raise InvalidRequest("Invalid 'after': expected an audit entry id.", param="after")
    listed = await _admin(request).audit(after, PAGE, **filters)
    older = None
    if listed["has_more"]:
        shown = {name: value for name, value in filters.items() if value}
        older = "?" + urlencode({**shown, "after": listed["last_id"]})
    return render.page(
        request, viewer, "audit.html", entries=listed["data"], filters=filters, more=older
    )
