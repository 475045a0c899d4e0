"""The admin API under /admin/v1, behind X-Admin-Key (see relay.api.auth): projects, keys,
limits and budgets (a project's or key's `policy`), a project's prompt templates, usage,
the audit log, and a project's stored responses (what the web console reads, relay.ui)."""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from relay.access.admin import MAX_PAGE, RESPONSE_STATUSES, Admin
from relay.access.listing import Cursor, ResponseSearch
from relay.access.usage import GROUPS
from relay.api import background
from relay.api import conversations as conversation_api
from relay.api.auth import AdminHandler, Endpoint, access, admin_endpoint
from relay.api.paging import (
    cursor,
    input_items,
    int_or_none,
    order,
    read_body,
    response_id_param,
    response_not_found,
)
from relay.api.paging import limit as item_limit
from relay.errors import InvalidRequest
from relay.ids import looks_like_response_id
from relay.models.policy import Policy
from relay.protocol import (
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    MAX_SESSION_ID,
    json_object,
    nul_field,
)
from relay.providers.registry import Deployment, Registry
from relay.storage.base import Store
from relay.storage.conversations import ConversationStore

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
    query = request.query_params
    return _json(
        await _admin(request).audit(
            after,
            _limit(request),
            action=query.get("action"),
            actor=query.get("actor"),
            target=query.get("target"),
        )
    )


async def project_spend(request: Request, actor: str) -> Response:
    """What a project has spent in each budget period now, against its budgets."""
    project = await _admin(request).get_project(request.path_params["project_id"])
    policy = Policy.model_validate(project["policy"])
    return _json(await access(request).ledger.standing("project", project["id"], policy))


async def key_spend(request: Request, actor: str) -> Response:
    """What a key has spent in each budget period now, against its budgets."""
    key = await _admin(request).get_key(request.path_params["key_id"])
    policy = Policy.model_validate(key["policy"])
    return _json(await access(request).ledger.standing("key", key["id"], policy))


def deployment_view(deployment: Deployment, now: float) -> dict[str, Any]:
    """A deployment and its health as this process has seen it (relay.providers.health)."""
    health = deployment.health
    if health.cooling_until == 0.0:
        state = "healthy"
    elif health.probing:
        state = "probing"
    elif now < health.cooling_until:
        state = "cooling"
    else:
        state = "probe_due"  # cooled down: the next request to it is the probe
    return {
        "object": "deployment",
        "route": deployment.route,
        "name": deployment.name,
        "provider": deployment.kind,
        "upstream_model": deployment.upstream_model,
        "state": state,
        "failures": health.failures,
        "cooling_for_s": round(max(0.0, health.cooling_until - now), 1)
        if state == "cooling"
        else 0,
        "latency_ms": None if health.latency_s is None else round(health.latency_s * 1000, 1),
        "tokens_per_s": None if health.tokens_per_s is None else round(health.tokens_per_s, 1),
    }


def deployments(request: Request) -> list[dict[str, Any]]:
    registry: Registry = request.app.state.engine.registry
    now = time.monotonic()
    return [deployment_view(deployment, now) for deployment in registry.deployments()]


async def list_deployments(request: Request, actor: str) -> Response:
    """Every deployment's health, as the process that answers has seen it (each process
    keeps its own: with --workers N, one worker's)."""
    return _json({"object": "list", "data": deployments(request)})


# The filters of a list of responses, as the query names them (`metadata` may repeat).
RESPONSE_FILTERS = (
    "status",
    "model",
    "start",
    "end",
    "session_id",
    "previous_response_id",
    "metadata",
    "text",
)
MAX_SEARCH_TEXT = 200


def _day_start(request: Request, name: str) -> int | None:
    """The first second of the UTC day a parameter names (YYYY-MM-DD; empty: none)."""
    day = request.query_params.get(name) or None
    if day is None:
        return None
    try:
        return calendar.timegm(time.strptime(day, "%Y-%m-%d"))
    except ValueError:
        raise InvalidRequest(
            f"Invalid '{name}': expected a day as YYYY-MM-DD.", param=name
        ) from None


def _metadata_pair(value: str) -> tuple[str, str]:
    key, equals, wanted = value.partition("=")
    if not equals or not key:
        raise InvalidRequest("Invalid 'metadata': expected key=value.", param="metadata")
    if len(key) > MAX_METADATA_KEY or len(wanted) > MAX_METADATA_VALUE:
        raise InvalidRequest(
            f"Invalid 'metadata': keys hold at most {MAX_METADATA_KEY} characters, values "
            f"{MAX_METADATA_VALUE}.",
            param="metadata",
        )
    return key, wanted


def response_search(request: Request) -> ResponseSearch:
    """The filters of a list of responses, each given once but `metadata`, all of which must
    hold: `status` (one of the response statuses), `model` (the route's name, as the response
    reports it), `start` and `end` (UTC days, inclusive, YYYY-MM-DD), `session_id` (as the
    request gave it, or its x-session-id header), `previous_response_id` (the responses that
    continue that one), `metadata` (key=value, exact; repeat it for several pairs), `text` (in
    the text of an input or output item, case aside)."""
    query = request.query_params

    def given(name: str) -> str | None:
        return query.get(name) or None

    status = given("status")
    if status is not None and status not in RESPONSE_STATUSES:
        raise InvalidRequest(
            f"Invalid 'status': expected one of {', '.join(RESPONSE_STATUSES)}.", param="status"
        )
    session_id = given("session_id")
    if session_id is not None and len(session_id) > MAX_SESSION_ID:
        raise InvalidRequest(
            f"Invalid 'session_id': at most {MAX_SESSION_ID} characters.", param="session_id"
        )
    previous = given("previous_response_id")
    if previous is not None and not looks_like_response_id(previous):
        raise InvalidRequest(
            "Invalid 'previous_response_id': expected a response id (resp_...).",
            param="previous_response_id",
        )
    pairs = [_metadata_pair(value) for value in query.getlist("metadata") if value]
    if len(pairs) > MAX_METADATA_PAIRS:
        raise InvalidRequest(
            f"Invalid 'metadata': at most {MAX_METADATA_PAIRS} pairs.", param="metadata"
        )
    text = given("text")
    if text is not None and len(text) > MAX_SEARCH_TEXT:
        raise InvalidRequest(f"Invalid 'text': at most {MAX_SEARCH_TEXT} characters.", param="text")
    end = _day_start(request, "end")
    return ResponseSearch(
        status=status,
        model=given("model"),
        start=_day_start(request, "start"),
        end=None if end is None else end + 86400,
        session_id=session_id,
        previous_response_id=previous,
        metadata=tuple(pairs),
        text=text,
    )


def list_cursor(request: Request) -> Cursor:
    """Where a page of a list starts: `after` an id of the list (the older ones), or `before`
    one (the newer ones)."""
    after, before = request.query_params.get("after"), request.query_params.get("before")
    if after is not None and before is not None:
        raise InvalidRequest("Give 'after' or 'before', not both.", param="before")
    return Cursor(after=after, before=before)


async def list_responses(request: Request, actor: str) -> Response:
    """A project's responses, each with its cost (this process's queued usage rows written
    first, so that a response's cost is there as soon as it ended)."""
    project_id = request.path_params["project_id"]
    search = response_search(request)
    await access(request).ledger.caught_up()
    listed = await _admin(request).list_responses(
        project_id, list_cursor(request), _limit(request), search
    )
    return _json(listed)


async def list_conversations(request: Request, actor: str) -> Response:
    project_id = request.path_params["project_id"]
    cursor = list_cursor(request)
    return _json(await _admin(request).list_conversations(project_id, cursor, _limit(request)))


def _conversations(request: Request) -> ConversationStore:
    conversations: ConversationStore = request.app.state.conversations
    return conversations


async def get_conversation(request: Request, actor: str) -> Response:
    """A project's conversation, as its keys read it (GET /v1/conversations/{id})."""
    project_id = request.path_params["project_id"]
    conversation_id = request.path_params["conversation_id"]
    return _json(await _conversations(request).get(project_id, conversation_id))


async def update_conversation(request: Request, actor: str) -> Response:
    """A project's conversation's metadata replaced, as POST /v1/conversations/{id} does for
    its keys; in the audit log (conversation.updated)."""
    found = await conversation_api.updated(request, request.path_params["project_id"])
    await _admin(request).note(actor, "conversation.updated", found["id"])
    return _json(found)


async def delete_conversation(request: Request, actor: str) -> Response:
    """A project's conversation deleted, as DELETE /v1/conversations/{id} does for its keys;
    in the audit log (conversation.deleted)."""
    gone = await conversation_api.deleted(request, request.path_params["project_id"])
    await _admin(request).note(actor, "conversation.deleted", gone["id"])
    return _json(gone)


async def list_conversation_items(request: Request, actor: str) -> Response:
    """A project's conversation's items, paged as GET /v1/conversations/{id}/items."""
    found = await _conversations(request).page(
        request.path_params["project_id"],
        request.path_params["conversation_id"],
        after=cursor(request, "after"),
        limit=item_limit(request),
        order="asc" if order(request) == "asc" else "desc",
    )
    return _json(found.as_list())


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def get_response(request: Request, actor: str) -> Response:
    """A project's stored response, as its project's keys read it (GET /v1/responses/{id});
    with stream=true, a background response's events (after `starting_after`), followed
    live until it ends."""
    response_id = response_id_param(request)
    stored = await _store(request).get_response(request.path_params["project_id"], response_id)
    if stored is None:
        raise response_not_found(response_id)
    if request.query_params.get("stream") == "true":
        return background.resume(request, stored)
    return _json(stored)


async def cancel_response(request: Request, actor: str) -> Response:
    """A project's queued or running background response cancelled, as POST
    /v1/responses/{id}/cancel does for its keys; in the audit log (response.cancel)."""
    project_id = request.path_params["project_id"]
    response_id = response_id_param(request)
    stored = await _store(request).get_response(project_id, response_id)
    if stored is None:
        raise response_not_found(response_id)
    answer = await background.cancel(request, project_id, stored)
    await _admin(request).note(actor, "response.cancel", response_id)
    return answer


async def list_input_items(request: Request, actor: str) -> Response:
    """A project's stored response's input items, paged as GET /v1/responses/{id}/input_items."""
    project = request.path_params["project_id"]
    return _json(await input_items(request, _store(request), project))


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
    ("/projects/{project_id}/spend", project_spend, "GET"),
    ("/keys/{key_id}/spend", key_spend, "GET"),
    ("/deployments", list_deployments, "GET"),
    ("/usage", usage, "GET"),
    ("/audit_log", audit_log, "GET"),
    ("/projects/{project_id}/responses", list_responses, "GET"),
    ("/projects/{project_id}/responses/{response_id}", get_response, "GET"),
    ("/projects/{project_id}/responses/{response_id}/input_items", list_input_items, "GET"),
    ("/projects/{project_id}/responses/{response_id}/cancel", cancel_response, "POST"),
    ("/projects/{project_id}/conversations", list_conversations, "GET"),
    ("/projects/{project_id}/conversations/{conversation_id}", get_conversation, "GET"),
    ("/projects/{project_id}/conversations/{conversation_id}", update_conversation, "POST"),
    ("/projects/{project_id}/conversations/{conversation_id}", delete_conversation, "DELETE"),
    (
        "/projects/{project_id}/conversations/{conversation_id}/items",
        list_conversation_items,
        "GET",
    ),
]


def routes(route: Callable[[str, Endpoint, str], BaseRoute]) -> list[BaseRoute]:
    return [
        route(PREFIX + path, admin_endpoint(handler), method) for path, handler, method in _ADMIN
    ]
