"""What the model sees: the previous_response_id chain, then this request's input.

Input items are validated, normalised (string content becomes parts, every item gets an id and
a status) and stored in that form, so input_items and later turns read back what was meant.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from relay.engine.history import HistoryCache
from relay.errors import InvalidRequest
from relay.ids import new_id
from relay.protocol import CreateResponse, invalid_request, parse_item
from relay.providers.base import History
from relay.storage.base import Store

_ID_PREFIX = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
    "compaction": "cmp",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "tool_search_call": "tsc",
    "tool_search_output": "tso",
    "mcp_approval_response": "mcpa",
}


def _normalise(item: dict[str, Any]) -> dict[str, Any]:
    kind = item["type"]
    if kind == "message" and isinstance(item["content"], str):
        part_type = "output_text" if item["role"] == "assistant" else "input_text"
        part: dict[str, Any] = {"type": part_type, "text": item["content"]}
        if part_type == "output_text":
            part["annotations"] = []
        item["content"] = [part]
    item.setdefault("status", "completed")
    if not item.get("id"):
        item["id"] = new_id(_ID_PREFIX[kind])
    return item


def parse_input(request: CreateResponse) -> list[dict[str, Any]]:
    """This request's input as normalised items (item_reference items still unresolved)."""
    raw = request.input
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    return parse_items(raw, "input")


def parse_items(raw: list[Any], field: str) -> list[dict[str, Any]]:
    """Input items as normalised items; errors name them as the client's `field` does
    (`input[0]` of a response, `items[0]` of a conversation)."""
    items = []
    for index, entry in enumerate(raw):
        try:
            model = parse_item(entry)
        except ValidationError as error:
            raise invalid_request(error, entry, f"{field}[{index}]") from None
        except ValueError as error:
            raise InvalidRequest(str(error), param=f"{field}[{index}]") from None
        dumped = model.model_dump(mode="json", exclude_none=True, by_alias=True)
        items.append(dumped if dumped["type"] == "item_reference" else _normalise(dumped))
    return items


async def resolve_references(
    store: Store, tenant: str, items: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    wanted = [item["id"] for item in items if item["type"] == "item_reference"]
    if not wanted:
        return items
    found = await store.get_items(tenant, wanted)
    resolved = []
    for index, item in enumerate(items):
        if item["type"] != "item_reference":
            resolved.append(item)
        elif item["id"] in found:
            resolved.append(found[item["id"]])
        else:
            raise InvalidRequest(
                f"Item with id '{item['id']}' not found.",
                param=f"input[{index}].id",
                code="item_not_found",
            )
    return resolved


async def load_history(
    store: Store, cache: HistoryCache, tenant: str, request: CreateResponse
) -> History | None:
    """The chain that previous_response_id continues: from memory when this process saw it
    last (after asking the store whether it is still visible), else from the store."""
    previous = request.previous_response_id
    if previous is None:
        return None
    history = cache.get(tenant, previous)
    if history is not None:
        if await store.is_visible(tenant, previous):
            return history
        cache.discard(tenant, previous)
    else:
        items = await store.load_context(tenant, previous)
        if items is not None:
            return History(items)
    raise InvalidRequest(
        f"Previous response with id '{previous}' not found.",
        param="previous_response_id",
        code="previous_response_not_found",
    )


_NO_CALLS: frozenset[str] = frozenset()


_CALLS = ("function_call", "custom_tool_call")
_OUTPUTS = ("function_call_output", "custom_tool_call_output")


def _with_calls(calls: frozenset[str], items: list[dict[str, Any]]) -> frozenset[str]:
    return calls.union(item["call_id"] for item in items if item["type"] in _CALLS)


def check_tool_outputs(history: History | None, items: list[dict[str, Any]]) -> None:
    """Every function_call_output must answer a function_call the model made in context (the
    history's calls are gathered once per history, see History.derive)."""
    earlier = _NO_CALLS if history is None else history.derive("calls", _with_calls, _NO_CALLS)
    calls: set[str] = set()
    for index, item in enumerate(items):
        if item["type"] in _CALLS:
            calls.add(item["call_id"])
        elif (
            item["type"] in _OUTPUTS
            and item["call_id"] not in calls
            and item["call_id"] not in earlier
        ):
            raise InvalidRequest(
                f"No tool call found for function call output with call_id {item['call_id']}.",
                param=f"input[{index}].call_id",
            )


def drop_oldest_turn(items: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The context without its oldest turn, for truncation "auto": everything before the
    second user message goes, except system and developer messages. Whole turns go, so a
    function_call never loses its output. None when a single turn is left."""
    users = [
        index
        for index, item in enumerate(items)
        if item["type"] == "message" and item["role"] == "user"
    ]
    if len(users) < 2:
        return None
    kept = [
        item
        for item in items[: users[1]]
        if item["type"] == "message" and item["role"] in ("system", "developer")
    ]
    return kept + items[users[1] :]
