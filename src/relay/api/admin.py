"""The admin API under /admin/v1, behind X-Admin-Key (see relay.api.auth): projects, keys,
limits and budgets (a project's or key's `policy`), a project's prompt templates, usage, and
the audit log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from relay.access.admin import MAX_PAGE, Admin
from relay.access.usage import GROUPS
from relay.api.auth import AdminHandler, Endpoint, access, admin_endpoint
from relay.api.paging import int_or_none, read_body
from relay.errors import InvalidRequest
from relay.protocol import json_object, nul_field

PREFIX = "/admin/v1"
DEFAULT_PAGE = 20


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _admin(request: Request) -> Admin:
    admin: Admin = request.app.state.admin
    return admin


async def _body(request: Request) -> dict[str, Any]:
    """The JSON body. Admin bodies hold names, ids and model names, any of which may become
    a column: a NUL character anywhere in one is a 400 naming the field."""
    body = json_object(await read_body(request) or b"{}")
    field = nul_field(body)
    if field is not None:
        raise InvalidRequest(f"Invalid '{field}': it contains a NUL character.", param=field)
    return body


def _limit(request: Request) -> int:
    value = int_or_none(request.query_params.get("limit", str(DEFAULT_PAGE)))
    if value is None or not 1 <= value <= MAX_PAGE:
        raise InvalidRequest(
            f"Invalid 'limit': expected an integer from 1 to {MAX_PAGE}.", param="limit"
        )
    return value


def _day(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is not None and (len(value) != 10 or value[4] != "-" or value[7] != "-"):
        raise InvalidRequest(f"Invalid '{name}': expected a day as YYYY-MM-DD.", param=name)
    return value


async def create_project(request: Request, actor: str) -> Response:
    return _json(await _admin(request).create_project(actor, await _body(request)), 201)


async def list_projects(request: Request, actor: str) -> Response:
    after = request.query_params.get("after")
    return _json(await _admin(request).list_projects(after, _limit(request)))


async def get_project(request: Request, actor: str) -> Response:
    return _json(await _admin(request).get_project(request.path_params["project_id"]))


def _changed(request: Request, result: dict[str, Any]) -> Response:
    """The answer to a change of a project or key: this process forgets what it cached of
    them at once (other instances within key_cache_s)."""
    access(request).keys.forget()
    return _json(result)


async def update_project(request: Request, actor: str) -> Response:
    project_id = request.path_params["project_id"]
    return _changed(
        request, await _admin(request).update_project(actor, project_id, await _body(request))
    )


async def archive_project(request: Request, actor: str) -> Response:
    project_id = request.path_params["project_id"]
    return _changed(request, await _admin(request).archive_project(actor, project_id))


async def create_key(request: Request, actor: str) -> Response:
    return _json(await _admin(request).create_key(actor, await _body(request)), 201)


async def list_keys(request: Request, actor: str) -> Response:
    project = request.query_params.get("project_id")
    after = request.query_params.get("after")
    return _json(await _admin(request).list_keys(project, after, _limit(request)))


async def get_key(request: Request, actor: str) -> Response:
    return _json(await _admin(request).get_key(request.path_params["key_id"]))


async def update_key(request: Request, actor: str) -> Response:
    key_id = request.path_params["key_id"]
    return _changed(request, await _admin(request).update_key(actor, key_id, await _body(request)))


async def revoke_key(request: Request, actor: str) -> Response:
    key_id = request.path_params["key_id"]
    return _changed(request, await _admin(request).revoke_key(actor, key_id))


async def create_prompt(request: Request, actor: str) -> Response:
    project_id = request.path_params["project_id"]
    created = await _admin(request).create_prompt(actor, project_id, await _body(request))
    return _json(created, 201)


async def list_prompts(request: Request, actor: str) -> Response:
    project_id = request.path_params["project_id"]
    after = request.query_params.get("after")
    return _json(await _admin(request).list_prompts(project_id, after, _limit(request)))


async def get_prompt(request: Request, actor: str) -> Response:
    """The latest version, or the one `version` names."""
    project_id, prompt_id = request.path_params["project_id"], request.path_params["prompt_id"]
    version = request.query_params.get("version")
    return _json(await _admin(request).get_prompt(project_id, prompt_id, version))


def _prompt_changed(request: Request, result: dict[str, Any], status: int = 200) -> Response:
    """The answer to a change of a template's latest version or state: this process forgets
    what it trusted of them at once (other instances within key_cache_s)."""
    request.app.state.prompt_templates.forget()
    return _json(result, status)


async def add_prompt_version(request: Request, actor: str) -> Response:
    project_id, prompt_id = request.path_params["project_id"], request.path_params["prompt_id"]
    admin, body = _admin(request), await _body(request)
    added = await admin.add_prompt_version(actor, project_id, prompt_id, body)
    return _prompt_changed(request, added, 201)


async def archive_prompt(request: Request, actor: str) -> Response:
    project_id, prompt_id = request.path_params["project_id"], request.path_params["prompt_id"]
    archived = await _admin(request).archive_prompt(actor, project_id, prompt_id)
    return _prompt_changed(request, archived)


async def usage(request: Request, actor: str) -> Response:
    """Usage summed by `group_by` (repeat it, or comma-separate: day, model, route,
    deployment, key, project), filtered by project_id, key_id, start and end (days,
    inclusive)."""
    group_by = [
        name
        for value in request.query_params.getlist("group_by") or ["day"]
        for name in value.split(",")
        if name
    ]
    unknown = [name for name in group_by if name not in GROUPS]
    if unknown or not group_by:
        raise InvalidRequest(
            f"Invalid 'group_by': expected some of {', '.join(GROUPS)}.", param="group_by"
        )
    report = await access(request).ledger.report(
        list(dict.fromkeys(group_by)),
        project=request.query_params.get("project_id"),
        key=request.query_params.get("key_id"),
        start=_day(request, "start"),
        end=_day(request, "end"),
    )
    return _json({"object": "usage.report", "group_by": group_by, "data": report})


async def audit_log(request: Request, actor: str) -> Response:
    raw = request.query_params.get("after")
    after = int_or_none(raw)
    if raw is not None and (after is None or not 0 <= after < 2**62):
        raise InvalidRequest("Invalid 'after': expected an audit entry id.", param="after")
    return _json(await _admin(request).audit(after, _limit(request)))


_ADMIN: list[tuple[str, AdminHandler, str]] = [
    ("/projects", create_project, "POST"),
    ("/projects", list_projects, "GET"),
    ("/projects/{project_id}", get_project, "GET"),
    ("/projects/{project_id}", update_project, "POST"),
    ("/projects/{project_id}", archive_project, "DELETE"),
    ("/keys", create_key, "POST"),
    ("/keys", list_keys, "GET"),
    ("/keys/{key_id}", get_key, "GET"),
    ("/keys/{key_id}", update_key, "POST"),
    ("/keys/{key_id}", revoke_key, "DELETE"),
    ("/projects/{project_id}/prompts", create_prompt, "POST"),
    ("/projects/{project_id}/prompts", list_prompts, "GET"),
    ("/projects/{project_id}/prompts/{prompt_id}", get_prompt, "GET"),
    ("/projects/{project_id}/prompts/{prompt_id}/versions", add_prompt_version, "POST"),
    ("/projects/{project_id}/prompts/{prompt_id}", archive_prompt, "DELETE"),
    ("/usage", usage, "GET"),
    ("/audit_log", audit_log, "GET"),
]


def routes(route: Callable[[str, Endpoint, str], BaseRoute]) -> list[BaseRoute]:
    return [
        route(PREFIX + path, admin_endpoint(handler), method) for path, handler, method in _ADMIN
    ]
