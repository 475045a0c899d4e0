"""Request rules that need more than one field, or knowledge of the route: every parameter is
applied, translated, or refused with a 400 naming it, never dropped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from relay.engine.schemas import check_json_schema
from relay.errors import InvalidRequest
from relay.protocol import (
    HOSTED_TOOL_TYPES,
    AllowedTools,
    CreateResponse,
    FunctionChoice,
    FunctionTool,
    TextFormatJsonSchema,
    invalid_request,
)
from relay.providers.registry import Route

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
    declared: list[dict[str, Any]]  # every function tool of the request, echoed back
    offered: list[dict[str, Any]]  # what the upstream sees after tool_choice filtering
    choice: str | dict[str, str]  # "auto" | "none" | "required" | {"name": ...}
    must_call: bool
    parallel: bool


def plan_tools(request: CreateResponse) -> ToolPlan:
    parallel = request.parallel_tool_calls is not False
    declared: list[dict[str, Any]] = []
    for index, raw in enumerate(request.tools or []):
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind in HOSTED_TOOL_TYPES:
            raise InvalidRequest(
                f"Tool type '{kind}' is not supported yet: Relay runs function tools only.",
                param=f"tools[{index}].type",
                code="unsupported_tool_type",
            )
        try:
            tool = FunctionTool.model_validate(raw)
        except ValidationError as error:
            raise invalid_request(error, raw, f"tools[{index}]") from None
        if tool.parameters is not None:
            check_json_schema(tool.parameters, f"tools[{index}].parameters")
        declared.append(tool.model_dump(exclude_none=True))
    names = [tool["name"] for tool in declared]
    if len(set(names)) != len(names):
        raise InvalidRequest("Tool names must be unique.", param="tools")

    choice = request.tool_choice
    if choice is None or choice == "auto":
        return ToolPlan(declared, declared, "auto", must_call=False, parallel=parallel)
    if choice == "none":
        # Enforced by not offering the tools at all: no upstream can call what it never saw.
        return ToolPlan(declared, [], "none", must_call=False, parallel=parallel)
    if choice == "required":
        if not declared:
            raise InvalidRequest(
                "tool_choice 'required' needs at least one tool.", param="tool_choice"
            )
        return ToolPlan(declared, declared, "required", must_call=True, parallel=parallel)
    if isinstance(choice, FunctionChoice):
        if choice.name not in names:
            raise InvalidRequest(
                f"tool_choice names function '{choice.name}', which is not in tools.",
                param="tool_choice.name",
            )
        forced = [tool for tool in declared if tool["name"] == choice.name]
        return ToolPlan(declared, forced, {"name": choice.name}, must_call=True, parallel=parallel)
    assert isinstance(choice, AllowedTools)
    try:
        allowed = choice.names()
    except ValueError as error:
        raise InvalidRequest(str(error), param="tool_choice.tools") from None
    unknown = [name for name in allowed if name not in names]
    if unknown:
        raise InvalidRequest(
            f"allowed_tools names functions not in tools: {unknown}", param="tool_choice.tools"
        )
    subset = [tool for tool in declared if tool["name"] in allowed]
    if choice.mode == "none":
        return ToolPlan(declared, [], "none", must_call=False, parallel=parallel)
    return ToolPlan(
        declared, subset, choice.mode, must_call=choice.mode == "required", parallel=parallel
    )


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
    if request.background:
        raise InvalidRequest(
            "Background mode is not supported yet; send the request without background.",
            param="background",
            code="unsupported_parameter",
        )
    if request.conversation is not None:
        raise InvalidRequest(
            "Conversations are not supported yet; use previous_response_id.",
            param="conversation",
            code="unsupported_parameter",
        )
    if request.prompt is not None:
        raise InvalidRequest(
            "Stored prompt templates are not supported; send instructions and input instead.",
            param="prompt",
            code="unsupported_parameter",
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
    if request.input in (None, []) and request.previous_response_id is None:
        raise InvalidRequest(
            "Missing required parameter: 'input'.",
            param="input",
            code="missing_required_parameter",
        )


def check_route(request: CreateResponse, route: Route) -> None:
    """Refuse what this route, the first choice or a fallback, cannot honour: a fallback that
    would silently drop a field is as wrong as a first choice that would."""
    forwarded = set(route.config.forward_fields)
    wants_image = request.modalities is not None and "image" in request.modalities
    for name, used in (
        ("provider", request.provider is not None),
        ("plugins", bool(request.plugins)),
        ("modalities", wants_image),
        ("image_config", bool(request.image_config)),
    ):
        if used and name not in forwarded:
            raise InvalidRequest(
                f"'{name}' is not supported by the route for model '{route.model}'.",
                param=name,
                code="unsupported_parameter",
            )
