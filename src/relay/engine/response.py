"""The response object: every key of the Open Responses contract, defaults echoed, nulls written."""

from __future__ import annotations

from typing import Any

from relay.protocol import (
    AllowedTools,
    CreateResponse,
    CustomChoice,
    FunctionChoice,
    PromptReference,
    TextFormatJsonSchema,
)


def echo_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**tool, "tools": echo_tools(tool["tools"])}
        if tool["type"] == "namespace"
        else tool
        if tool["type"] != "function"  # custom, tool_search, hosted tools an upstream runs: as sent
        else {
            "type": "function",
            "name": tool["name"],
            "description": tool.get("description"),
            "parameters": tool.get("parameters"),
            "strict": tool.get("strict"),
            **({"defer_loading": tool["defer_loading"]} if "defer_loading" in tool else {}),
        }
        for tool in tools
    ]


def echo_tool_choice(request: CreateResponse) -> Any:
    choice = request.tool_choice
    if choice is None:
        return "auto"
    if isinstance(choice, FunctionChoice | CustomChoice):
        return choice.model_dump(exclude_none=True)
    if isinstance(choice, AllowedTools):
        return {"type": "allowed_tools", "mode": choice.mode, "tools": choice.tools}
    return choice


def echo_text(request: CreateResponse, *, echo_json_schema: bool = True) -> dict[str, Any]:
    """The text config as answered. The Open Responses contract (2026-04-24) types a json_schema
    format's `schema` as null, where OpenAI echoes the schema; `echo_json_schema` picks."""
    text = request.text
    fmt: dict[str, Any] = {"type": "text"}
    if text is not None and text.format is not None:
        if isinstance(text.format, TextFormatJsonSchema):
            fmt = {
                "type": "json_schema",
                "name": text.format.name,
                "description": text.format.description,
                "schema": text.format.schema_ if echo_json_schema else None,
                "strict": bool(text.format.strict),
            }
        else:
            fmt = {"type": text.format.type}
    verbosity = text.verbosity if text is not None and text.verbosity else "medium"
    return {"format": fmt, "verbosity": verbosity}


def echo_prompt(prompt: PromptReference) -> dict[str, Any]:
    """The prompt as OpenAI echoes it: its variables as given (an image's `detail` "auto"
    where none was), its version the one used."""
    variables = prompt.model_dump(mode="json", exclude_none=True).get("variables")
    for value in (variables or {}).values():
        if isinstance(value, dict) and value["type"] == "input_image":
            value.setdefault("detail", "auto")
    return {"id": prompt.id, "variables": variables, "version": prompt.version}


def new_response(
    request: CreateResponse,
    *,
    response_id: str,
    model: str,
    created_at: int,
    tools: list[dict[str, Any]],
    reasoning: dict[str, Any] | None,
    session_id: str | None,
    echo_json_schema: bool = True,
) -> dict[str, Any]:
    """The in_progress snapshot that response.created carries; the run fills in the rest."""
    service_tier = request.service_tier
    response = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "completed_at": None,
        "status": "in_progress",
        "incomplete_details": None,
        "model": model,
        "previous_response_id": request.previous_response_id,
        "instructions": request.instructions,
        "output": [],
        "error": None,
        "tools": echo_tools(tools),
        "tool_choice": echo_tool_choice(request),
        "truncation": request.truncation or "disabled",
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "text": echo_text(request, echo_json_schema=echo_json_schema),
        "top_p": request.top_p if request.top_p is not None else 1.0,
        "presence_penalty": request.presence_penalty or 0.0,
        "frequency_penalty": request.frequency_penalty or 0.0,
        "top_logprobs": request.top_logprobs or 0,
        "temperature": request.temperature if request.temperature is not None else 1.0,
        "reasoning": reasoning,
        "usage": None,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": request.max_tool_calls,
        "store": request.store is not False,
        "background": bool(request.background),
        # "auto" asks the upstream to choose; what we report is the tier the request ran on.
        "service_tier": "default" if service_tier in (None, "auto") else service_tier,
        "metadata": request.metadata or {},
        "safety_identifier": request.safety_identifier,
        "prompt_cache_key": request.prompt_cache_key,
        "user": request.user,
        "session_id": session_id,
        "output_text": "",
    }
    if request.prompt is not None:  # OpenAI's field; the Open Responses contract has none
        response["prompt"] = echo_prompt(request.prompt)
    return response


def output_text(output: list[dict[str, Any]]) -> str:
    """The SDKs' convenience field: all output_text parts of message items, concatenated."""
    return "".join(
        part["text"]
        for item in output
        if item["type"] == "message"
        for part in item["content"]
        if part["type"] == "output_text"
    )
