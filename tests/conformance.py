"""Checks every test applies: the Open Responses schema, and the stream invariants.

`assert_valid_response` validates a response object against ResponseResource;
`check_stream` validates every event against its schema and the ordering rules that the SDKs
and Codex enforce, then returns the response folded from the events, which tests compare with
the terminal snapshot, the JSON answer and the stored copy.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from openai.types.responses import (
    CustomTool,
    ResponseCompactionCompactingEvent,
    ResponseCompactionItem,
    ResponseCustomToolCall,
    ResponseCustomToolCallInputDeltaEvent,
    ResponseCustomToolCallInputDoneEvent,
    ResponseCustomToolCallOutput,
    ResponseFunctionWebSearch,
    ResponseImageGenCallCompletedEvent,
    ResponseImageGenCallGeneratingEvent,
    ResponseImageGenCallInProgressEvent,
    ResponseImageGenCallPartialImageEvent,
    ResponseMcpCallArgumentsDeltaEvent,
    ResponseMcpCallArgumentsDoneEvent,
    ResponseMcpCallCompletedEvent,
    ResponseMcpCallFailedEvent,
    ResponseMcpCallInProgressEvent,
    ResponseMcpListToolsCompletedEvent,
    ResponseMcpListToolsFailedEvent,
    ResponseMcpListToolsInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponsePrompt,
    ResponseToolSearchCall,
    ResponseToolSearchOutputItem,
    ResponseWebSearchCallCompletedEvent,
    ResponseWebSearchCallInProgressEvent,
    ResponseWebSearchCallSearchingEvent,
    ToolChoiceCustom,
    ToolSearchTool,
    WebSearchPreviewTool,
    WebSearchTool,
)
from openai.types.responses.response_input_item_param import McpApprovalResponse, ToolSearchCall
from openai.types.responses.response_output_item import (
    ImageGenerationCall,
    McpApprovalRequest,
    McpCall,
    McpListTools,
)
from openai.types.responses.response_tool_search_output_item_param_param import (
    ResponseToolSearchOutputItemParamParam,
)
from openai.types.responses.tool import ImageGeneration, Mcp
from pydantic import TypeAdapter
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

# Open Responses contract, version 2026-04-24 (public/openapi/openapi.json of the spec repo).
SPEC = Path(__file__).resolve().parent / "contract" / "openresponses-openapi.json"
TERMINAL = {"response.completed", "response.failed", "response.incomplete"}


@cache
def _document() -> dict[str, Any]:
    if not SPEC.is_file():
        raise FileNotFoundError(f"the Open Responses contract is missing: {SPEC}")
    data: dict[str, Any] = json.loads(SPEC.read_text())
    return data


@cache
def _registry() -> Registry:
    resource = Resource.from_contents(_document(), default_specification=DRAFT202012)
    return Registry().with_resource("urn:openresponses", resource)


@cache
def validator(schema_name: str) -> Draft202012Validator:
    ref = {"$ref": f"urn:openresponses#/components/schemas/{schema_name}"}
    return Draft202012Validator(ref, registry=_registry())


@cache
def _event_schemas() -> dict[str, str]:
    """event type -> schema name, read from the contract itself."""
    found = {}
    for name, schema in _document()["components"]["schemas"].items():
        if name.endswith("StreamingEvent"):
            found[schema["properties"]["type"]["enum"][0]] = name
    return found


def _fail_on_errors(kind: str, instance: Any, schema_name: str) -> None:
    errors = sorted(validator(schema_name).iter_errors(instance), key=lambda e: list(e.path))
    if errors:
        details = "; ".join(f"{list(e.path)}: {e.message[:200]}" for e in errors[:5])
        raise AssertionError(f"{kind} does not validate against {schema_name}: {details}")


def _response_view(response: dict[str, Any]) -> dict[str, Any]:
    """The response as the contract checks see it, past the documented divergences (each
    checked its own way first)."""
    fmt = response.get("text", {}).get("format", {})
    if fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        # By default Relay echoes the schema as OpenAI does, where the contract types it as
        # null.
        response = {**response, "text": {**response["text"], "format": {**fmt, "schema": None}}}
    tools = response.get("tools") or []
    if any(tool.get("type") in ("namespace", "custom") for tool in tools):
        # OpenAI echoes namespace and custom tools as sent; the contract knows function tools
        # only. Those are checked as the SDK types them, functions as functions.
        flat = []
        for tool in tools:
            if tool.get("type") == "namespace":
                # defer_loading: the SDK types it on the namespace's functions; Relay takes it
                # on the namespace too.
                assert set(tool) <= {"type", "name", "description", "tools", "defer_loading"}
                flat += tool["tools"]
            else:
                flat.append(tool)
        for tool in flat:
            if tool.get("type") == "custom":
                CustomTool.model_validate(tool)
        response = {**response, "tools": [t for t in flat if t.get("type") != "custom"]}
    choice = response.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "custom":
        ToolChoiceCustom.model_validate(choice)
        response = {**response, "tool_choice": {"type": "function", "name": choice["name"]}}
    hosted = [tool for tool in response.get("tools") or [] if tool.get("type") in _HOSTED_TOOLS]
    for tool in hosted:
        _HOSTED_TOOLS[tool["type"]].model_validate(tool)
    if hosted:
        response = {**response, "tools": [t for t in response["tools"] if t not in hosted]}
    if response.get("prompt") is not None:
        # OpenAI's field, which the contract does not have: checked as the SDK types it.
        ResponsePrompt.model_validate(response["prompt"])
    output = [item for item in response["output"] if item.get("type") not in _HOSTED_ITEMS]
    for item in response["output"]:
        if item.get("type") in _HOSTED_ITEMS:
            _HOSTED_ITEMS[item["type"]].model_validate(item)
    return {**response, "output": [_contract_view(item) for item in output]}


def assert_valid_response(response: dict[str, Any]) -> None:
    _fail_on_errors("response", _response_view(response), "ResponseResource")


def assert_valid_item(item: dict[str, Any]) -> None:
    if item.get("type") == "custom_tool_call_output":
        ResponseCustomToolCallOutput.model_validate(item)
        return
    if item.get("type") in _HOSTED_ITEMS:
        _HOSTED_ITEMS[item["type"]].model_validate(item)
        return
    _fail_on_errors("item", _contract_view(item), "ItemField")


# OpenAI's shapes for custom tools, which the Open Responses contract does not have: checked
# against the openai SDK's own types instead.
_OPENAI_EVENTS: dict[str, Any] = {
    "response.custom_tool_call_input.delta": ResponseCustomToolCallInputDeltaEvent,
    "response.custom_tool_call_input.done": ResponseCustomToolCallInputDoneEvent,
    # Hosted tools an upstream ran (a Responses upstream's web search): OpenAI's shapes.
    "response.web_search_call.in_progress": ResponseWebSearchCallInProgressEvent,
    "response.web_search_call.searching": ResponseWebSearchCallSearchingEvent,
    "response.web_search_call.completed": ResponseWebSearchCallCompletedEvent,
    # Compaction inside create (context_management).
    "response.compaction.compacting": ResponseCompactionCompactingEvent,
    # Remote MCP servers, run by Relay (relay.engine.server_tools).
    "response.mcp_list_tools.in_progress": ResponseMcpListToolsInProgressEvent,
    "response.mcp_list_tools.completed": ResponseMcpListToolsCompletedEvent,
    "response.mcp_list_tools.failed": ResponseMcpListToolsFailedEvent,
    "response.mcp_call.in_progress": ResponseMcpCallInProgressEvent,
    "response.mcp_call.completed": ResponseMcpCallCompletedEvent,
    "response.mcp_call.failed": ResponseMcpCallFailedEvent,
    "response.mcp_call_arguments.delta": ResponseMcpCallArgumentsDeltaEvent,
    "response.mcp_call_arguments.done": ResponseMcpCallArgumentsDoneEvent,
    # Image output: a chat upstream's images, a Responses upstream's image_generation, or
    # Relay's images endpoint.
    "response.image_generation_call.in_progress": ResponseImageGenCallInProgressEvent,
    "response.image_generation_call.generating": ResponseImageGenCallGeneratingEvent,
    "response.image_generation_call.partial_image": ResponseImageGenCallPartialImageEvent,
    "response.image_generation_call.completed": ResponseImageGenCallCompletedEvent,
}
_HOSTED_ITEMS: dict[str, Any] = {
    "web_search_call": ResponseFunctionWebSearch,
    # Tool search (Codex): items the upstream made, or the client gave as input.
    "tool_search_call": ResponseToolSearchCall,
    "tool_search_output": ResponseToolSearchOutputItem,
    "mcp_list_tools": McpListTools,
    "compaction": ResponseCompactionItem,
    "mcp_call": McpCall,
    "mcp_approval_request": McpApprovalRequest,
    "image_generation_call": ImageGenerationCall,
}
_ITEM_EVENTS: dict[str, Any] = {
    "response.output_item.added": ResponseOutputItemAddedEvent,
    "response.output_item.done": ResponseOutputItemDoneEvent,
}
_HOSTED_TOOLS: dict[str, Any] = {
    "web_search": WebSearchTool,
    "web_search_2025_08_26": WebSearchTool,
    "web_search_preview": WebSearchPreviewTool,
    "web_search_preview_2025_03_11": WebSearchPreviewTool,
    "tool_search": ToolSearchTool,
    "mcp": Mcp,
    "image_generation": ImageGeneration,
}
# What clients send (the SDK's input types): tool search items as Codex gives them back.
INPUT_ITEMS: dict[str, Any] = {
    "tool_search_call": TypeAdapter(ToolSearchCall),
    "tool_search_output": TypeAdapter(ResponseToolSearchOutputItemParamParam),
    "mcp_approval_response": TypeAdapter(McpApprovalResponse),
}


def _contract_view(item: dict[str, Any]) -> dict[str, Any]:
    """A custom_tool_call item checked with the SDK's type, then seen by the contract checks
    as the function call it travels upstream as; any other item as it is."""
    if item.get("type") != "custom_tool_call":
        return item
    ResponseCustomToolCall.model_validate(item)
    return {
        "type": "function_call",
        "id": item["id"],
        "call_id": item["call_id"],
        "name": item["name"],
        "arguments": item["input"],
        "status": item["status"],
    }


def assert_valid_event(event: dict[str, Any]) -> None:
    if event["type"] in _OPENAI_EVENTS:
        _OPENAI_EVENTS[event["type"]].model_validate(event)
        return
    if event.get("item", {}).get("type") in _HOSTED_ITEMS:
        _HOSTED_ITEMS[event["item"]["type"]].model_validate(event["item"])
        _ITEM_EVENTS[event["type"]].model_validate(event)
        return
    if "item" in event:
        event = {**event, "item": _contract_view(event["item"])}
    if "response" in event:
        event = {**event, "response": _response_view(event["response"])}
    schema_name = _event_schemas().get(event["type"])
    assert schema_name is not None, f"event type {event['type']!r} is not in the contract"
    _fail_on_errors(f"event {event['type']}", event, schema_name)


def check_stream(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Validate a whole stream and return the response folded from its events."""
    assert events, "empty stream"
    for event in events:
        assert_valid_event(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events))), "sequence numbers"
    assert events[0]["type"] == "response.created", "first event must be response.created"
    assert events[0]["response"]["output"] == [], "response.created must have empty output"
    terminals = [i for i, e in enumerate(events) if e["type"] in TERMINAL]
    assert len(terminals) == 1, f"expected exactly one terminal event, got {len(terminals)}"
    assert terminals[0] == len(events) - 1, "the terminal event must be last"
    errors = [i for i, e in enumerate(events) if e["type"] == "error"]
    if errors:
        assert events[-1]["type"] == "response.failed", "an error event must end in failed"

    folded = copy.deepcopy(events[0]["response"])
    output: list[dict[str, Any]] = folded["output"]
    done_items: dict[int, dict[str, Any]] = {}
    open_parts: set[tuple[str, str, int]] = set()
    for event in events[1:]:
        kind = event["type"]
        if kind == "response.output_item.added":
            assert event["output_index"] == len(output), "output_index must grow by one"
            output.append(copy.deepcopy(event["item"]))
            continue
        if "output_index" not in event:
            continue
        index = event["output_index"]
        assert index < len(output), f"{kind} refers to an item never added"
        assert index not in done_items, f"{kind} after output_item.done of item {index}"
        item = output[index]
        if "item_id" in event:
            assert event["item_id"] == item["id"], f"{kind} item_id does not match output_index"
        if kind == "response.output_item.done":
            assert event["item"]["id"] == item["id"], "output_item.done changed the item id"
            assert not any(p[0] == item["id"] for p in open_parts), "item done with a part open"
            output[index] = copy.deepcopy(event["item"])
            done_items[index] = event["item"]
        elif kind in ("response.content_part.added", "response.reasoning_summary_part.added"):
            field = "content" if "content_index" in event else "summary"
            position = event.get("content_index", event.get("summary_index"))
            item.setdefault(field, [])
            assert position == len(item[field]), f"{kind} index must grow by one"
            item[field].append(copy.deepcopy(event["part"]))
            open_parts.add((item["id"], field, position))
        elif kind in ("response.content_part.done", "response.reasoning_summary_part.done"):
            field = "content" if "content_index" in event else "summary"
            position = event.get("content_index", event.get("summary_index"))
            assert (item["id"], field, position) in open_parts, f"{kind} without added"
            open_parts.discard((item["id"], field, position))
            assert item[field][position] == event["part"], f"{kind} part differs from deltas"
        elif kind == "response.output_text.annotation.added":
            notes = _part(item, event)["annotations"]
            assert event["annotation_index"] == len(notes), f"{kind} index must grow by one"
            notes.append(event["annotation"])
        elif kind.endswith(".delta"):
            _apply_delta(item, event)
        elif kind.endswith(".done"):
            _check_done(item, event)
    assert not open_parts, "content parts left open"
    assert len(done_items) == len(output), "every added item needs an output_item.done"
    final = events[-1]["response"]
    assert_valid_response(final)
    assert final["output"] == output, "terminal output differs from the streamed items"
    folded.update({k: v for k, v in final.items() if k != "output"})
    return folded


def _part(item: dict[str, Any], event: dict[str, Any]) -> dict[str, Any]:
    if "summary_index" in event:
        part: dict[str, Any] = item["summary"][event["summary_index"]]
    else:
        part = item["content"][event["content_index"]]
    return part


def _apply_delta(item: dict[str, Any], event: dict[str, Any]) -> None:
    kind = event["type"]
    if kind in ("response.function_call_arguments.delta", "response.mcp_call_arguments.delta"):
        item["arguments"] += event["delta"]
        return
    if kind == "response.custom_tool_call_input.delta":
        item["input"] += event["delta"]
        return
    part = _part(item, event)
    key = "refusal" if kind == "response.refusal.delta" else "text"
    part[key] += event["delta"]
    if kind == "response.output_text.delta" and event.get("logprobs") and "logprobs" in part:
        part["logprobs"].extend(event["logprobs"])


def _check_done(item: dict[str, Any], event: dict[str, Any]) -> None:
    kind = event["type"]
    if kind in ("response.function_call_arguments.done", "response.mcp_call_arguments.done"):
        assert item["arguments"] == event["arguments"], "arguments.done differs from deltas"
        return
    if kind == "response.custom_tool_call_input.done":
        assert item["input"] == event["input"], "custom_tool_call_input.done differs from deltas"
        return
    part = _part(item, event)
    if kind == "response.refusal.done":
        assert part["refusal"] == event["refusal"], "refusal.done differs from deltas"
    else:
        assert part["text"] == event["text"], f"{kind} differs from deltas"
