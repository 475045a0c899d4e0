"""Reasoning that survives `store: false`: with `include: ["reasoning.encrypted_content"]`,
each reasoning item carries its text sealed by Relay (`relay.sealing`, purpose "reasoning"),
so a client that keeps no state (Codex replays its whole transcript every turn, content-less)
can give it back. A reasoning item given back with Relay-sealed content gets its text again
for the upstream (`expand`); content Relay did not seal (OpenAI's, say) is left alone, and
providers that take no reasoning back ignore the item, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay.sealing import Sealer

KIND = "reasoning"


def text_of(item: dict[str, Any]) -> str:
    """The reasoning's text: its raw content, else its summaries."""
    parts = item.get("content") or item.get("summary") or ()
    return "".join(part.get("text") or "" for part in parts)


def sealer_for(sealer: Sealer, tenant: str) -> Callable[[str, dict[str, Any] | None], str]:
    """What the builder calls on each finished reasoning item: its text, and the state the
    upstream needs given back with it (relay.providers.base.ReasoningState)."""

    def seal(text: str, state: dict[str, Any] | None) -> str:
        payload: dict[str, Any] = {"text": text}
        if state:
            payload["state"] = state
        return sealer.seal(tenant, KIND, payload)

    return seal


def opener_for(sealer: Sealer, tenant: str) -> Callable[[str], dict[str, Any] | None]:
    """What providers call on a reasoning item's encrypted_content: the upstream state Relay
    sealed in it, or None (none there, or content Relay did not seal)."""

    def state_of(token: str) -> dict[str, Any] | None:
        payload = sealer.open(tenant, KIND, token)
        state = None if payload is None else payload.get("state")
        return state if isinstance(state, dict) else None

    return state_of


def expand(items: list[dict[str, Any]], sealer: Sealer, tenant: str) -> list[dict[str, Any]]:
    """`items` with the text of Relay-sealed, content-less reasoning items restored as
    content; the same list when there is none."""
    wanted = [
        index
        for index, item in enumerate(items)
        if item["type"] == KIND and item.get("encrypted_content") and not item.get("content")
    ]
    if not wanted:
        return items
    expanded = list(items)
    for index in wanted:
        item = items[index]
        text = sealer.open(tenant, KIND, item["encrypted_content"])
        if text is not None:
            part = {"type": "reasoning_text", "text": text["text"]}
            expanded[index] = {**item, "content": [part]}
    return expanded
