"""A tiny MCP server over stdio for the Codex scenarios (tests/test_clients.py): one tool,
`standup_note`, that answers "noted: <title>". The protocol's few messages a client needs
(initialize, tools/list, tools/call; JSON-RPC, one message a line) are answered here, which
needs no MCP SDK.

Run as `python mcp_stdio_server.py`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

TOOL = {
    "name": "standup_note",
    "description": "Adds a standup note to the team calendar.",
    "inputSchema": {
        "type": "object",
        "properties": {"title": {"type": "string", "description": "The note's title."}},
        "required": ["title"],
    },
    # Read-only: Codex calls it without asking (`codex exec` cannot ask).
    "annotations": {"readOnlyHint": True},
}


def answer(method: str, params: dict[str, Any]) -> dict[str, Any]:
    if method == "initialize":
        return {
            "protocolVersion": params.get("protocolVersion", "2025-06-18"),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "standup", "version": "1.0.0"},
        }
    if method == "tools/list":
        return {"tools": [TOOL]}
    if method == "tools/call":
        title = (params.get("arguments") or {}).get("title", "")
        return {"content": [{"type": "text", "text": f"noted: {title}"}], "isError": False}
    return {}  # ping, and anything else asked of it: an empty result


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        if "id" not in message or "method" not in message:
            continue  # a notification (initialized), or an answer to nothing it asked
        result = answer(message["method"], message.get("params") or {})
        reply = {"jsonrpc": "2.0", "id": message["id"], "result": result}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
