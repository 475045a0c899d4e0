"""The console's pages that read what Relay did: the overview, a project's responses (and a
running one's events) and conversations, the audit log (projects and keys: relay.ui.projects).
Each runs behind `guard.console_page` (relay.ui.routes), receives its viewer, and calls only
what the admin API documents: the usage report and the deployments' health, the lists of
relay.access.admin, the stores' reads of a response or conversation, the resume stream."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from relay.access.admin import PROJECT_ID, RESPONSE_STATUSES
from relay.access.listing import SEARCH_WINDOW, Cursor, ResponseSearch
from relay.api import background
from relay.api import conversations as conversation_api
from relay.api.admin import RESPONSE_FILTERS, deployments, list_cursor, response_search
from relay.api.auth import access
from relay.api.paging import int_or_none
from relay.errors import InvalidRequest, NotFound
from relay.ids import looks_like_response_id
from relay.storage.base import ItemPage, Store
from relay.storage.conversations import ConversationStore
from relay.ui import charts, render, transcript
from relay.ui.guard import ROOT, Form, Viewer, admin_api

PAGE = 50  # rows a list shows at once
TRANSCRIPT_ITEMS = 1000  # items a transcript shows at most
CONTINUATIONS = 20  # responses continuing one that its transcript links to


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def home(request: Request, viewer: Viewer, form: Form) -> Response:
    """The viewer's landing page; with `project` (the project picker of a key allowed several),
    that project's overview, if the viewer may see it (else the 404 an unknown one gets)."""
    picked = request.query_params.get("project")
    if picked:
        allowed = viewer.principal is None or picked in dict(viewer.projects)
        if not (allowed and PROJECT_ID.fullmatch(picked)):
            raise NotFound(f"Project '{picked[:100]}' not found.", code="project_not_found")
        return render.see_other(render.project_path(picked, "/overview"))
    if viewer.principal is not None:
        return render.see_other(render.project_path(viewer.principal.project, "/overview"))
    return render.see_other(ROOT + "/overview")


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _window(request: Request) -> tuple[str, charts.Bucket]:
    """The overview's window (`window`, one of charts.WINDOWS) and bucket (`by`); without
    them, the last 14 days by day (or 48 hours, asked by hour)."""
    query = request.query_params
    by = query.get("by")
    if by not in (None, "day", "hour"):
        raise InvalidRequest("Invalid 'by': expected 'day' or 'hour'.", param="by")
    window = query.get("window") or ("48h" if by == "hour" else "14d")
    if window not in charts.WINDOWS:
        expected = ", ".join(f"'{name}'" for name in charts.WINDOWS)
        raise InvalidRequest(f"Invalid 'window': expected one of {expected}.", param="window")
    hours = charts.WINDOWS[window]
    bucket: charts.Bucket = "hour" if by == "hour" or (by is None and hours <= 48) else "day"
    if bucket == "hour" and hours > charts.MOST_HOURS:
        raise InvalidRequest(
            f"Invalid 'by': 'hour' goes up to a window of {charts.MOST_HOURS // 24} days.",
            param="by",
        )
    return window, bucket


async def overview(request: Request, viewer: Viewer, form: Form) -> Response:
    """Requests (by status), tokens and cost over the window the viewer picks, the same
    window by model, deployment and project, and each deployment's health: the usage report
    of GET /admin/v1/usage and GET /admin/v1/deployments. Every project's (an admin's page),
    or the one of the path."""
    project_id = request.path_params.get("project_id")
    window, by = _window(request)
    names = charts.buckets(by, charts.WINDOWS[window], time.time())
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
        charts.stacked("Cost", names, {"cost": cost}, render.dollars),
    ]
    breakdowns = [("Model", await report("model")), ("Deployment", await report("deployment"))]
    if project_id is None:
        breakdowns.append(("Project", await report("project")))
    projects = [project_id] if project_id else [row["project"] for row in breakdowns[-1][1]]
    return render.page(
        request,
        viewer,
        "overview.html",
        project_id=project_id,
        project_names=await admin_api(request).project_names(projects),
        by=by,
        window=window,
        windows=charts.WINDOWS,
        most_hours=charts.MOST_HOURS,
        start=start,
        charts=shown,
        breakdowns=breakdowns,
        # Routes serve every project: their health is shown where every project's usage is.
        deployments=deployments(request) if project_id is None else [],
    )


def _pages(
    listed: dict[str, Any], cursor: Cursor, kept: list[tuple[str, str]]
) -> tuple[str | None, str | None]:
    """The links to the newer and the older page of a list, each keeping its filters."""

    def link(*cursor_param: tuple[str, str]) -> str:
        return "?" + urlencode([*kept, *cursor_param])

    first, last = listed["first_id"], listed["last_id"]
    newer = older = None
    if cursor.before is not None:  # this page went newer
        if listed["has_more"] and first:
            newer = link(("before", first))
        # Nothing newer than the cursor: the older page is the first one.
        older = link(("after", last)) if last else link()
    else:
        if cursor.after is not None:
            newer = link(("before", first or cursor.after))
        if listed["has_more"] and last:
            older = link(("after", last))
    return newer, older


async def responses(request: Request, viewer: Viewer, form: Form) -> Response:
    """A project's responses, searched with the filters of GET
    /admin/v1/projects/{id}/responses."""
    project_id = request.path_params["project_id"]
    search = response_search(request)
    cursor = list_cursor(request)
    await access(request).ledger.caught_up()  # as the admin API: each cost, up to date
    listed = await admin_api(request).list_responses(project_id, cursor, PAGE, search)
    kept = [
        (name, value)
        for name, value in request.query_params.multi_items()
        if name in RESPONSE_FILTERS and value
    ]
    newer, older = _pages(listed, cursor, kept)
    return render.page(
        request,
        viewer,
        "responses.html",
        project_id=project_id,
        responses=listed["data"],
        filters={name: request.query_params.get(name) or "" for name in RESPONSE_FILTERS},
        filtered=bool(kept),
        statuses=RESPONSE_STATUSES,
        window=SEARCH_WINDOW,
        newer=newer,
        older=older,
    )


async def response(request: Request, viewer: Viewer, form: Form) -> Response:
    project_id = request.path_params["project_id"]
    response_id = request.path_params["response_id"]
    store = _store(request)
    admin = admin_api(request)
    stored = await _stored(request, project_id, response_id)

    async def input_items(after: str | None) -> ItemPage:
        found = await store.list_input_items(
            project_id, response_id, after=after, before=None, limit=100, order="asc"
        )
        if found is None:  # deleted meanwhile
            raise NotFound(f"Response '{response_id}' not found.", code="response_not_found")
        return found

    items, cut = await _all_items(input_items)
    await access(request).ledger.caught_up()
    cost = await admin.response_cost(project_id, response_id)
    # The responses that continue this one (the chain forward), newest first.
    continued = await admin.list_responses(
        project_id, Cursor(), CONTINUATIONS, ResponseSearch(previous_response_id=response_id)
    )
    return render.page(
        request,
        viewer,
        "response.html",
        project_id=project_id,
        response=stored,
        cost_usd=None if cost is None else cost / 1e9,
        continued=continued,
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


async def cancel_response(request: Request, viewer: Viewer, form: Form) -> Response:
    """Cancel a queued or running background response: what POST /v1/responses/{id}/cancel
    does for the project's keys (a project key's session may too), and POST
    /admin/v1/projects/{id}/responses/{id}/cancel for an admin (in the audit log)."""
    project_id = request.path_params["project_id"]
    stored = await _stored(request, project_id, request.path_params["response_id"])
    await background.cancel(request, project_id, stored)
    if viewer.admin is not None:
        await admin_api(request).note(viewer.actor, "response.cancel", stored["id"])
    return render.see_other(render.project_path(project_id, f"/responses/{stored['id']}"))


async def _stored(request: Request, project_id: str, response_id: str) -> dict[str, Any]:
    stored = None
    if looks_like_response_id(response_id):
        stored = await _store(request).get_response(project_id, response_id)
    if stored is None:
        raise NotFound(f"Response '{response_id[:100]}' not found.", code="response_not_found")
    return stored


async def response_events(request: Request, viewer: Viewer, form: Form) -> Response:
    """A background response's events, replayed then followed live until it ends: what GET
    /admin/v1/projects/{id}/responses/{id}?stream=true answers (and the project's keys get
    from GET /v1/responses/{id}?stream=true). The response page's script reads it."""
    project_id = request.path_params["project_id"]
    stored = await _stored(request, project_id, request.path_params["response_id"])
    return background.resume(request, stored)


async def conversations(request: Request, viewer: Viewer, form: Form) -> Response:
    project_id = request.path_params["project_id"]
    cursor = list_cursor(request)
    listed = await admin_api(request).list_conversations(project_id, cursor, PAGE)
    newer, older = _pages(listed, cursor, [])
    return render.page(
        request,
        viewer,
        "conversations.html",
        project_id=project_id,
        conversations=listed["data"],
        newer=newer,
        older=older,
        saved=request.query_params.get("saved"),
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
        saved=request.query_params.get("saved"),
        lines_hold_metadata=_lines_hold(found["metadata"]),
    )


def _lines_hold(metadata: dict[str, str]) -> bool:
    """Whether `metadata` survives the form's `name: value` lines unchanged: a name with a
    colon, or a line break or spaces at either end of either, would be changed by a save."""
    return all(
        ":" not in name
        and name == name.strip()
        and value == value.strip()
        and not any(character in name + value for character in "\r\n")
        for name, value in metadata.items()
    )


def _metadata_lines(text: str) -> dict[str, str]:
    """The metadata form's text, a `name: value` per line (an empty one skipped)."""
    metadata = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise InvalidRequest(
                f"Invalid 'metadata': line {number} is not 'name: value'.", param="metadata"
            )
        metadata[name.strip()] = value.strip()
    return metadata


async def update_conversation(request: Request, viewer: Viewer, form: Form) -> Response:
    """Replace a conversation's metadata: what POST /v1/conversations/{id} does for the
    project's keys (a project key's session may too), and POST /admin/v1/projects/{id}/
    conversations/{id} for an admin (in the audit log), with the same checks."""
    project_id = request.path_params["project_id"]
    body = {"metadata": _metadata_lines(form.get("metadata", ""))}
    found = await conversation_api.replace_metadata(request, project_id, body)
    if viewer.admin is not None:
        await admin_api(request).note(viewer.actor, "conversation.updated", found["id"])
    return render.see_other(
        render.project_path(project_id, f"/conversations/{found['id']}?saved=metadata")
    )


async def delete_conversation(request: Request, viewer: Viewer, form: Form) -> Response:
    """Delete a conversation, as DELETE /v1/conversations/{id} (or the admin API's) does."""
    project_id = request.path_params["project_id"]
    gone = await conversation_api.deleted(request, project_id)
    if viewer.admin is not None:
        await admin_api(request).note(viewer.actor, "conversation.deleted", gone["id"])
    return render.see_other(render.project_path(project_id, "/conversations?saved=deleted"))


async def audit(request: Request, viewer: Viewer, form: Form) -> Response:
    query = request.query_params
    filters = {name: query.get(name) or None for name in ("action", "actor", "target")}
    raw = query.get("after")
    after = int_or_none(raw)
    if raw is not None and (after is None or not 0 <= after < 2**62):
        raise InvalidRequest("Invalid 'after': expected an audit entry id.", param="after")
    listed = await admin_api(request).audit(after, PAGE, **filters)
    older = None
    if listed["has_more"]:
        shown = {name: value for name, value in filters.items() if value}
        older = "?" + urlencode({**shown, "after": listed["last_id"]})
    return render.page(
        request, viewer, "audit.html", entries=listed["data"], filters=filters, more=older
    )
