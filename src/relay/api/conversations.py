"""The Conversations API (`/conversations`), with OpenAI's shapes: a conversation object
(`id`, `object`, `created_at`, `metadata`), its items in order, paged like input items."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from relay.access.gate import Principal
from relay.api.paging import cursor, limit, order, read_body
from relay.engine.context import parse_items
from relay.errors import InvalidRequest
from relay.ids import looks_like_conversation_id, new_id
from relay.protocol import (
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    json_object,
)
from relay.storage.conversations import ConversationStore

MAX_ITEMS = 20  # per POST, as OpenAI allows


def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json")


def _store(request: Request) -> ConversationStore:
    found: ConversationStore = request.app.state.conversations
    return found


async def _body(request: Request, *known: str) -> dict[str, Any]:
    """The JSON body; a field it does not know is a 400, not silently ignored."""
    raw = await read_body(request)
    body = json_object(raw) if raw else {}
    unknown = sorted(set(body) - set(known))
    if unknown:
        raise InvalidRequest(f"Unknown parameter: '{unknown[0]}'.", param=unknown[0])
    return body


def _metadata(body: dict[str, Any]) -> dict[str, Any]:
    metadata = body.get("metadata")
    if metadata is None:
        return {}
    valid = isinstance(metadata, dict) and all(
        isinstance(key, str)
        and len(key) <= MAX_METADATA_KEY
        and isinstance(value, str)
        and len(value) <= MAX_METADATA_VALUE
        for key, value in metadata.items()
    )
    if not valid or len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(
            f"Invalid 'metadata': at most {MAX_METADATA_PAIRS} string keys ({MAX_METADATA_KEY}"
            f" characters) and string values ({MAX_METADATA_VALUE} characters).",
            param="metadata",
        )
    return dict(metadata)


def _items(body: dict[str, Any], required: bool) -> list[dict[str, Any]]:
    given = body.get("items")
    if given is None and not required:
        return []
    if not isinstance(given, list) or len(given) > MAX_ITEMS or (required and not given):
        raise InvalidRequest(
            f"Invalid 'items': expected a list of 1 to {MAX_ITEMS} input items.", param="items"
        )
    # The same items a response's input takes, normalised the same way (ids given).
    items = parse_items(given, "items")
    if any(item["type"] == "item_reference" for item in items):
        raise InvalidRequest("Item references cannot be added to a conversation.", param="items")
    return items


def _conversation_id(request: Request) -> str:
    found: str = request.path_params["conversation_id"]
    if not looks_like_conversation_id(found):
        raise InvalidRequest(
            f"Invalid 'conversation_id': '{found[:80]}'. Expected an ID that begins with 'conv_'.",
            param="conversation_id",
        )
    return found


async def create(request: Request, principal: Principal) -> Response:
    body = await _body(request, "items", "metadata")
    created = await _store(request).create(
        principal.project, new_id("conv"), _metadata(body), _items(body, required=False)
    )
    return _json(created)


async def retrieve(request: Request, principal: Principal) -> Response:
    return _json(await _store(request).get(principal.project, _conversation_id(request)))


async def update(request: Request, principal: Principal) -> Response:
    return _json(await updated(request, principal.project))


async def updated(request: Request, project_id: str) -> dict[str, Any]:
    """The conversation of the path, its metadata replaced by the body's: for the project's
    keys, and for the admin API (relay.api.admin)."""
    body = await _body(request, "metadata")
    if "metadata" not in body:
        raise InvalidRequest("Missing required parameter: 'metadata'.", param="metadata")
    return await replace_metadata(request, project_id, body)


async def replace_metadata(
    request: Request, project_id: str, body: dict[str, Any]
) -> dict[str, Any]:
    """`body`'s metadata checked as the API checks it, then stored (the console's form, too)."""
    return await _store(request).update_metadata(
        project_id, _conversation_id(request), _metadata(body)
    )


async def delete(request: Request, principal: Principal) -> Response:
    return _json(await deleted(request, principal.project))


async def deleted(request: Request, project_id: str) -> dict[str, Any]:
    """The conversation of the path deleted (its items go with it), and what says so."""
    conversation = _conversation_id(request)
    await _store(request).delete(project_id, conversation)
    return {"id": conversation, "object": "conversation.deleted", "deleted": True}


async def list_items(request: Request, principal: Principal) -> Response:
    page = await _store(request).page(
        principal.project,
        _conversation_id(request),
        after=cursor(request, "after"),
        limit=limit(request),
        order="asc" if order(request) == "asc" else "desc",
    )
    return _json(page.as_list())


async def add_items(request: Request, principal: Principal) -> Response:
    items = _items(await _body(request, "items"), required=True)
    await _store(request).add_items(principal.project, _conversation_id(request), items)
    return _json(
        {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"],
            "last_id": items[-1]["id"],
            "has_more": False,
        }
    )


async def get_item(request: Request, principal: Principal) -> Response:
    item_id = request.path_params["item_id"]
    return _json(
        await _store(request).get_item(principal.project, _conversation_id(request), item_id)
    )


async def delete_item(request: Request, principal: Principal) -> Response:
    item_id = request.path_params["item_id"]
    store = _store(request)
    return _json(await store.delete_item(principal.project, _conversation_id(request), item_id))
