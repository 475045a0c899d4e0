"""Relay's client for remote MCP servers: the `mcp` tools of a request, run for any model.

Each operation (list a server's tools, call one) is one short MCP session, opened, used and
closed inside the task that asked: no anyio task group outlives the call. A timeout is a
deadline on the whole operation, connecting included. A cancelled task (a client that left)
and a timeout end the same way: the request in flight is aborted, the SDK tells the server
(a cancel notification, the DELETE that ends an older server's session), and what it sends
then gets at most CLEANUP_S. The official `mcp` SDK speaks the protocol:
streamable HTTP, or the older HTTP+SSE transport for a URL whose path ends in `/sse` and for a
server that answers the streamable POST with 404 or 405 (the specification's backwards
compatibility rule). `mode="auto"` asks `server/discover` first: a 2026 server then needs one
request per operation, an older one an `initialize` handshake after it.

Every HTTP request goes through an `EgressGuard` (`relay.tools.egress`): the allow list and
the private-network check, before anything is sent. Failures are `McpError`s shaped as the
openai SDK's `mcp_call.error` (`mcp_protocol_error`, `mcp_tool_execution_error`,
`http_error`), or the guard's `EgressRefused`. The server's headers (its credentials) are
never in a message: whatever text comes from the server is scrubbed of them, and errors name
the server by its label, never by its URL (whose query may hold a key).

The SDK is imported on first use (it costs about a second), so `import relay.tools.mcp` is
cheap for a process that never calls a server.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from relay.providers.credentials import Scrubber
from relay.tools.egress import EgressGuard, EgressPolicy, EgressRefused, Resolver, resolve_host

if TYPE_CHECKING:
    import httpx2
    from mcp.client.session import ClientSession
    from mcp_types import CallToolResult, Tool

__all__ = ["McpClient", "McpError", "McpLimits", "McpServer"]

T = TypeVar("T")

# JSON-RPC codes for failures that are not the server's own answer (the SDK uses the same).
CONNECTION_CLOSED = -32000
REQUEST_TIMEOUT = -32001
INTERNAL_ERROR = -32603
# How long a request may take once its operation is cancelled (see _cut_short_when_cancelled).
CLEANUP_S = 1.0
# A server that keeps handing out cursors is cut off here rather than listed forever.
MAX_LIST_PAGES = 100
# Headers that frame a request or its connection, which httpx2 and the SDK write: a client's
# own would smuggle a second request past the server (Content-Length, Transfer-Encoding) or
# hold the connection. Left out of what a server is sent.
FRAMING_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "expect",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


@dataclass(frozen=True, slots=True)
class McpServer:
    label: str
    url: str
    # Secret: the request's headers, plus "Authorization: Bearer <authorization>".
    headers: Mapping[str, str] = field(repr=False)


@dataclass(frozen=True, slots=True)
class McpLimits:
    list_timeout_s: float = 30.0
    call_timeout_s: float = 120.0
    max_output_bytes: int = 1_000_000


class McpError(Exception):
    """A failed operation. `error` is an `mcp_call` item's `error`, as the openai SDK types
    it: `{"type": "mcp_protocol_error", "code", "message"}` (a JSON-RPC error, a timeout, a
    connection that failed), `{"type": "mcp_tool_execution_error", "content"}` (the tool
    answered with isError) or `{"type": "http_error", "code", "message"}` (an HTTP status).
    str() is its message (a tool's: the text it answered), for an `mcp_list_tools` item's
    `error` or a log line."""

    def __init__(self, error: dict[str, Any], message: str) -> None:
        super().__init__(message)
        self.error = error


def _protocol_error(code: int, message: str) -> McpError:
    return McpError({"type": "mcp_protocol_error", "code": code, "message": message}, message)


class McpClient:
    def __init__(self, limits: McpLimits, *, resolve: Resolver = resolve_host) -> None:
        self.limits = limits
        self._resolve = resolve  # the DNS answers the egress guard checks (tests give theirs)
        self._ssl_context: ssl.SSLContext | None = None

    @staticmethod
    def warm() -> None:
        """Import the SDK now (about a second, blocking): a server that lets projects reach
        MCP servers does it at start-up, on a thread, rather than in its first request."""
        import httpx2  # noqa: F401
        import mcp.client.client
        import mcp.client.sse
        import mcp.client.streamable_http  # noqa: F401

    async def list_tools(self, server: McpServer, policy: EgressPolicy) -> list[dict[str, Any]]:
        """The server's tools, each `{"name", "description"?, "input_schema", "annotations"?}`
        (the openai SDK's McpListToolsTool; annotations as the server wrote them, readOnlyHint
        and all). Raises McpError or EgressRefused."""
        from mcp_types import PaginatedRequestParams

        async def list_all(session: ClientSession) -> list[dict[str, Any]]:
            tools: list[dict[str, Any]] = []
            cursor: str | None = None
            for _ in range(MAX_LIST_PAGES):
                page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor))
                tools += [_listed(tool) for tool in page.tools]
                cursor = page.next_cursor
                if cursor is None:
                    break
            return tools

        return await self._run(server, policy, "tools/list", self.limits.list_timeout_s, list_all)

    async def call_tool(
        self, server: McpServer, policy: EgressPolicy, name: str, arguments: dict[str, Any]
    ) -> str:
        """The tool's output as an `mcp_call` item's `output`. Raises McpError (a result with
        isError is a `mcp_tool_execution_error` carrying its content) or EgressRefused."""
        from mcp_types import CallToolRequest, CallToolRequestParams
        from mcp_types import CallToolResult as Result

        async def call(session: ClientSession) -> CallToolResult:
            # `send_request`, not `ClientSession.call_tool`: that one lists the tools first, to
            # check structured content against the tool's output schema, a round trip per call
            # for a check the model does not need.
            request = CallToolRequest(params=CallToolRequestParams(name=name, arguments=arguments))
            return await session.send_request(request, Result)

        result = await self._run(server, policy, "tools/call", self.limits.call_timeout_s, call)
        if result.is_error:
            scrub = _scrubber(server.headers)
            content = [_dumped(block, scrub) for block in result.content]
            message = scrub(_output(result)) or "the tool failed"
            raise McpError({"type": "mcp_tool_execution_error", "content": content}, message)
        return _capped(_output(result), self.limits.max_output_bytes)

    async def aclose(self) -> None:
        """Nothing to release today (no session outlives its operation): the engine closes the
        client with its other resources, so that pooled connections would need no new caller."""

    def _tls(self) -> ssl.SSLContext:
        # Loading the CA bundle costs tens of milliseconds: once per client, not per operation.
        if self._ssl_context is None:
            import httpx2

            self._ssl_context = httpx2.create_ssl_context(trust_env=False)
        return self._ssl_context

    async def _run(
        self,
        server: McpServer,
        policy: EgressPolicy,
        method: str,
        limit_s: float,
        work: Callable[[ClientSession], Awaitable[T]],
    ) -> T:
        import anyio

        # A refusal met inside the SDK may only be logged there (its SSE transport does, then
        # waits): the guard then cancels the operation, which ends in that refusal.
        refused = anyio.CancelScope()
        guard = EgressGuard(
            policy, resolve=self._resolve, ssl_context=self._tls(), on_refused=refused.cancel
        )
        # One SSE event carries a whole result: room for an output cut at the limit (JSON
        # escapes included, which non-ASCII text may need) and for a long tool list.
        max_event_bytes = 4 * self.limits.max_output_bytes + (1 << 20)
        attempt = _Session(server, guard, limit_s, max_event_bytes)
        try:
            # asyncio's timeout, not anyio's: it cancels the task once, as a client that leaves
            # does, so the SDK still tells the server (a cancel notification, the DELETE that
            # ends an older server's session) instead of dropping everything mid-request.
            async with asyncio.timeout(limit_s):
                with refused:
                    # Refusals and DNS failures here, before the SDK: its requests then reuse
                    # the checked answer.
                    await guard.check(server.url)
                    if _is_sse_url(server.url):
                        return await attempt.run(work, sse=True)
                    try:
                        return await attempt.run(work, sse=False)
                    except Exception:
                        if not attempt.statuses.not_streamable:
                            raise
                    attempt = _Session(server, guard, limit_s, max_event_bytes)
                    return await attempt.run(work, sse=True)
                assert guard.refused is not None  # only a refusal cancels the scope
                raise guard.refused
        except TimeoutError:
            message = f"MCP server {server.label!r} did not answer {method} within {limit_s:g} s"
            raise _protocol_error(REQUEST_TIMEOUT, message) from None
        except EgressRefused:
            raise
        except Exception as exc:
            scrub = _scrubber(server.headers)
            raise _failure(exc, guard, attempt.statuses, scrub, server.label, method) from None


@dataclass
class _Statuses:
    """What the server answered an attempt's POSTs: the SDK reports an HTTP error as a JSON-RPC
    error of its own making, without the status."""

    answered: bool = False  # whether any POST was answered yet
    not_streamable: bool = False  # the first POST was answered 404 or 405, not by MCP
    failed_post: httpx2.Response | None = None  # the latest POST, when it failed

    async def note(self, response: httpx2.Response) -> None:
        if response.request.method != "POST":
            return  # the GET stream a server may refuse (405), the DELETE that ends a session
        failed = response.status_code >= 400 and not await _carries_jsonrpc_error(response)
        if not self.answered:
            self.answered = True
            self.not_streamable = failed and response.status_code in (404, 405)
        # A later success clears it: an older server refuses the discovery probe, then answers.
        self.failed_post = response if failed else None


async def _carries_jsonrpc_error(response: httpx2.Response) -> bool:
    """Whether an error status comes with a JSON-RPC error (2026 servers answer an invalid
    request so, 400 and all): that error, which the SDK reports, says more than the status."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return False
    try:
        body = orjson.loads(await response.aread())
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and "jsonrpc" in body and "error" in body


@dataclass
class _Session:
    """One MCP session over one transport, for one operation."""

    server: McpServer
    guard: EgressGuard
    limit_s: float
    max_event_bytes: int
    statuses: _Statuses = field(default_factory=_Statuses)

    def _http(self) -> httpx2.AsyncClient:
        import httpx2

        # The deadline on the operation bounds everything; these only keep httpx2's own
        # defaults (5 s) from ending a slow tool's silent response first.
        headers = {
            name: value
            for name, value in self.server.headers.items()
            if name.lower() not in FRAMING_HEADERS
        }
        http = self.guard.client(headers=headers, timeout=httpx2.Timeout(self.limit_s))
        http.event_hooks = {
            "request": [_cut_short_when_cancelled],
            "response": [self.statuses.note],
        }
        return http

    async def run(self, work: Callable[[ClientSession], Awaitable[T]], *, sse: bool) -> T:
        from mcp.client.client import Client
        from mcp.client.sse import sse_client
        from mcp.client.streamable_http import streamable_http_client

        if sse:

            def factory(
                headers: dict[str, str] | None = None,
                timeout: httpx2.Timeout | None = None,
                auth: httpx2.Auth | None = None,
            ) -> httpx2.AsyncClient:
                return self._http()  # the server's headers and the operation's deadline

            transport = sse_client(self.server.url, httpx_client_factory=factory)
            async with Client(transport, mode="auto", cache=None) as client:
                return await work(client.session)
        async with self._http() as http:
            transport = streamable_http_client(
                self.server.url, http_client=http, max_sse_event_size=self.max_event_bytes
            )
            async with Client(transport, mode="auto", cache=None) as client:
                return await work(client.session)


async def _cut_short_when_cancelled(request: httpx2.Request) -> None:
    """A request sent by a task being cancelled (by its client, or by the operation's deadline)
    gets CLEANUP_S, not the whole deadline: that is the DELETE that ends an older server's
    session, sent as the SDK closes, and the operation must end promptly also when the server
    stopped answering."""
    import httpx2

    task = asyncio.current_task()
    if task is not None and task.cancelling():
        request.extensions["timeout"] = httpx2.Timeout(CLEANUP_S).as_dict()


def _is_sse_url(url: str) -> bool:
    import httpx2

    return httpx2.URL(url).path.rstrip("/").endswith("/sse")


def _scrubber(headers: Mapping[str, str]) -> Scrubber:
    """Removes the server's header values from text, and the token of an Authorization
    header on its own (shorter tokens than the scrubber's fragments survive otherwise)."""
    secrets = dict(headers)
    for name, value in headers.items():
        scheme, _, token = value.partition(" ")
        if name.lower() == "authorization" and token:
            secrets[f"{name} ({scheme})"] = token
    return Scrubber.for_upstream(headers=secrets)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups: the SDK's task groups wrap them."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _failure(
    exc: Exception,
    guard: EgressGuard,
    statuses: _Statuses,
    scrub: Scrubber,
    label: str,
    method: str,
) -> Exception:
    """The McpError (or the guard's refusal) a failed operation is reported as."""
    import httpx2
    from mcp.shared.exceptions import MCPError
    from pydantic import ValidationError

    leaves = _leaves(exc)
    refused = next((e for e in leaves if isinstance(e, EgressRefused)), guard.refused)
    if refused is not None:
        return refused
    answer = next((e.response for e in leaves if isinstance(e, httpx2.HTTPStatusError)), None)
    answer = answer or statuses.failed_post
    if answer is not None:
        code = answer.status_code
        message = f"MCP server {label!r} answered HTTP {code} {answer.reason_phrase}".rstrip()
        return McpError({"type": "http_error", "code": code, "message": message}, message)
    broken = next((e for e in leaves if isinstance(e, httpx2.TransportError | OSError)), None)
    if broken is not None:
        message = f"the connection to MCP server {label!r} failed ({type(broken).__name__})"
        return _protocol_error(CONNECTION_CLOSED, message)
    answered = next((e for e in leaves if isinstance(e, MCPError)), None)
    if answered is not None:
        message = scrub(f"MCP server {label!r} answered {method} with an error: {answered}")
        return _protocol_error(answered.code, message)
    if any(isinstance(e, ValidationError) for e in leaves):
        return _protocol_error(INTERNAL_ERROR, f"MCP server {label!r} sent an invalid {method}")
    return _protocol_error(INTERNAL_ERROR, f"{method} on MCP server {label!r} failed")


def _listed(tool: Tool) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": tool.name, "input_schema": tool.input_schema}
    if tool.description is not None:
        entry["description"] = tool.description
    if tool.annotations is not None:
        entry["annotations"] = tool.annotations.model_dump(
            by_alias=True, mode="json", exclude_none=True
        )
    return entry


def _dumped(block: Any, scrub: Scrubber) -> dict[str, Any]:
    dumped: dict[str, Any] = block.model_dump(by_alias=True, mode="json", exclude_none=True)
    if isinstance(dumped.get("text"), str):
        dumped["text"] = scrub(dumped["text"])
    return dumped


def _output(result: CallToolResult) -> str:
    """As OpenAI gives an `mcp_call`'s output: the text contents, each other content as its
    JSON, one per line; the structured content's JSON when there is no text at all."""
    from mcp_types import TextContent

    texts = [block for block in result.content if isinstance(block, TextContent)]
    if not texts and result.structured_content is not None:
        return orjson.dumps(result.structured_content).decode()
    parts = [
        block.text
        if isinstance(block, TextContent)
        else orjson.dumps(block.model_dump(by_alias=True, mode="json", exclude_none=True)).decode()
        for block in result.content
    ]
    return "\n".join(parts)


def _capped(output: str, limit: int) -> str:
    """The output cut at `limit` bytes, with a note saying so. Cut rather than failed: the
    start of a long answer (a file, a search's first results) is what the model can still use,
    and a call that ran to completion should not be wasted; the note tells the model it did
    not see everything."""
    data = output.encode()
    if len(data) <= limit:
        return output
    kept = data[:limit].decode(errors="ignore")  # not half a character
    return f"{kept}\n[output cut by Relay at {limit} of {len(data)} bytes]"
