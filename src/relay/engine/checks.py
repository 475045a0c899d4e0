"""Request rules that need more than one field, or knowledge of the route: every parameter is
applied, translated, or refused with a 400 naming it, never dropped."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from relay.engine import server_tools
from relay.engine.schemas import check_json_schema
from relay.engine.server_tools import ServerTools
from relay.errors import InvalidRequest
from relay.protocol import (
    HOSTED_TOOL_TYPES,
    AllowedTools,
    CreateResponse,
    CustomChoice,
    CustomTool,
    FunctionChoice,
    FunctionTool,
    NamespaceTool,
    TextFormatJsonSchema,
    ToolSearchTool,
    invalid_request,
)
from relay.providers.tool_names import CUSTOM_INPUT, wire_name

KNOWN_INCLUDES = {
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
    # The hosted-tool includes below are accepted because clients send them by default; the
    # items they refer to are never produced until Relay runs those tools.
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
}


@dataclass(slots=True)
class ToolPlan:
    declared: list[dict[str, Any]]  # the request's tools, echoed back (namespaces as sent)
    offered: list[dict[str, Any]]  # function tools the upstream sees after tool_choice filtering
    choice: str | dict[str, str]  # "auto" | "none" | "required" | {"name": ...}
    must_call: bool
    parallel: bool
    # The functions of namespace tools, by the name they go by upstream: (namespace, name).
    namespaced: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Custom tools (free-text input), by the name they go by upstream.
    custom: frozenset[str] = frozenset()
    # Hosted tool types left out (hosted_tools = "omit"): never offered, never echoed.
    omitted: tuple[str, ...] = ()
    # Hosted tools an upstream runs itself (a Responses deployment's hosted_tools), as given.
    hosted: list[dict[str, Any]] = field(default_factory=list)
    # Every function tool, whatever tool_choice lets the model call (`offered`).
    functions: list[dict[str, Any]] = field(default_factory=list)
    # The request's tool_search tool, sent only where the upstream searches itself
    # (Prepared.provider_request); elsewhere the deferred tools are offered in full.
    search: dict[str, Any] | None = None
    # Functions that tool search loaded (the context's tool_search_output items), by their
    # upstream names: offered like the others except where the upstream searches itself,
    # which reads them from those items.
    loaded: frozenset[str] = frozenset()
    # A client-run search's upstream name: it is one of the functions (so that upstreams
    # without tool search can call it), and calls to it come back as tool_search_call items.
    search_function: str | None = None
    # The tools Relay runs itself (MCP servers, web search), when the request has any.
    server: ServerTools | None = None


def _tool(raw: Any, param: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A function or custom tool: (as echoed, as a function offered upstream)."""
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind in HOSTED_TOOL_TYPES:
        raise InvalidRequest(
            f"Tool type '{kind}' is not supported yet: Relay runs function and custom tools.",
            param=f"{param}.type",
            code="unsupported_tool_type",
        )
    model = CustomTool if kind == "custom" else FunctionTool
    try:
        tool = model.model_validate(raw)
    except ValidationError as error:
        raise invalid_request(error, raw, param) from None
    echoed = tool.model_dump(exclude_none=True)
    if isinstance(tool, FunctionTool):
        if tool.parameters is not None:
            check_json_schema(tool.parameters, f"{param}.parameters")
        return echoed, echoed
    # A custom tool is a function of one string. A regex grammar becomes the string's JSON
    # Schema pattern (enforced where the upstream enforces schemas, and by the embedded
    # model's grammar); any grammar is also put before the model in the description.
    description = tool.description or ""
    offered: dict[str, Any] = {"name": tool.name, "parameters": CUSTOM_INPUT}
    grammar = tool.format if tool.format and tool.format["type"] == "grammar" else None
    if grammar is not None:
        description += (
            f"\n\nThe input must follow this {grammar['syntax']} grammar:\n{grammar['definition']}"
        )
        offered["grammar"] = grammar
        if grammar["syntax"] == "regex":
            pattern = {"type": "string", "pattern": f"^({grammar['definition']})$"}
            offered["parameters"] = {**CUSTOM_INPUT, "properties": {"input": pattern}}
    offered["description"] = description.strip() or f"The input for {tool.name}, as free text."
    if tool.defer_loading is not None:
        offered["defer_loading"] = tool.defer_loading
    return echoed, offered


def _namespace(raw: Any, param: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A namespace tool as echoed, and its tools as offered, under their upstream names."""
    try:
        group = NamespaceTool.model_validate(raw)
    except ValidationError as error:
        raise invalid_request(error, raw, param) from None
    pairs = [_tool(tool, f"{param}.tools[{i}]") for i, tool in enumerate(group.tools)]
    echoed = {**group.model_dump(exclude_none=True), "tools": [pair[0] for pair in pairs]}
    deferred = {"defer_loading": True} if group.defer_loading else {}
    offered = [
        {**pair[1], "name": wire_name(group.name, pair[1]["name"]), **deferred} for pair in pairs
    ]
    return echoed, offered


# What a client-run search takes when the client gives no schema (Codex gives one).
SEARCH_PARAMETERS = {
    "type": "object",
    "properties": {"query": {"type": "string", "description": "What the tools are for."}},
    "required": ["query"],
}
SEARCH_DESCRIPTION = (
    "Searches for more tools by what they do; the tools found can be called from then on."
)


def _tool_search(raw: Any, param: str) -> dict[str, Any]:
    try:
        tool = ToolSearchTool.model_validate(raw)
    except ValidationError as error:
        raise invalid_request(error, raw, param) from None
    if tool.parameters is not None:
        check_json_schema(tool.parameters, f"{param}.parameters")
    return tool.model_dump(exclude_none=True)


def _search_function(search: dict[str, Any], taken: set[str]) -> dict[str, Any]:
    """A client-run search as the function upstreams without tool search are offered: named
    `tool_search` unless a tool of the client's goes by that (the name picks the item a
    call becomes, so it must be the search's alone)."""
    name, suffix = "tool_search", 1
    while name in taken:
        suffix += 1
        name = f"tool_search_{suffix}"
    return {
        "name": name,
        "description": search.get("description") or SEARCH_DESCRIPTION,
        "parameters": search.get("parameters") or SEARCH_PARAMETERS,
    }


class _Functions:
    """The functions offered upstream, gathered tool by tool, with what calls to them need
    to come back as the client declared them (namespace, custom)."""

    def __init__(self) -> None:
        self.offered: list[dict[str, Any]] = []
        self.namespaced: dict[str, tuple[str, str]] = {}
        self.custom: set[str] = set()
        self.loaded: set[str] = set()

    def add(self, raw: Any, param: str, *, loaded: bool = False) -> dict[str, Any]:
        """A function, custom or namespace tool; returns it as echoed. `loaded`: a tool that
        tool search loaded, left out when a tool of its name is known already (declared, or
        loaded by an earlier search)."""
        if isinstance(raw, dict) and raw.get("type") == "namespace":
            echoed, offered = _namespace(raw, param)
            members = [(tool["name"], tool["type"]) for tool in echoed["tools"]]
            namespace: str | None = echoed["name"]
        else:
            echoed, single = _tool(raw, param)
            offered, members, namespace = [single], [(echoed["name"], echoed["type"])], None
        known = {tool["name"] for tool in self.offered} if loaded else set()
        for tool, (name, kind) in zip(offered, members, strict=True):
            if loaded and tool["name"] in known:
                continue
            self.offered.append(tool)
            if namespace is not None:
                self.namespaced[tool["name"]] = (namespace, name)
            if kind == "custom":
                self.custom.add(tool["name"])
            if loaded:
                self.loaded.add(tool["name"])
        return echoed


LOADABLE = ("function", "custom", "namespace")


def searched_tools(
    items: Iterable[dict[str, Any]], prefix: str = "input"
) -> list[tuple[dict[str, Any], str]]:
    """The tools that the tool_search_output items among `items` loaded, with where each is
    (`<prefix>[i].tools[j]`), in order: functions, custom tools and namespaces (a hosted tool
    found by a search is not Relay's to run)."""
    return [
        (tool, f"{prefix}[{i}].tools[{j}]")
        for i, item in enumerate(items)
        if item["type"] == "tool_search_output"
        for j, tool in enumerate(item["tools"])
        if tool.get("type") in LOADABLE
    ]


def _upstream_name(namespace: str | None, name: str) -> str:
    return name if namespace is None else wire_name(namespace, name)


def plan_tools(
    request: CreateResponse,
    *,
    omit_hosted: bool = False,
    upstream_runs: frozenset[str] = frozenset(),
    server_runs: frozenset[str] = frozenset(),
    loaded: Iterable[tuple[dict[str, Any], str]] = (),
) -> ToolPlan:
    """`omit_hosted`: hosted tools (web_search, ...), which Relay cannot run, are left out
    instead of refused; the answer names them (`x-relay-omitted-tools`). `upstream_runs`:
    hosted tool types a deployment of the model runs itself: those pass through. `loaded`:
    the tools tool search loaded earlier in the context (`searched_tools`), callable as if
    declared. `server_runs`: hosted tool types Relay runs itself (relay.engine.server_tools),
    given the upstream does not.

    Tools with `defer_loading` are offered in full: an upstream without tool search could
    never find them otherwise, and one with it gets them marked as deferred. A client-run
    tool search is also offered as a function, where it was declared (Prepared leaves it out
    for an upstream that searches itself), so that a model without tool search can ask the
    client for the tools it left out of the request."""
    parallel = request.parallel_tool_calls is not False
    declared: list[dict[str, Any]] = []
    gathered = _Functions()
    omitted: list[str] = []
    hosted: list[dict[str, Any]] = []
    search: dict[str, Any] | None = None
    search_at = 0  # where among the functions a client-run search is offered
    server: list[tuple[Any, str]] = []
    for index, raw in enumerate(request.tools or []):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind == "tool_search":
            # Not a hosted tool: an upstream without it loses nothing (the deferred tools
            # are offered, a client-run search as a function), so it neither narrows the
            # deployments nor is left out or refused.
            search = _tool_search(raw, f"tools[{index}]")
            search_at = len(gathered.offered)
            declared.append(search)
        elif kind in upstream_runs:
            declared.append(raw)
            hosted.append(raw)
        elif kind in server_runs:
            param = f"tools[{index}]"
            echoed, tool = server_tools.parse(raw, param)
            declared.append(echoed)
            server.append((tool, param))
        elif omit_hosted and kind in HOSTED_TOOL_TYPES:
            omitted.append(str(kind))
        else:
            declared.append(gathered.add(raw, f"tools[{index}]"))
    functions = gathered.offered
    names = [tool["name"] for tool in functions]
    if len(set(names)) != len(names):
        raise InvalidRequest(
            "Tool names must be unique (a namespace's function goes by <namespace>__<name>).",
            param="tools",
        )
    for raw, param in loaded:
        gathered.add(raw, param, loaded=True)
    # tool_choice names the client's functions: the search is not one of them.
    names = [tool["name"] for tool in functions]
    custom = gathered.custom
    search_name = None
    if search is not None and search.get("execution") == "client":
        offered_search = _search_function(search, set(names))
        search_name = offered_search["name"]
        functions.insert(search_at, offered_search)

    def plan(offered: list[dict[str, Any]], choice: str | dict[str, str], must: bool) -> ToolPlan:
        return ToolPlan(
            declared,
            offered,
            choice,
            must,
            parallel,
            gathered.namespaced,
            frozenset(custom),
            tuple(omitted),
            hosted,
            functions,
            search,
            frozenset(gathered.loaded),
            search_name,
            server_tools.gather(server),
        )

    choice = request.tool_choice
    if choice is None or choice == "auto":
        return plan(functions, "auto", False)
    if choice == "none":
        # Enforced by not offering the tools at all: no upstream can call what it never saw.
        return plan([], "none", False)
    if choice == "required":
        if not functions and not server:  # server-side tools are offered later, once listed
            raise InvalidRequest(
                "tool_choice 'required' needs at least one tool.", param="tool_choice"
            )
        return plan(functions, "required", True)
    if isinstance(choice, FunctionChoice | CustomChoice):
        forced_name = _upstream_name(choice.namespace, choice.name)
        if forced_name not in names or (forced_name in custom) != (choice.type == "custom"):
            raise InvalidRequest(
                f"tool_choice names {choice.type} tool '{choice.name}', which is not in tools.",
                param="tool_choice.name",
            )
        forced = [tool for tool in functions if tool["name"] == forced_name]
        return plan(forced, {"name": forced_name}, True)
    assert isinstance(choice, AllowedTools)
    try:
        allowed = [_upstream_name(namespace, name) for namespace, name in choice.names()]
    except ValueError as error:
        raise InvalidRequest(str(error), param="tool_choice.tools") from None
    unknown = [name for name in allowed if name not in names]
    if unknown:
        raise InvalidRequest(
            f"allowed_tools names functions not in tools: {unknown}", param="tool_choice.tools"
        )
    if choice.mode == "none":
        return plan([], "none", False)
    subset = [tool for tool in functions if tool["name"] in allowed]
    return plan(subset, choice.mode, choice.mode == "required")


def reasoning_settings(request: CreateResponse) -> tuple[str | None, str | None]:
    """(effort, summary), merging seed 001's top-level reasoning_effort into reasoning.effort."""
    config = request.reasoning
    effort = config.effort if config else None
    if request.reasoning_effort is not None:
        if effort is not None and effort != request.reasoning_effort:
            raise InvalidRequest(
                "reasoning_effort and reasoning.effort disagree; send one of them.",
                param="reasoning_effort",
            )
        effort = request.reasoning_effort
    summary = (config.summary or config.generate_summary) if config else None
    return effort, None if summary == "none" else summary


def check_request(request: CreateResponse) -> None:
    """Refuse, before anything runs, what Relay cannot honour at all."""
    if request.background and request.store is False:
        raise InvalidRequest(
            "Background responses must be stored: send store: true (the default) with "
            "background: true.",
            param="background",
        )
    fmt = request.text.format if request.text is not None else None
    if isinstance(fmt, TextFormatJsonSchema):
        check_json_schema(fmt.schema_, "text.format.schema")
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest(
            "stream_options is only allowed with stream: true.", param="stream_options"
        )
    for index, value in enumerate(request.include or []):
        if value not in KNOWN_INCLUDES:
            raise InvalidRequest(
                f"Unknown include value '{value}'. Supported: {sorted(KNOWN_INCLUDES)}",
                param=f"include[{index}]",
            )
    # A prompt template's messages may be the input (relay.engine.prompts checks that).
    if (
        request.input in (None, [])
        and request.previous_response_id is None
        and request.prompt is None
    ):
        raise InvalidRequest(
            "Missing required parameter: 'input'.",
            param="input",
            code="missing_required_parameter",
        )
