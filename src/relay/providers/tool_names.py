"""The names namespaced tools go by upstream, the function a custom tool travels as, and the
function call a client-run tool search travels as.

A `namespace` tool groups function tools (`crm` holding `get_customer`); upstreams know only
flat function names, so each is offered as `<namespace>__<name>`, and the model's calls come
back to the client as `name` plus `namespace`. The wire name depends on the pair alone, so a
replayed call translates the same way in any later turn; one that would pass 64 characters
is shortened with a digest of the pair to stay unique.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

# How a custom tool's free-text input travels upstream: as a function call's arguments.
CUSTOM_INPUT = {
    "type": "object",
    "properties": {"input": {"type": "string"}},
    "required": ["input"],
    "additionalProperties": False,
}
SEPARATOR = "__"
MAX_NAME = 64  # chat-completions function names: ^[a-zA-Z0-9_-]{1,64}$


def wire_name(namespace: str, name: str) -> str:
    joined = f"{namespace}{SEPARATOR}{name}"
    if len(joined) <= MAX_NAME:
        return joined
    digest = hashlib.sha256(f"{namespace}\0{name}".encode()).hexdigest()[:10]
    return f"{namespace[:20]}{SEPARATOR}{name[:31]}_{digest}"


def search_as_function(item: dict[str, Any], search: str | None) -> dict[str, Any] | None:
    """A client-run tool search's item (Codex runs its own) as the function call or output it
    stands for upstream, where the search is offered as the function `search`
    (relay.engine.checks.plan_tools). None for any other search item: the tools it loaded are
    offered in full, as if there all along, and the model never saw that search."""
    call_id = item.get("call_id")
    if search is None or item.get("execution") != "client" or not call_id:
        return None
    if item["type"] == "tool_search_call":
        arguments = item.get("arguments")
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments if arguments is not None else {}).decode()
        return {"type": "function_call", "call_id": call_id, "name": search, "arguments": arguments}
    return {"type": "function_call_output", "call_id": call_id, "output": _listing(item["tools"])}


def _listing(tools: list[dict[str, Any]]) -> str:
    """What a search's output reads as to a model that called it as a function: the tools it
    loaded, by the names they are called by (they are offered from then on)."""
    lines = []
    for tool in tools:
        if tool.get("type") == "namespace":
            members = [
                (wire_name(tool["name"], member["name"]), member.get("description"))
                for member in tool.get("tools") or ()
            ]
        elif tool.get("type") in ("function", "custom"):
            members = [(tool["name"], tool.get("description"))]
        else:
            continue  # a hosted tool: not Relay's to offer (checks.searched_tools)
        lines += [f"- {name}: {about}" if about else f"- {name}" for name, about in members]
    if not lines:
        return "No tools were found."
    return "Tools loaded, callable from now on:\n" + "\n".join(lines)
