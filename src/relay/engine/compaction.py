"""Compaction: a context made shorter by the route's model (POST /responses/compact), and the
`compaction` items it returns, which clients give back as input.

The compacted window is the context's user messages (the most recent ones, within
KEPT_USER_CHARS) and one compaction item whose `encrypted_content` seals the model's summary
of everything (`relay.sealing`). Given back, a compaction item is unsealed (a tampered, foreign
or other tenant's one is a 400) and reaches the upstream as an assistant message holding the
summary; what is stored is the item as the client sent it.
"""

from __future__ import annotations

from typing import Any

from relay.ids import new_id
from relay.providers.base import History
from relay.sealing import Sealer

KIND = "compaction"
# Instructions for the summarising turn.
PROMPT = (
    "You compact a conversation so that it can go on in a much shorter context. Write a "
    "summary that keeps everything needed to continue: the user's goals and constraints, "
    "decisions made, facts learned, tool calls made and what they returned, file names, "
    "identifiers and numbers, and the work still open. Write only the summary."
)
REQUEST = "Summarise the conversation so far, as instructed."
SUMMARY_HEADING = "Summary of the conversation so far:\n"
KEPT_USER_CHARS = 20_000


def seal(sealer: Sealer, tenant: str, summary: str) -> dict[str, Any]:
    """The compaction item carrying `summary`."""
    sealed = sealer.seal(tenant, KIND, {"summary": summary})
    return {"type": KIND, "id": new_id("cmp"), "encrypted_content": sealed}


def kept_user_messages(context: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The most recent user messages, in order, within KEPT_USER_CHARS of text (at least one)."""
    kept: list[dict[str, Any]] = []
    size = 0
    for item in reversed(context):
        if item["type"] != "message" or item["role"] != "user":
            continue
        text = sum(len(part.get("text") or "") for part in item["content"])
        if kept and size + text > KEPT_USER_CHARS:
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
        expanded.append(
            {
                "type": "message",
                "role": "assistant",
                "id": item["id"],
                "status": "completed",
                "content": [
                    {"type": "output_text", "text": SUMMARY_HEADING + summary, "annotations": []}
                ],
            }
        )
    return expanded


def _any_compaction(seen: bool, items: list[dict[str, Any]]) -> bool:
    return seen or any(item["type"] == KIND for item in items)


def expand_history(history: History | None, sealer: Sealer, tenant: str) -> History | None:
    """The chain as the upstream sees it: the same history unless it holds compaction items
    (rare: clients start a new chain from a compacted window), else an expanded copy."""
    if history is None or not history.derive(KIND, _any_compaction, False):
        return history
    return History(expand(history.items, sealer, tenant, "previous_response_id"))
