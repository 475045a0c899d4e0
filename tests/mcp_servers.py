"""Real MCP servers on loopback, built with the MCP SDK's `MCPServer`, for Relay's MCP client
(tests/test_mcp_client.py) and the engine's MCP tool tests.

`McpTestServer("streamable")` serves the streamable HTTP transport at `/mcp` and speaks the
2026 protocol (one request per operation); with `legacy=True` it answers as servers from
before it do (no `server/discover`: the `initialize` handshake, a session, a DELETE at the
end). `McpTestServer("sse")` serves the older HTTP+SSE transport at `/sse`, and again at
`/events`, a path that does not end in /sse and whose POST is answered 405 (the client's
fallback from streamable HTTP). Each runs under uvicorn in a daemon thread, on 127.0.0.1
unless given another loopback address, and records in `state` (`McpServerState`) every HTTP
request's method, path and headers (lower-cased), and how each `slow` call ended. `url` is
the MCP endpoint; `redirects` ({path: location}) answers those paths with a 307 instead, and
requests whose method is in `stall` ({"DELETE"}) are never answered (until the client leaves).

Tools:
  add(a, b)        a + b (an int, with structured content)
  echo(text)       the text; annotated read-only (readOnlyHint) with a title
  fail(message)    a tool execution error (isError) whose text is the message
  reject(message)  a JSON-RPC error (-32602) whose message is the message
  slow(seconds)    sleeps, then "slept"; `state.slow_started`, `slow_finished` and
                   `slow_cancelled` count how calls ended (for timeouts and cancels)
  big(n)           n bytes of text ("x" * n)
  pixel()          an image content (a 1x1 PNG), then a text content
  structured()     structured content only, no content blocks

The fixtures `mcp_streamable`, `mcp_legacy` and `mcp_sse` give a running server each
(started once per session), its records cleared for the test.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import pytest
from loopback_server import LoopbackApp
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    CallToolResult,
    ImageContent,
    TextContent,
    ToolAnnotations,
)
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "McpServerState",
    "McpTestServer",
    "RecordedRequest",
    "mcp_legacy",
    "mcp_sse",
    "mcp_streamable",
]

# A 1x1 transparent PNG.
PIXEL_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names


@dataclass
class McpServerState:
    requests: list[RecordedRequest] = field(default_factory=list)
    slow_started: int = 0
    slow_finished: int = 0
    slow_cancelled: int = 0

    def reset(self) -> None:
        self.requests.clear()
        self.slow_started = self.slow_finished = self.slow_cancelled = 0

    def header_values(self, name: str) -> list[str]:
        """The values of header `name` (lower-case) on every request received, in order."""
        return [r.headers[name] for r in self.requests if name in r.headers]

    def wait_for(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait (blocking: the server runs in its own thread) until `condition()` holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("the MCP test server never reached the awaited state")
            time.sleep(0.005)


async def _no_discovery(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
    """As a server from before the 2026 protocol answers `server/discover`: there is no such
    method, so a client falls back to the `initialize` handshake."""
    if ctx.method == "server/discover":
        raise MCPError(METHOD_NOT_FOUND, "Method not found")
    return await call_next(ctx)


def build_server(state: McpServerState, *, legacy: bool = False) -> MCPServer:
    server = MCPServer(
        "relay-test",
        instructions="Tools for Relay's MCP tests.",
        log_level="WARNING",
        middleware=[_no_discovery] if legacy else [],
    )

    @server.tool(description="Adds two integers.")
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool(
        description="Says the text back.",
        annotations=ToolAnnotations(title="Echo", read_only_hint=True),
    )
    def echo(text: str) -> str:
        return text

    @server.tool(description="Always fails with the message.")
    def fail(message: str) -> str:
        raise ToolError(message)

    @server.tool(description="Refuses the call with a JSON-RPC error.")
    def reject(message: str) -> str:
        raise MCPError(INVALID_PARAMS, message)

    @server.tool(description="Sleeps for the given seconds.")
    async def slow(seconds: float) -> str:
        state.slow_started += 1
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            state.slow_cancelled += 1
            raise
        state.slow_finished += 1
        return "slept"

    @server.tool(description="Returns n bytes of text.")
    def big(n: int) -> str:
        return "x" * n

    @server.tool(description="Returns a one-pixel image and a caption.")
    def pixel() -> list[ImageContent | TextContent]:
        data = base64.b64encode(PIXEL_PNG).decode()
        return [
            ImageContent(type="image", data=data, mime_type="image/png"),
            TextContent(type="text", text="a pixel"),
        ]

    @server.tool(description="Returns structured content only.")
    def structured() -> CallToolResult:
        return CallToolResult(content=[], structured_content={"answer": 42})

    return server


class _Front:
    """ASGI middleware: notes every HTTP request, answers the redirected paths itself, and
    holds requests of the stalled methods unanswered until their client leaves."""

    def __init__(
        self,
        app: ASGIApp,
        state: McpServerState,
        redirects: Mapping[str, str],
        stall: Collection[str],
    ) -> None:
        self.app = app
        self.state = state
        self.redirects = redirects
        self.stall = stall

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            self.state.requests.append(RecordedRequest(scope["method"], scope["path"], headers))
            location = self.redirects.get(scope["path"])
            if location is not None:
                headers_out = [(b"location", location.encode()), (b"content-length", b"0")]
                await send({"type": "http.response.start", "status": 307, "headers": headers_out})
                await send({"type": "http.response.body", "body": b""})
                return
            if scope["method"] in self.stall:
                while (await receive())["type"] != "http.disconnect":
                    pass
                return
        await self.app(scope, receive, send)


def _mcp_app(transport: Literal["streamable", "sse"], server: MCPServer) -> Starlette:
    # Tests reach the server under other names (a resolver seam) and addresses (127.0.0.2):
    # the SDK's Host-header check for loopback servers would refuse them.
    security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    if transport == "streamable":
        return server.streamable_http_app(transport_security=security)
    sse = server.sse_app(sse_path="/sse", message_path="/messages/", transport_security=security)
    events = server.sse_app(
        sse_path="/events", message_path="/events-messages/", transport_security=security
    )
    return Starlette(routes=[*sse.routes, *events.routes])


class McpTestServer(LoopbackApp):
    def __init__(
        self,
        transport: Literal["streamable", "sse"],
        *,
        legacy: bool = False,
        redirects: Mapping[str, str] | None = None,
        stall: Collection[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.transport = transport
        self.state = McpServerState()
        app = _mcp_app(transport, build_server(self.state, legacy=legacy))
        # lifespan "on": the streamable HTTP app runs its session manager there.
        front = _Front(app, self.state, redirects or {}, stall)
        super().__init__(front, host=host, port=port, lifespan="on")

    @property
    def url(self) -> str:
        """The MCP endpoint: `/mcp` (streamable HTTP) or `/sse`."""
        return self.base_url + ("/mcp" if self.transport == "streamable" else "/sse")


def _serving(server: McpTestServer) -> Iterator[McpTestServer]:
    with server:
        yield server


@pytest.fixture(scope="session")
def _mcp_streamable_server() -> Iterator[McpTestServer]:
    yield from _serving(McpTestServer("streamable"))


@pytest.fixture(scope="session")
def _mcp_legacy_server() -> Iterator[McpTestServer]:
    yield from _serving(McpTestServer("streamable", legacy=True))


@pytest.fixture(scope="session")
def _mcp_sse_server() -> Iterator[McpTestServer]:
    yield from _serving(McpTestServer("sse"))


@pytest.fixture
def mcp_streamable(_mcp_streamable_server: McpTestServer) -> McpTestServer:
    _mcp_streamable_server.state.reset()
    return _mcp_streamable_server


@pytest.fixture
def mcp_legacy(_mcp_legacy_server: McpTestServer) -> McpTestServer:
    _mcp_legacy_server.state.reset()
    return _mcp_legacy_server


@pytest.fixture
def mcp_sse(_mcp_sse_server: McpTestServer) -> McpTestServer:
    _mcp_sse_server.state.reset()
    return _mcp_sse_server
