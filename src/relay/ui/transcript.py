"""A stored response as a transcript: its input items, then its output items, each made
into an entry a page shows the same way (a title, text, JSON), whatever the item's type.
Tool calls and their outputs carry their call_id, so a reader can pair them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Side = Literal["input", "output"]
# Keys every item has, or that say nothing to a reader; left out of an unknown item's JSON.
_PLAIN = frozenset({"id", "type", "status"})


@dataclass(frozen=True, slots=True)
class Entry:
    side: Side
    kind: str  # message, call, result, reasoning, other: how the page styles it
    title: str
    text: str = ""
    data: Any = None  # shown as indented JSON
    call_id: str | None = None
    status: str | None = None


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        return ""
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
        return str(part.get("text") or "")
    if kind == "refusal":
        return f"[refusal] {part.get('refusal') or ''}"
    if kind == "input_image":
        where = part.get("file_id") or ("inline data" if _inline(part) else part.get("image_url"))
        return f"[image: {where}]"
    if kind == "input_file":
        return f"[file: {part.get('filename') or part.get('file_id') or 'inline data'}]"
    return f"[{kind}]"


def _inline(part: dict[str, Any]) -> bool:
    return str(part.get("image_url") or "").startswith("data:")


def _texts(parts: Any) -> str:
    if isinstance(parts, str):
        return parts
    if not isinstance(parts, list):
        return ""
    return "\n".join(text for text in map(_part_text, parts) if text)


def entry(side: Side, item: dict[str, Any]) -> Entry:
    kind = item.get("type", "message")
    status = item.get("status")
    call_id = item.get("call_id")
    if kind == "message":
        role = str(item.get("role") or "message")
        return Entry(side, "message", role, _texts(item.get("content")), status=status)
    if kind == "function_call":
        name = ".".join(str(part) for part in (item.get("namespace"), item.get("name")) if part)
        return Entry(side, "call", f"Tool call: {name}", "", item.get("arguments"), call_id, status)
    if kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output")
        text = output if isinstance(output, str) else _texts(output)
        return Entry(side, "result", "Tool output", text, None, call_id, status)
    if kind == "custom_tool_call":
        title = f"Tool call: {item.get('name')}"
        return Entry(side, "call", title, str(item.get("input") or ""), None, call_id, status)
    if kind == "mcp_call":
        title = f"MCP call: {item.get('server_label')}.{item.get('name')}"
        text = str(item.get("error") or item.get("output") or "")
        return Entry(side, "call", title, text, item.get("arguments"), item.get("id"), status)
    if kind == "reasoning":
        summary = _texts(item.get("summary"))
        if summary:
            return Entry(side, "reasoning", "Reasoning summary", summary, status=status)
        content = _texts(item.get("content"))
        sealed = "(encrypted)" if item.get("encrypted_content") else ""
        return Entry(side, "reasoning", "Reasoning", content or sealed, status=status)
    if kind == "compaction":
        return Entry(side, "other", "Compacted context", "(sealed summary of earlier turns)")
    data = {key: value for key, value in item.items() if key not in _PLAIN}
    title = str(kind).replace("_", " ").capitalize()
    return Entry(side, "other", title, "", data, call_id, status)


def transcript(input_items: list[dict[str, Any]], output: list[dict[str, Any]]) -> list[Entry]:
    """The response's own input items, then its output, in order."""
    return [entry("input", item) for item in input_items] + [
        entry("output", item) for item in output
    ]


# What a conversation's client gave (the rest came from the model, or from tools Relay ran).
_GIVEN_ROLES = frozenset({"user", "system", "developer"})
_GIVEN_TYPES = frozenset(
    {"function_call_output", "custom_tool_call_output", "mcp_approval_response"}
)


def conversation(items: list[dict[str, Any]]) -> list[Entry]:
    """A conversation's items in order, each on the side of who wrote it."""
    return [
        entry(
            "input"
            if item.get("role") in _GIVEN_ROLES or item.get("type") in _GIVEN_TYPES
            else "output",
            item,
        )
        for item in items
    ]
