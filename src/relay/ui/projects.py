"""The console's pages of projects and keys: a project's policy, spend and keys, a key's
settings and spend, archiving and revoking. Each runs behind `guard.console_page`
(relay.ui.routes; changes are for admins' sessions only) and calls only the operations the
admin API documents (relay.access.admin, the spend report). A change redirects (POST, then
GET), so a reload never repeats it; the one exception is a new key, shown on the answer to
its POST and nowhere else. A form's policy or key settings are sent as the changes they
make, so that the audit log says what changed."""

from __future__ import annotations

import calendar
import time
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from relay.api.auth import access
from relay.api.paging import int_or_none
from relay.errors import InvalidRequest, NotFound
from relay.models.policy import NO_POLICY, Policy
from relay.ui import render
from relay.ui.guard import Form, Viewer
from relay.ui.guard import admin_api as _admin

PAGE = 50  # projects and keys a list shows at once
_WHOLE_LIMITS = ("rpm", "tpm", "max_concurrent")
_USD_LIMITS = ("daily_budget_usd", "monthly_budget_usd", "credit_usd")


USAGE_DAYS = 30  # a config file's tenant's usage: over the last 30 days


def config_tenants(request: Request) -> list[str]:
    """The projects the config file's keys act for (each key's tenant and `projects`)."""
    keys = access(request).keys.config_keys.values()
    return sorted({project for record in keys for project in record.projects})


async def _config_only(request: Request) -> list[dict[str, Any]]:
    """The config file's tenants that have no project row (one made with the tenant's id is
    listed with the others): their usage over USAGE_DAYS and their spend, read-only."""
    gate = access(request)
    tenants = [
        tenant for tenant in config_tenants(request) if await gate.keys.project(tenant) is None
    ]
    if not tenants:
        return []
    start = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400 * (USAGE_DAYS - 1)))
    usage = await gate.ledger.report(["project"], project=None, key=None, start=start, end=None)
    by_project = {row["project"]: row for row in usage}
    return [
        {
            "id": tenant,
            "usage": by_project.get(tenant),
            "standing": await gate.ledger.standing("project", tenant, NO_POLICY),
        }
        for tenant in tenants
    ]


async def projects(request: Request, viewer: Viewer, form: Form) -> Response:
    after = request.query_params.get("after") or None
    listed = await _admin(request).list_projects(after, PAGE)
    older = f"?{urlencode({'after': listed['last_id']})}" if listed["has_more"] else None
    return render.page(
        request,
        viewer,
        "projects.html",
        projects=listed["data"],
        more=older,
        configured=await _config_only(request) if after is None else [],
        tenants=config_tenants(request),
        usage_days=USAGE_DAYS,
    )


async def create_project(request: Request, viewer: Viewer, form: Form) -> Response:
    body = {"name": form.get("name", "").strip(), "id": form.get("id", "").strip() or None}
    created = await _admin(request).create_project(viewer.actor, body)
    return render.see_other(render.project_path(created["id"]))


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
        if viewer.admin is not None and project_id not in config_tenants(request):
            raise
        found = None  # a config file's tenant: its keys need no project row
    if viewer.admin is not None:
        keys = (await admin.list_keys(project_id, None, PAGE))["data"]
    else:
        assert viewer.principal is not None
        key = viewer.principal.key
        keys = [await admin.get_key(key.key_id)] if key.in_database else []
    # A config file's tenant has no budgets of its own: its spend is shown against none.
    policy = found["policy"] if found is not None else {}
    standings = [await _standing(request, "project", project_id, policy)]
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
    return render.see_other(render.project_path(project_id, "?saved=policy"))


async def archive_project(request: Request, viewer: Viewer, form: Form) -> Response:
    """Archived, not deleted: its responses and usage stay; its keys stop working."""
    project_id = request.path_params["project_id"]
    await _admin(request).archive_project(viewer.actor, project_id)
    access(request).keys.forget()
    return render.see_other(render.project_path(project_id, "?saved=archived"))


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
    return render.see_other(
        render.project_path(current["project_id"], f"/keys/{current['id']}?saved=key")
    )


async def revoke_key(request: Request, viewer: Viewer, form: Form) -> Response:
    found = await _project_key(request)
    await _admin(request).revoke_key(viewer.actor, found["id"])
    access(request).keys.forget()
    return render.see_other(render.project_path(found["project_id"], "?saved=revoked"))
