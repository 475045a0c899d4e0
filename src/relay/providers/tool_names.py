"""The names namespaced tools go by upstream, and the function a custom tool travels as.

A `namespace` tool groups function tools (`crm` holding `get_customer`); upstreams know only
flat function names, so each is offered as `<namespace>__<name>`, and the model's calls come
back to the client as `name` plus `namespace`. The wire name depends on the pair alone, so a
replayed call translates the same way in any later turn; one that would pass 64 characters
is shortened with a digest of the pair to stay unique.
"""

from __future__ import annotations

import hashlib

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
