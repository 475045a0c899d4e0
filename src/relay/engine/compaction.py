"""Compaction: a context made shorter by the route's model, and the `compaction` items that
carry the result, which clients give back as input.

POST /responses/compact answers a window: the context's user messages (the most recent ones,
within KEPT_USER_CHARS) and one compaction item whose `encrypted_content` seals the model's
summary of everything (`relay.sealing`). Given back, a compaction item is unsealed (a tampered,
foreign or other tenant's one is a 400) and reaches the upstream, where it stands, as an
assistant message holding the summary; what is stored is the item as the client sent it.

Compaction inside create (`context_management`) makes one compaction item that seals the whole
window: the summary, the user messages kept before it and the items after it (the calls this
request's input answers, and that input). From then on the upstream reads the context from the
newest such item: the window, then what came after the item (`render`). So a chain continued
with previous_response_id, a conversation, or a client replaying its items from that item on
all read the same short context, whatever came before it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay.ids import new_id
from relay.providers.base import History
from relay.sealing import Sealer

KIND = "compaction"
# Instructions for the summarising turn. Most long contexts are agents at work (a coding agent
# reading files and running commands), so the summary is asked for in the sections such an
# agent needs to go on without the transcript.
PROMPT = (
    "You compact a conversation so that it can go on in a much shorter context: the summary "
    "you write replaces everything before it. Keep whatever the work still needs; drop "
    "pleasantries, repetition and what has been superseded. Write only the summary, under "
    "these headings (leave a heading out when it has nothing):\n\n"
    "Goal: what the user wants, in their words where it matters, with every constraint and "
    "preference they stated.\n"
    "Decisions: what was decided or agreed, and why, where the reason will matter again.\n"
    "Files and state: each file, resource or system touched, by exact path or name, and what "
    "was done to it or learned about it (functions, settings, errors seen).\n"
    "Facts: identifiers, names, numbers, versions, URLs, commands and their results, tool "
    "outputs that may be needed again, quoted exactly.\n"
    "Open work: what remains to do, what was about to happen next, questions waiting for an "
    "answer, and tool results still awaited."
)
REQUEST = "Summarise the conversation so far, as instructed."
SUMMARY_HEADING = "Summary of the conversation so far:\n"
KEPT_USER_CHARS = 20_000
# The threshold of a context_management entry that gives none, in tokens.
DEFAULT_THRESHOLD = 100_000


def seal(sealer: Sealer, tenant: str, summary: str) -> dict[str, Any]:
    """The compaction item carrying `summary`."""
    sealed = sealer.seal(tenant, KIND, {"summary": summary})
    return {"type": KIND, "id": new_id("cmp"), "encrypted_content": sealed}


def kept_user_messages(
    context: list[dict[str, Any]], budget: int = KEPT_USER_CHARS, at_least: int = 1
) -> list[dict[str, Any]]:
    """The most recent user messages, in order, within `budget` characters of text (at least
    `at_least` of them)."""
    kept: list[dict[str, Any]] = []
    size = 0
    for item in reversed(context):
        if item["type"] != "message" or item["role"] != "user":
            continue
        text = sum(len(part.get("text") or "") for part in item["content"])
        if len(kept) >= at_least and size + text > budget:
            break
        kept.append(item)
        size += text
    return kept[::-1]


def expand(
    items: list[dict[str, Any]], sealer: Sealer, tenant: str, param: str
) -> list[dict[str, Any]]:
    """`items` with each compaction item replaced by the summary it seals, as an assistant
    message; the same list when there is none."""
    if not any(item["type"] == KIND for item in items):
        return items
    expanded = []
    for index, item in enumerate(items):
        if item["type"] != KIND:
            expanded.append(item)
            continue
        where = f"{param}[{index}].encrypted_content" if param == "input" else param
        summary = sealer.unseal(tenant, KIND, item["encrypted_content"], where)["summary"]
        expanded.append(_summary_message(item["id"], summary))
    return expanded


def _summary_message(item_id: str, summary: str) -> dict[str, Any]:
    return {
        "type": "message",
        "role": "assistant",
        "id": item_id,
        "status": "completed",
        "content": [{"type": "output_text", "text": SUMMARY_HEADING + summary, "annotations": []}],
    }


def _any_compaction(seen: bool, items: list[dict[str, Any]]) -> bool:
    return seen or any(item["type"] == KIND for item in items)


def expand_history(history: History | None, sealer: Sealer, tenant: str) -> History | None:
    """The chain as the upstream sees it: the same history unless it holds compaction items
    (clients start a new chain from a compacted window; compaction inside create leaves one
    in the chain), else from its newest window on, expanded."""
    if history is None or not history.derive(KIND, _any_compaction, False):
        return history
    items = history.items
    _, at = history.derive(f"{KIND} window", _window_finder(sealer, tenant), (0, -1))
    if at >= 0:
        where = "previous_response_id"
        items = [*_window(items[at], sealer, tenant, where), *items[at + 1 :]]
    return History(expand(items, sealer, tenant, "previous_response_id"))


def _window_finder(
    sealer: Sealer, tenant: str
) -> Callable[[tuple[int, int], list[dict[str, Any]]], tuple[int, int]]:
    """For History.derive: (items seen, where the newest window is among them, -1: none)."""

    def extend(found: tuple[int, int], items: list[dict[str, Any]]) -> tuple[int, int]:
        seen, at = found
        newest = _newest_window(items, sealer, tenant)
        return seen + len(items), at if newest is None else seen + newest

    return extend


def seal_window(
    sealer: Sealer,
    tenant: str,
    summary: str,
    before: list[dict[str, Any]],
    after: list[dict[str, Any]],
) -> dict[str, Any]:
    """The compaction item of a compaction inside create: the summary, the user messages kept
    `before` it and the items `after` it, all sealed."""
    payload = {"summary": summary, "window": {"before": before, "after": after}}
    sealed = sealer.seal(tenant, KIND, payload)
    return {"type": KIND, "id": new_id("cmp"), "encrypted_content": sealed}


def render(
    items: list[dict[str, Any]], history: History | None, sealer: Sealer, tenant: str
) -> tuple[list[dict[str, Any]], History | None]:
    """The context as the upstream reads it, (this request's items, the chain): from the
    newest window (a compaction inside create) on, when there is one, every compaction item
    expanded to its summary where it stands."""
    at = _newest_window(items, sealer, tenant)
    if at is not None:
        window = _window(items[at], sealer, tenant, f"input[{at}].encrypted_content")
        return expand([*window, *items[at + 1 :]], sealer, tenant, "input"), None
    return expand(items, sealer, tenant, "input"), expand_history(history, sealer, tenant)


def _window(item: dict[str, Any], sealer: Sealer, tenant: str, where: str) -> list[dict[str, Any]]:
    payload = sealer.unseal(tenant, KIND, item["encrypted_content"], where)
    window = payload["window"]
    return [*window["before"], _summary_message(item["id"], payload["summary"]), *window["after"]]


def _newest_window(items: list[dict[str, Any]], sealer: Sealer, tenant: str) -> int | None:
    """Where the newest compaction item that seals a window is among `items`."""
    for index in range(len(items) - 1, -1, -1):
        item = items[index]
        if item["type"] == KIND and _is_window(item, sealer, tenant):
            return index
    return None


def _is_window(item: dict[str, Any], sealer: Sealer, tenant: str) -> bool:
    payload = sealer.open(tenant, KIND, item.get("encrypted_content") or "")
    return payload is not None and "window" in payload


def window(item: dict[str, Any], sealer: Sealer, tenant: str) -> list[dict[str, Any]]:
    """The context a window item stands for, as the upstream reads it."""
    return _window(item, sealer, tenant, "input")


_ANSWERS = ("function_call_output", "custom_tool_call_output")
_CALLS = ("function_call", "custom_tool_call")


def split(context: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(what a compaction summarises, what stays as it is): the context's fresh end stays, the
    user message and the tool outputs it ends with, and the calls those outputs answer (a
    model must read a call and its output together)."""
    end = len(context)
    while end > 0 and _fresh(context[end - 1]):
        end -= 1
    tail = context[end:]
    answered = {item["call_id"] for item in tail if item["type"] in _ANSWERS}
    # The newest call of each id (a client may reuse ids; an older call keeps its output).
    newest = {
        item["call_id"]: index
        for index, item in enumerate(context[:end])
        if item["type"] in _CALLS and item["call_id"] in answered
    }
    moved = set(newest.values())
    older = [item for index, item in enumerate(context[:end]) if index not in moved]
    return older, [*(context[index] for index in sorted(moved)), *tail]


def _fresh(item: dict[str, Any]) -> bool:
    return item["type"] in _ANSWERS or (item["type"] == "message" and item["role"] == "user")
