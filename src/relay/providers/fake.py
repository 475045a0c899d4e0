"""A deterministic provider for tests and demos: the upstream model name picks a script.

Scripts: text, tool_call, parallel_tool_calls, reasoning, refusal, error_before, error_after,
slow, length, json, unmetered (text without usage, as some servers answer), tool_loop (calls
the first offered tool, with `{}`, until the context holds as many function_call_output
items as the number in the last user message, "steps 4" (1 without one), then answers: the
server-side tool loop's benchmark). Each yields the same deltas for the same request, so
engine tests can assert exact events without a network.
Usage is countable by hand: input_tokens is the number of whitespace-separated words in the
context, output_tokens the number of pieces yielded.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from relay.models.deployments import FakeConfig
from relay.providers.base import (
    Delta,
    FinishDelta,
    ProviderError,
    ProviderRequest,
    ReasoningDelta,
    RefusalDelta,
    TextDelta,
    TokenCount,
    ToolCallDelta,
    UsageDelta,
)

SCRIPTS = frozenset(
    {
        "text",
        "tool_call",
        "parallel_tool_calls",
        "reasoning",
        "refusal",
        "error_before",
        "error_after",
        "slow",
        "length",
        "json",
        "unmetered",
        "tool_loop",
    }
)
SLOW_WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
LENGTH_TEXT = "This answer is far too long to fit in the budget it was given"
REFUSAL_TEXT = "I'm sorry, but I can't help with that."
_WORD = re.compile(r"\S+\s*")
_NUMBER = re.compile(r"\d+")


def build(config: FakeConfig) -> FakeProvider:
    return FakeProvider()


class FakeProvider:
    """Scripted by `request.upstream_model`; `slow_interval_s` only shortens the slow script."""

    def __init__(self, *, slow_interval_s: float = 0.2) -> None:
        self._slow_interval_s = slow_interval_s

    async def aclose(self) -> None:
        return None

    async def count_tokens(self, request: ProviderRequest) -> TokenCount:
        # Exact by this provider's own measure: its usage counts words, as here.
        return TokenCount(count_context_words(request), exact=True)

    async def count_text(self, text: str) -> TokenCount:
        return TokenCount(len(text.split()), exact=True)

    async def open(self, request: ProviderRequest) -> AsyncIterator[Delta]:
        script = request.upstream_model
        if script not in SCRIPTS:
            raise ProviderError(
                f"the fake provider has no script named '{script}'; "
                f"known: {', '.join(sorted(SCRIPTS))}",
                status=400,
                code="upstream_invalid_request",
                retryable=False,
            )
        if script == "error_before":
            raise ProviderError("the fake upstream is unavailable", status=503, retryable=True)
        tool_script = script in ("tool_call", "parallel_tool_calls")
        if tool_script and request.tool_choice == "none":
            script = "text"  # a model told not to call tools answers in words
        return _Run(request, self._slow_interval_s).deltas(script)


class _Run:
    """One scripted answer; counts what it yields so the usage it reports is exact."""

    def __init__(self, request: ProviderRequest, slow_interval_s: float) -> None:
        self.request = request
        self.slow_interval_s = slow_interval_s
        self.pieces = 0
        self.reasoning_pieces = 0

    async def deltas(self, script: str) -> AsyncGenerator[Delta, None]:
        steps: dict[str, Any] = {
            "text": self._text,
            "tool_call": self._tool_calls,
            "parallel_tool_calls": self._tool_calls,
            "reasoning": self._reasoning,
            "refusal": self._refusal,
            "error_after": self._error_after,
            "slow": self._slow,
            "length": self._length,
            "json": self._json,
            "unmetered": self._unmetered,
            "tool_loop": self._tool_loop,
        }
        async for delta in steps[script](script):
            yield delta

    def _usage(self) -> UsageDelta:
        return UsageDelta(
            input_tokens=count_context_words(self.request),
            output_tokens=self.pieces,
            reasoning_tokens=self.reasoning_pieces,
        )

    def _text_delta(self, piece: str) -> TextDelta:
        self.pieces += 1
        logprobs = None
        if self.request.want_logprobs:
            logprobs = [_logprob(piece, -0.25, self.request.request.top_logprobs or 0)]
        return TextDelta(piece, logprobs)

    def _words(self, text: str) -> list[TextDelta]:
        return [self._text_delta(word) for word in _WORD.findall(text)]

    async def _text(self, _: str) -> AsyncGenerator[Delta, None]:
        for delta in self._words(reply_text(self.request)):
            yield delta
        yield self._usage()
        yield FinishDelta("stop")

    async def _unmetered(self, _: str) -> AsyncGenerator[Delta, None]:
        for delta in self._words(reply_text(self.request)):
            yield delta
        yield FinishDelta("stop")

    async def _tool_calls(self, script: str) -> AsyncGenerator[Delta, None]:
        name = _tool_name(self.request)
        cities = ["Paris"]
        if script == "parallel_tool_calls" and self.request.parallel_tool_calls:
            cities.append("Tokyo")
        for index, city in enumerate(cities):
            # No call_id: the engine must mint one, as it does for upstreams that omit it.
            yield ToolCallDelta(index=index, name=name)
            for chunk in ('{"location": ', f'"{city[:3]}', f'{city[3:]}"}}'):
                self.pieces += 1
                yield ToolCallDelta(index=index, arguments=chunk)
        yield self._usage()
        yield FinishDelta("tool_calls")

    async def _tool_loop(self, _: str) -> AsyncGenerator[Delta, None]:
        context = self.request.context()
        number = _NUMBER.search(last_user_text(context))
        wanted = int(number.group()) if number else 1
        done = sum(1 for item in context if item.get("type") == "function_call_output")
        # A turn offered no tools (the loop's last step, tool_choice "none") answers instead.
        if done < wanted and self.request.tools and self.request.tool_choice != "none":
            yield ToolCallDelta(index=0, name=_tool_name(self.request))
            self.pieces += 1
            yield ToolCallDelta(index=0, arguments="{}")
            yield self._usage()
            yield FinishDelta("tool_calls")
            return
        for delta in self._words(f"Done after {done} tool calls."):
            yield delta
        yield self._usage()
        yield FinishDelta("stop")

    async def _reasoning(self, _: str) -> AsyncGenerator[Delta, None]:
        for piece in ("Let me ", "think."):
            self.pieces += 1
            self.reasoning_pieces += 1
            yield ReasoningDelta(piece)
        for delta in self._words(reply_text(self.request)):
            yield delta
        yield self._usage()
        yield FinishDelta("stop")

    async def _refusal(self, _: str) -> AsyncGenerator[Delta, None]:
        for piece in _WORD.findall(REFUSAL_TEXT):
            self.pieces += 1
            yield RefusalDelta(piece)
        yield self._usage()
        yield FinishDelta("stop")

    async def _error_after(self, _: str) -> AsyncGenerator[Delta, None]:
        for delta in self._words("Partial answer before the failure "):
            yield delta
        raise ProviderError("the fake upstream dropped the stream", status=502, retryable=True)

    async def _slow(self, _: str) -> AsyncGenerator[Delta, None]:
        # asyncio.sleep is where a cancelled run stops; nothing here swallows CancelledError.
        for position, word in enumerate(SLOW_WORDS):
            await asyncio.sleep(self.slow_interval_s)
            yield self._text_delta(word if position == len(SLOW_WORDS) - 1 else word + " ")
        yield self._usage()
        yield FinishDelta("stop")

    async def _length(self, _: str) -> AsyncGenerator[Delta, None]:
        for word in _WORD.findall(LENGTH_TEXT)[:8]:  # cut short, as a token budget would
            yield self._text_delta(word)
        yield self._usage()
        yield FinishDelta("length")

    async def _json(self, _: str) -> AsyncGenerator[Delta, None]:
        text = json.dumps(json_answer(self.request))
        for start in range(0, len(text), 8):
            yield self._text_delta(text[start : start + 8])
        yield self._usage()
        yield FinishDelta("stop")


def reply_text(request: ProviderRequest) -> str:
    """The text scripts' answer: the last user text, echoed."""
    said = last_user_text(request.context())
    return f"You said: {said}" if said else "You said nothing."


def last_user_text(items: list[dict[str, Any]]) -> str:
    for item in reversed(items):
        if item.get("type", "message") == "message" and item.get("role") == "user":
            return _text_of(item.get("content"))
    return ""


def count_context_words(request: ProviderRequest) -> int:
    """Words in everything a chat upstream would read: instructions, messages, calls, outputs."""
    texts = [request.instructions or ""]
    for item in request.context():
        kind = item.get("type", "message")
        if kind == "message":
            texts.append(_text_of(item.get("content")))
        elif kind == "function_call":
            texts.append(f"{item.get('name', '')} {item.get('arguments', '')}")
        elif kind == "function_call_output":
            texts.append(_text_of(item.get("output")))
    return sum(len(text.split()) for text in texts)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for part in content or ():
        if isinstance(part, dict):
            parts.append(str(part.get("text") or part.get("refusal") or ""))
    return " ".join(p for p in parts if p)


def _tool_name(request: ProviderRequest) -> str:
    choice = request.tool_choice  # "auto" | "none" | "required" | {"name": ...}
    if isinstance(choice, dict) and choice.get("name"):
        return choice["name"]
    for tool in request.tools:
        if tool.get("name"):
            return str(tool["name"])
    return "get_weather"


def _logprob(token: str, logprob: float, top: int) -> dict[str, Any]:
    alternatives = [(token, logprob)] + [(f"alt{i}", logprob - i) for i in range(1, top)]
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in alternatives[:top]
        ],
    }


def json_answer(request: ProviderRequest) -> Any:
    """A value satisfying the json_schema format when that is easy, else {"ok": true}."""
    text = request.request.text
    fmt = text.format if text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        value = _example(fmt.schema_, depth=0)
        if isinstance(value, dict):
            return value
    return {"ok": True}


_MISSING = object()


def _example(schema: Any, depth: int) -> Any:
    """A minimal instance of simple schemas; `_MISSING` for anything that needs real reasoning."""
    if not isinstance(schema, dict) or depth > 8:
        return _MISSING
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        out = {}
        for name, sub in (schema.get("properties") or {}).items():
            value = _example(sub, depth + 1)
            if value is _MISSING:
                return _MISSING
            out[name] = value
        return out
    if kind == "array":
        minimum = int(schema.get("minItems") or 0)
        item = _example(schema.get("items", {"type": "string"}), depth + 1)
        return _MISSING if item is _MISSING else [item] * minimum
    if kind == "string":
        if "pattern" in schema or "format" in schema:
            return _MISSING
        return "x" * max(int(schema.get("minLength") or 0), 1)
    if kind in ("integer", "number"):
        value = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
        value = min(value, schema.get("maximum", value))
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return _MISSING
