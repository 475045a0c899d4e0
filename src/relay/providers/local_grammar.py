"""Constrained decoding for the embedded model: what it may write, as a llama.cpp grammar.

A small model cannot be trusted to follow a format, so the format is enforced token by token:
- text.format json_schema / json_object: the answer is JSON matching the schema;
- tools offered: the answer is either text or a JSON array of calls
  `[{"name": ..., "arguments": {...}}]`, each call's arguments matching that tool's parameters;
  tool_choice required or a forced function leaves only the array; parallel_tool_calls false
  allows one call.
The grammar is built from JSON Schema by llama.cpp's own converter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf

from relay.protocol import TextFormatJsonObject, TextFormatJsonSchema
from relay.providers.base import ProviderRequest

# Free text that cannot be mistaken for a call array: anything not starting with "[". The rule
# name is one the schema converter never makes (it derives names from property names + "-kv").
_FREE_TEXT = "relay-free-text ::= [^\\[\\x00] [^\\x00]*"
_ANY_OBJECT: dict[str, Any] = {"type": "object"}
# A small model, free to add calls, rarely stops adding them: the array is capped unless the
# request sets max_tool_calls.
MAX_PARALLEL_CALLS = 4


@dataclass(slots=True, frozen=True)
class DecodingPlan:
    grammar: str | None  # GBNF, or None for unconstrained text
    tool_prompt: str | None  # what the system message must say about tools
    calls_possible: bool  # the answer may be a call array


def _format_schema(request: ProviderRequest) -> dict[str, Any] | None:
    text = request.request.text
    fmt = text.format if text is not None else None
    if isinstance(fmt, TextFormatJsonSchema):
        return fmt.schema_
    if isinstance(fmt, TextFormatJsonObject):
        return _ANY_OBJECT
    return None


def _gbnf(schema: dict[str, Any]) -> str:
    grammar: str = json_schema_to_gbnf(json.dumps(schema))
    return grammar


def _calls_schema(request: ProviderRequest) -> dict[str, Any]:
    one_call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool["name"]},
                    "arguments": tool.get("parameters") or _ANY_OBJECT,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for tool in request.tools
        ]
    }
    if not request.parallel_tool_calls:
        limit = 1
    else:
        limit = request.request.max_tool_calls or MAX_PARALLEL_CALLS
    return {"type": "array", "items": one_call, "minItems": 1, "maxItems": limit}


def tool_prompt(tools: list[dict[str, Any]], must_call: bool) -> str:
    listed = json.dumps(
        [{k: tool.get(k) for k in ("name", "description", "parameters")} for tool in tools]
    )
    how = 'To call functions, answer with only a JSON array: [{"name": ..., "arguments": {...}}].'
    when = " You must call a function." if must_call else " Otherwise answer in plain text."
    return f"You can call these functions:\n{listed}\n{how}{when}"


class UnsupportedSchema(Exception):
    """A valid JSON Schema that llama.cpp's converter cannot turn into a grammar."""

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(detail)
        self.param = param


def plan(request: ProviderRequest) -> DecodingPlan:
    try:
        return _plan(request)
    except Exception as error:  # the converter asserts and raises ValueError on what it lacks
        raise UnsupportedSchema(
            _unconvertible(request), str(error) or type(error).__name__
        ) from None


def _unconvertible(request: ProviderRequest) -> str:
    """The request field whose schema the converter fails on (looked for after a failure)."""
    declared = [tool.get("name") for tool in request.request.tools or []]
    schemas = [
        (
            # A namespace's function goes by another name upstream: named by its namespace.
            # (A custom tool's schema comes from its grammar format.)
            f"tools[{declared.index(tool['name'])}]."
            + ("format" if tool.get("grammar") else "parameters")
            if tool["name"] in declared
            else "tools",
            tool.get("parameters"),
        )
        for tool in request.tools
    ]
    schemas.append(("text.format.schema", _format_schema(request)))
    for param, schema in schemas:
        if schema is None:
            continue
        try:
            _gbnf(schema)
        except Exception:
            return param
    return "tools"


def _plan(request: ProviderRequest) -> DecodingPlan:
    answer_schema = _format_schema(request)
    if not request.tools or request.tool_choice == "none":
        grammar = _gbnf(answer_schema) if answer_schema is not None else None
        return DecodingPlan(grammar, None, calls_possible=False)
    must_call = request.tool_choice != "auto"
    prompt = tool_prompt(request.tools, must_call)
    calls = _calls_schema(request)
    if must_call:
        return DecodingPlan(_gbnf(calls), prompt, calls_possible=True)
    if answer_schema is not None:
        # One schema, converted once, so that the two branches share their helper rules.
        return DecodingPlan(_gbnf({"anyOf": [calls, answer_schema]}), prompt, True)
    # A call array or free text: the array's grammar with a second branch for text.
    lines = _gbnf(calls).splitlines()
    renamed = [
        ("relay-calls ::=" + line[len("root ::=") :]) if line.startswith("root ::=") else line
        for line in lines
    ]
    grammar = "\n".join(["root ::= relay-calls | relay-free-text", *renamed, _FREE_TEXT])
    return DecodingPlan(grammar, prompt, calls_possible=True)


def parse_calls(text: str) -> list[dict[str, str]] | None:
    """The complete calls of an answer that the grammar made a call array (None for a text
    answer). When max_output_tokens cut the array, the calls before the cut are kept: each
    call is atomic, and a half-written one is of no use to anybody."""
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return None
    decoder = json.JSONDecoder()
    calls, position = [], 1
    while True:
        while position < len(stripped) and stripped[position] in " \t\n\r,":
            position += 1
        try:
            call, position = decoder.raw_decode(stripped, position)
        except json.JSONDecodeError:
            break
        calls.append({"name": call["name"], "arguments": json.dumps(call["arguments"])})
    return calls
