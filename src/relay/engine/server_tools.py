"""Server-side tools: the request's tools that Relay runs itself (remote MCP servers, web
search, image generation), what the model is offered for them, the calls, and how their items
read to an upstream.

The model only ever sees functions: each MCP tool as `<server_label>__<tool>`, web search as
one function of a query, image generation as one function of a prompt. The builder turns calls
to them into `mcp_call`, `mcp_approval_request`, `web_search_call` and `image_generation_call`
items (`ServerFunction` says which), the tool loop (`relay.engine.tool_loop`) runs them, and
`for_upstream` turns those items back into function calls and outputs for the next turn and
for every later turn of the chain, whatever the provider; an image, past the response that
drew it, reads as a reference (relay.providers.images).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from relay.engine.builder import ServerCall, ServerFunction
from relay.errors import InvalidRequest, RelayError
from relay.ids import new_id
from relay.models.tools import ImagesSettings
from relay.protocol import (
    CreateResponse,
    ImageGenerationTool,
    McpTool,
    McpToolFilter,
    WebSearchTool,
    invalid_request,
)
from relay.providers import images
from relay.providers.base import History
from relay.providers.tool_names import wire_name
from relay.sealing import Sealer
from relay.tools.egress import EgressPolicy, EgressRefused
from relay.tools.images import SETTINGS, ImageFailed, ImagesBackend, Partial
from relay.tools.mcp import McpClient, McpError, McpServer
from relay.tools.web_search import SearchBackend, SearchFailed, SearchResult

WEB_SEARCH_TYPES = frozenset(
    {"web_search", "web_search_2025_08_26", "web_search_preview", "web_search_preview_2025_03_11"}
)
IMAGE_TYPE = "image_generation"
SEARCH_PARAMETERS = {
    "type": "object",
    "properties": {"query": {"type": "string", "description": "What to search the web for."}},
    "required": ["query"],
}
SEARCH_DESCRIPTION = (
    "Searches the web. Returns numbered results (title, URL, snippet); cite the URLs you use."
)
# Results the model reads per search, by the tool's search_context_size.
CONTEXT_RESULTS = {"low": 3, "medium": 5, "high": 10}
IMAGE_PARAMETERS = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "description": "A detailed description of the image."}
    },
    "required": ["prompt"],
}
IMAGE_DESCRIPTION = (
    "Draws an image from a description and shows it to the user. Describe everything the "
    "image should show; you will not see it, only a note that it was drawn."
)
# The image_generation tool's fields the images endpoint takes (OpenAI's images API has
# them too); the others are for editing, which it does not do.
IMAGE_OPTIONS = (
    "background",
    "complexity",
    "frame_count",
    "frame_duration_ms",
    "moderation",
    "output_compression",
    "output_format",
    "partial_images",
    "quality",
    "size",
    "svg",
)
_EDITING = ("input_image_mask", "input_fidelity")
DECLINED = "The user declined this tool call."
_UNSAFE_NAME = re.compile(r"[^a-zA-Z0-9_-]")


class ToolServerFailed(RelayError):
    """An MCP server's tool list could not be had, before anything was generated (OpenAI's
    424)."""

    status = 424
    type = "external_connector_error"
    code = "http_error"


@dataclass(slots=True)
class McpEntry:
    """One `mcp` tool of the request: the server (with its secrets) and its rules."""

    tool: McpTool
    server: McpServer
    param: str
    listed: list[dict[str, Any]] | None = None  # its tools, once listed or found in context


@dataclass(slots=True)
class ServerTools:
    """The request's server-run tools and what the upstream is offered for them."""

    mcp: list[McpEntry] = field(default_factory=list)
    web_search: WebSearchTool | None = None
    image: ImageGenerationTool | None = None
    image_param: str = "tools"  # where the image tool is in the request
    # From a `web` plugin (seed 000's form): how many results, and what the model is told
    # before them.
    search_results: int | None = None
    search_prompt: str | None = None
    # By upstream name: what a call to the function is.
    functions: dict[str, ServerFunction] = field(default_factory=dict)
    offered: list[dict[str, Any]] = field(default_factory=list)
    search_name: str = "web_search"  # the function web search is offered as
    image_name: str = IMAGE_TYPE  # the function image generation is offered as
    # Items made before the first turn (tool lists, approved calls), to open the stream with.
    opening: list[ServerCall] = field(default_factory=list)

    def entry(self, label: str) -> McpEntry | None:
        return next((entry for entry in self.mcp if entry.tool.server_label == label), None)


def parse(raw: dict[str, Any], param: str) -> tuple[dict[str, Any], Any]:
    """A server-run tool of the request: (as echoed, as validated). The echo leaves out
    `authorization` and `headers`, as OpenAI does: they are secrets."""
    if raw.get("type") == "mcp":
        try:
            tool = McpTool.model_validate(raw)
        except ValidationError as error:
            raise invalid_request(error, raw, param) from None
        if tool.connector_id is not None or tool.tunnel_id is not None:
            field_name = "connector_id" if tool.connector_id is not None else "tunnel_id"
            raise InvalidRequest(
                "Connectors are not supported: give the MCP server's server_url.",
                param=f"{param}.{field_name}",
                code="unsupported_parameter",
            )
        if tool.server_url is None:
            raise InvalidRequest(
                "An mcp tool needs server_url.",
                param=f"{param}.server_url",
                code="missing_required_parameter",
            )
        if tool.allowed_callers is not None and "programmatic" in tool.allowed_callers:
            _unsupported(
                "Programmatic tool calling is not supported: only the model calls MCP tools.",
                f"{param}.allowed_callers",
            )
        echoed = tool.model_dump(exclude_none=True, exclude={"authorization", "headers"})
        return echoed, tool
    if raw.get("type") == IMAGE_TYPE:
        return _image_tool(raw, param)
    try:
        search = WebSearchTool.model_validate(raw)
    except ValidationError as error:
        raise invalid_request(error, raw, param) from None
    # What the search backend cannot honour is refused, not dropped.
    if search.external_web_access is False:
        _unsupported(
            "Searching without live web access (a cache only) is not supported here.",
            f"{param}.external_web_access",
        )
    if search.search_content_types is not None and "image" in search.search_content_types:
        _unsupported(
            "Image search is not supported: search_content_types may only be ['text'].",
            f"{param}.search_content_types",
        )
    return search.model_dump(exclude_none=True), search


def _unsupported(message: str, param: str) -> NoReturn:
    raise InvalidRequest(message, param=param, code="unsupported_parameter")


def _image_tool(raw: dict[str, Any], param: str) -> tuple[dict[str, Any], ImageGenerationTool]:
    try:
        tool = ImageGenerationTool.model_validate(raw)
    except ValidationError as error:
        raise invalid_request(error, raw, param) from None
    edits = [name for name in _EDITING if getattr(tool, name) is not None]
    if tool.action == "edit" or edits:
        field_name = edits[0] if edits else "action"
        raise InvalidRequest(
            "Relay's images endpoint generates images; it does not edit them.",
            param=f"{param}.{field_name}",
            code="unsupported_parameter",
        )
    return tool.model_dump(exclude_none=True), tool


def check_images(server: ServerTools, settings: ImagesSettings | None) -> None:
    """Refuse an image model other than the endpoint's (the operator chose it, and prices
    its images): a 400 naming the tool's field."""
    tool = server.image
    if tool is None or settings is None or tool.model in (None, settings.model):
        return
    raise InvalidRequest(
        f"Relay's images endpoint draws with '{settings.model}', not '{tool.model}'.",
        param=f"{server.image_param}.model",
        code="unsupported_parameter",
    )


def gather(tools: Sequence[tuple[Any, str]]) -> ServerTools | None:
    """The validated server-run tools (with where each is in the request), as ServerTools;
    None when there is none."""
    if not tools:
        return None
    server = ServerTools()
    labels: set[str] = set()
    for tool, param in tools:
        if isinstance(tool, WebSearchTool):
            if server.web_search is not None:
                raise InvalidRequest("Give at most one web search tool.", param=param)
            server.web_search = tool
            continue
        if isinstance(tool, ImageGenerationTool):
            if server.image is not None:
                raise InvalidRequest("Give at most one image_generation tool.", param=param)
            server.image, server.image_param = tool, param
            continue
        assert isinstance(tool, McpTool) and tool.server_url is not None
        if tool.server_label in labels:
            raise InvalidRequest(
                f"Two mcp tools are labelled '{tool.server_label}': labels must be unique.",
                param=f"{param}.server_label",
            )
        labels.add(tool.server_label)
        headers = dict(tool.headers or {})
        if tool.authorization:
            headers["Authorization"] = f"Bearer {tool.authorization}"
        server.mcp.append(
            McpEntry(tool, McpServer(tool.server_label, tool.server_url, headers), param)
        )
    return server if server.mcp or server.web_search or server.image else None


class WebPlugin(BaseModel):
    """`plugins: [{"id": "web", ...}]`: web search for any model, run by Relay as the
    web_search tool (where no deployment of the route forwards plugins itself). `engine`
    names the plugin's search engine elsewhere; here the configured backend always runs."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: Literal["web"]
    max_results: int | None = Field(default=None, ge=1, le=20)
    search_prompt: str | None = Field(default=None, max_length=10_000)
    engine: str | None = None


def take_web_plugin(request: CreateResponse) -> tuple[CreateResponse, WebPlugin | None]:
    """The request without its `web` plugin, and that plugin (validated)."""
    plugins = request.plugins or []
    found = [index for index, plugin in enumerate(plugins) if plugin.get("id") == "web"]
    if not found:
        return request, None
    index = found[0]
    try:
        plugin = WebPlugin.model_validate(plugins[index])
    except ValidationError as error:
        raise invalid_request(error, plugins[index], f"plugins[{index}]") from None
    rest = [plugin for i, plugin in enumerate(plugins) if i not in found]
    return request.model_copy(update={"plugins": rest or None}), plugin


def with_plugin(server: ServerTools | None, plugin: WebPlugin) -> ServerTools:
    """`server` with web search on, as the plugin asks (a web_search tool of the request's
    own stands: the plugin's counts and prompt apply to it)."""
    server = server or ServerTools()
    if server.web_search is None:
        server.web_search = WebSearchTool(type="web_search")
    server.search_results = plugin.max_results
    server.search_prompt = plugin.search_prompt
    return server


def check_policy(server: ServerTools, policy: EgressPolicy) -> None:
    """Refuse an MCP server the project may not reach (a 400 naming the tool)."""
    for entry in server.mcp:
        if not policy.permits(entry.server.url):
            raise InvalidRequest(
                f"MCP server '{entry.tool.server_label}' is not allowed here: the operator "
                "decides which servers a project may reach.",
                param=f"{entry.param}.server_url",
                code="mcp_server_not_allowed",
            )


# What a background run's stored request holds of an mcp tool's secrets: one sealed token.
SEALED = "relay_sealed"
_SECRET_FIELDS = ("authorization", "headers")


def seal_secrets(body: dict[str, Any], sealer: Sealer, tenant: str) -> dict[str, Any]:
    """A create body whose mcp tools' secrets are sealed, for storing (a queued background
    run waits in the database for a worker)."""
    tools = body.get("tools")
    if not tools or not any(_has_secrets(tool) for tool in tools):
        return body
    sealed = []
    for tool in tools:
        if _has_secrets(tool):
            secrets = {name: tool[name] for name in _SECRET_FIELDS if name in tool}
            kept = {name: value for name, value in tool.items() if name not in _SECRET_FIELDS}
            tool = {**kept, SEALED: sealer.seal(tenant, "mcp", secrets)}
        sealed.append(tool)
    return {**body, "tools": sealed}


def open_secrets(body: dict[str, Any], sealer: Sealer, tenant: str) -> dict[str, Any]:
    """`seal_secrets` undone, as the worker that runs it takes it."""
    tools = body.get("tools")
    if not tools or not any(isinstance(tool, dict) and SEALED in tool for tool in tools):
        return body
    opened = []
    for tool in tools:
        if isinstance(tool, dict) and SEALED in tool:
            tool = dict(tool)
            tool.update(sealer.unseal(tenant, "mcp", tool.pop(SEALED), "tools"))
        opened.append(tool)
    return {**body, "tools": opened}


def _has_secrets(tool: Any) -> bool:
    return (
        isinstance(tool, dict)
        and tool.get("type") == "mcp"
        and any(tool.get(name) for name in _SECRET_FIELDS)
    )


# Listing ------------------------------------------------------------------------------------


def listed_in(items: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The tools of each server an mcp_list_tools item of the context listed (the latest item
    per label, failed listings skipped)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        if item["type"] == "mcp_list_tools" and not item.get("error"):
            found[item["server_label"]] = item.get("tools") or []
    return found


async def list_tools(
    server: ServerTools,
    context: Sequence[dict[str, Any]],
    client: McpClient,
    policy: EgressPolicy,
) -> None:
    """Each server's tools: from the chain's mcp_list_tools item when it has one (listed once
    per chain, as OpenAI does), else listed now, which makes an mcp_list_tools item that opens
    the stream. A server that cannot be listed is the request's failure (424)."""
    earlier = listed_in(context) if server.mcp else {}
    for entry in server.mcp:
        label = entry.tool.server_label
        if label in earlier:
            entry.listed = earlier[label]
            continue
        try:
            tools = await client.list_tools(entry.server, policy)
        except (McpError, EgressRefused) as error:
            raise ToolServerFailed(
                f"Error retrieving tool list from MCP server: '{label}'. {error}",
                param="tools",
            ) from None
        entry.listed = [tool for tool in tools if _allowed(entry.tool.allowed_tools, tool)]
        item = {
            "id": new_id("mcpl"),
            "type": "mcp_list_tools",
            "server_label": label,
            "tools": entry.listed,
        }
        server.opening.append(
            ServerCall(
                item,
                ("response.mcp_list_tools.in_progress", "response.mcp_list_tools.completed"),
            )
        )


def offer(server: ServerTools, taken: set[str]) -> None:
    """The functions the upstream is offered for the server-run tools (names unique among
    `taken`, the client's own functions)."""
    for entry in server.mcp:
        label = entry.tool.server_label
        description = entry.tool.server_description
        for tool in entry.listed or ():
            name = upstream_name(label, tool["name"])
            if name in taken or name in server.functions:
                continue
            text = tool.get("description") or f"{tool['name']} of the MCP server {label}."
            if description:
                text = f"{text}\n\n(From {label}: {description})"
            server.functions[name] = ServerFunction(
                "mcp", label, tool["name"], _needs_approval(entry.tool, tool)
            )
            server.offered.append(
                {
                    "name": name,
                    "description": text,
                    "parameters": tool.get("input_schema") or {"type": "object"},
                }
            )
    if server.web_search is not None:
        name = _free_name("web_search", taken, server.functions)
        server.functions[name] = ServerFunction("web_search", "", name, False)
        server.search_name = name
        server.offered.append(
            {"name": name, "description": SEARCH_DESCRIPTION, "parameters": SEARCH_PARAMETERS}
        )
    if server.image is not None:
        name = _free_name(IMAGE_TYPE, taken, server.functions)
        server.functions[name] = ServerFunction("image_generation", "", name, False)
        server.image_name = name
        server.offered.append(
            {"name": name, "description": IMAGE_DESCRIPTION, "parameters": IMAGE_PARAMETERS}
        )


def _free_name(name: str, taken: set[str], functions: dict[str, ServerFunction]) -> str:
    """`name`, or `name_2`, `name_3`... where a function of the client's goes by it."""
    free, suffix = name, 1
    while free in taken or free in functions:
        suffix += 1
        free = f"{name}_{suffix}"
    return free


def upstream_name(label: str, tool: str) -> str:
    """An MCP tool's function name upstream: `<label>__<tool>`, with characters function
    names cannot hold replaced (a digest keeps such names apart)."""
    safe = _UNSAFE_NAME.sub("_", tool)
    if safe != tool:
        safe = f"{safe[:40]}_{hashlib.sha256(tool.encode()).hexdigest()[:6]}"
    return wire_name(label, safe)


def _matches(rule: McpToolFilter | None, tool: dict[str, Any]) -> bool:
    if rule is None:
        return False
    if rule.tool_names is not None and tool["name"] in rule.tool_names:
        return True
    read_only = bool((tool.get("annotations") or {}).get("readOnlyHint"))
    return rule.read_only is not None and rule.read_only == read_only


def _allowed(rule: list[str] | McpToolFilter | None, tool: dict[str, Any]) -> bool:
    if rule is None:
        return True
    if isinstance(rule, list):
        return tool["name"] in rule
    return _matches(rule, tool)


def _needs_approval(tool: McpTool, listed: dict[str, Any]) -> bool:
    """OpenAI's rule: approval unless require_approval says never (for this tool)."""
    rule = tool.require_approval
    if rule is None or rule == "always":
        return True
    if rule == "never":
        return False
    if _matches(rule.never, listed):
        return False
    if _matches(rule.always, listed):
        return True
    # A tool neither rule names: approved when only `always` lists tools (the others, by
    # implication, need none), else asked for, OpenAI's default.
    return rule.never is not None or rule.always is None


# Running calls ------------------------------------------------------------------------------


async def run_mcp(
    call: ServerCall, entry: McpEntry | None, client: McpClient, policy: EgressPolicy
) -> None:
    """Run an mcp_call item: its output, or its error in OpenAI's shape."""
    item = call.item
    try:
        arguments = orjson.loads(item["arguments"] or "{}")
    except orjson.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        _failed(
            item,
            {
                "type": "mcp_protocol_error",
                "code": -32602,
                "message": "The arguments are not a JSON object.",
            },
        )
        return
    if entry is None:  # an approved call to a server this request no longer has
        _failed(
            item,
            {
                "type": "mcp_protocol_error",
                "code": -32602,
                "message": "The MCP server is not among the request's tools.",
            },
        )
        return
    try:
        item["output"] = await client.call_tool(entry.server, policy, item["name"], arguments)
    except McpError as error:
        _failed(item, error.error)
        return
    except EgressRefused as error:
        _failed(item, {"type": "http_error", "code": 403, "message": str(error)})
        return
    item["status"] = "completed"


def _failed(item: dict[str, Any], error: dict[str, Any]) -> None:
    item["status"] = "failed"
    item["error"] = error


async def run_search(
    call: ServerCall,
    server: ServerTools,
    backend: SearchBackend,
    sources: bool,
    citable: dict[str, str],
) -> None:
    """Run a web_search_call item: its sources (with `include` asking for them), the results
    for the model, and the URLs the answer may cite."""
    item = call.item
    tool = server.web_search
    assert tool is not None
    query = item["action"]["query"]
    size = tool.search_context_size or "medium"
    domains = tool.filters.allowed_domains if tool.filters and tool.filters.allowed_domains else ()
    country = tool.user_location.country if tool.user_location else None
    try:
        results = await backend.search(
            query,
            max_results=server.search_results or CONTEXT_RESULTS[size],
            domains=domains,
            country=country,
        )
    except SearchFailed as error:
        item["status"] = "failed"
        call.for_model = f"The search failed: {error}"
        return
    item["status"] = "completed"
    if sources:
        item["action"]["sources"] = [{"type": "url", "url": result.url} for result in results]
    for result in results:
        citable.setdefault(result.url, result.title)
    call.for_model = results_text(query, results)
    if server.search_prompt:
        call.for_model = f"{server.search_prompt}\n\n{call.for_model}"


async def run_image(
    call: ServerCall, server: ServerTools, backend: ImagesBackend, on_partial: Partial
) -> None:
    """Run an image_generation_call item: its image (and what the endpoint drew it with), or
    its error; the model reads a reference to it either way, never the image."""
    item = call.item
    tool = server.image
    assert tool is not None
    options = {name: getattr(tool, name) for name in IMAGE_OPTIONS}
    options = {name: value for name, value in options.items() if value is not None}
    try:
        image = await backend.generate(item["revised_prompt"], options, on_partial)
    except ImageFailed as error:
        item["status"] = "failed"
        item["error"] = {"type": "image_generation_error", "code": None, "message": str(error)}
        call.for_model = f"The image could not be drawn: {error}"
        return
    item.update({name: options[name] for name in SETTINGS if name in options})
    item.update(image.settings)
    item.update(status="completed", result=image.result)
    if tool.action is not None:
        item["action"] = tool.action
    call.for_model = images.reference(item)


def results_text(query: str, results: Sequence[SearchResult]) -> str:
    if not results:
        return f"No results for {query!r}."
    lines = [f"Results for {query!r}:"]
    for number, result in enumerate(results, 1):
        lines.append(f"[{number}] {result.title}\nURL: {result.url}\n{result.snippet}")
    return "\n\n".join(lines)


# Approvals ---------------------------------------------------------------------------------


def approvals(
    earlier: dict[str, dict[str, Any]], items: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The approval requests this request's input approves (mcp_approval_response items);
    `earlier`: the chain's requests, by id. An answer to no request of the context is a 400."""
    requests = requests_in(earlier, list(items))
    approved = []
    for index, item in enumerate(items):
        if item["type"] != "mcp_approval_response":
            continue
        request = requests.get(item["approval_request_id"])
        if request is None:
            raise InvalidRequest(
                f"No MCP approval request found with id '{item['approval_request_id']}'.",
                param=f"input[{index}].approval_request_id",
            )
        if item["approve"]:
            approved.append(request)
    return approved


def approved_call(request: dict[str, Any]) -> ServerCall:
    """The mcp_call an approved request becomes, run before the first turn."""
    item = {
        "id": new_id("mcp"),
        "type": "mcp_call",
        "status": "in_progress",
        "server_label": request["server_label"],
        "name": request["name"],
        "arguments": request["arguments"],
        "approval_request_id": request["id"],
    }
    return ServerCall(item, ("response.mcp_call.in_progress",))


# What upstreams read -------------------------------------------------------------------------

SERVER_ITEM_TYPES = frozenset(
    {
        "mcp_call",
        "mcp_list_tools",
        "mcp_approval_request",
        "mcp_approval_response",
        "web_search_call",
    }
)


def _read_as_call(item: dict[str, Any], outputs: dict[str, str]) -> bool:
    """Whether an upstream reads `item` as a function call and its output: a server call, or
    an image this response's loop drew (later turns read an image as any other, a reference
    in the assistant's turn: providers do that)."""
    kind = item["type"]
    return kind in SERVER_ITEM_TYPES or (kind == images.ITEM and item["id"] in outputs)


def has_server_items(seen: bool, items: list[dict[str, Any]]) -> bool:
    return seen or any(item["type"] in SERVER_ITEM_TYPES for item in items)


def requests_in(
    found: dict[str, dict[str, Any]], items: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    added = {item["id"]: item for item in items if item["type"] == "mcp_approval_request"}
    return {**found, **added} if added else found


def for_upstream(
    items: list[dict[str, Any]],
    *,
    requests: dict[str, dict[str, Any]] | None = None,
    outputs: dict[str, str] | None = None,
    search_name: str | None = "web_search",
    image_name: str = IMAGE_TYPE,
) -> list[dict[str, Any]]:
    """`items` as an upstream reads them: each server call as a function call and its output
    (a declined approval as a call the user declined), tool lists and answered approvals left
    out. `requests`: approval requests earlier in the context; `outputs`: what the model reads
    of a call where the item does not hold it (this response's search results, the
    references to its images); `search_name`: the function web search calls are read as, None
    where Relay runs no web search (a web_search_call is then a Responses upstream's own, kept
    for it); `image_name`: the function image calls are read as. The same list when there is
    nothing to change."""
    outputs = outputs or {}
    if not any(_read_as_call(item, outputs) for item in items):
        return items
    known = dict(requests or {})
    read: list[dict[str, Any]] = []
    # Outputs wait until the run of calls they answer ends: calls a turn made together
    # read as one assistant turn with several calls, then their results.
    answers: list[dict[str, Any]] = []
    for item in items:
        kind = item["type"]
        pair: tuple[dict[str, Any], dict[str, Any]] | None = None
        if not _read_as_call(item, outputs) or (kind == "web_search_call" and search_name is None):
            read += answers
            answers = []
            read.append(item)
        elif kind == "mcp_approval_request":
            known[item["id"]] = item
        elif kind == "mcp_call":
            name = upstream_name(item["server_label"], item["name"])
            pair = _pair(item, name, item["arguments"], _call_output(item))
        elif kind == "web_search_call" and search_name is not None:
            query = orjson.dumps({"query": item["action"].get("query", "")}).decode()
            pair = _pair(item, search_name, query, outputs.get(item["id"]) or _searched(item))
        elif kind == images.ITEM:
            prompt = orjson.dumps({"prompt": item.get("revised_prompt", "")}).decode()
            pair = _pair(item, image_name, prompt, outputs[item["id"]])
        elif kind == "mcp_approval_response" and not item["approve"]:
            request = known.get(item["approval_request_id"])
            if request is not None:
                name = upstream_name(request["server_label"], request["name"])
                pair = _pair(request, name, request["arguments"], DECLINED)
        if pair is not None:
            read.append(pair[0])
            answers.append(pair[1])
    return read + answers


def _call_output(item: dict[str, Any]) -> str:
    """What the model reads of an mcp_call: its output, or what went wrong."""
    output = item.get("output")
    if output is not None:
        return str(output)
    error = item.get("error") or {}
    message = error.get("message")
    if message is None and isinstance(error.get("content"), list):
        message = " ".join(
            str(part.get("text", "")) for part in error["content"] if isinstance(part, dict)
        )
    return f"The tool failed: {message or orjson.dumps(error).decode()}"


def _searched(item: dict[str, Any]) -> str:
    action = item.get("action") or {}
    sources = [source.get("url") for source in action.get("sources") or ()]
    text = f"Searched the web for {action.get('query', '')!r}."
    return f"{text} Sources: {', '.join(map(str, sources))}" if sources else text


def _pair(
    item: dict[str, Any], name: str, arguments: str, output: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    call_id = item["id"]
    return (
        {
            "type": "function_call",
            "id": f"{call_id}_call",
            "call_id": call_id,
            "name": name,
            "arguments": arguments or "{}",
            "status": "completed",
        },
        {
            "type": "function_call_output",
            "id": f"{call_id}_out",
            "call_id": call_id,
            "output": output,
            "status": "completed",
        },
    )


def expand_history(history: History | None, search_name: str | None) -> History | None:
    """The chain as an upstream reads it: the same history unless it holds server items."""
    if history is None or not history.derive("server_items", has_server_items, False):
        return history
    return History(for_upstream(history.items, search_name=search_name))


def earlier_requests(history: History | None) -> dict[str, dict[str, Any]]:
    if history is None:
        return {}
    return history.derive("approval_requests", requests_in, {})
