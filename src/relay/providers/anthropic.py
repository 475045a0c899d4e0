"""Provider for Anthropic's Messages API (`POST /v1/messages`, streamed).

Request: instructions and system/developer messages become the `system` prompt (Messages has
no system turns; they join in order); runs of assistant-side items (text, tool calls, thinking)
become one assistant message and tool outputs the user message after it, as Messages wants
turns to alternate. Reasoning items go back as thinking blocks only when Relay sealed an
Anthropic signature in them (a redacted block as it came); others are left out, since
Messages refuses unsigned thinking. `reasoning.effort` turns thinking on with a budget from
the deployment's `thinking_budgets`. JSON output is a forced tool whose input is the schema
(`json_output = "tool"`, every Claude model) whose input streams back as the answer's text, or
`output_config.format` (`"native"`). Prompt caching puts cache breakpoints on the tools, the
system prompt and the latest turn (`prompt_caching`).

Stream: content blocks to deltas; a thinking block's signature and a redacted block become
`ReasoningState`, which Relay seals into the reasoning item; `max_tokens` ends incomplete,
`refusal` adds refusal content; usage counts cache reads as cached tokens and cache writes as
`cache_write_tokens`, both inside input_tokens as the Responses API counts them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson

from relay.models.deployments import AnthropicConfig
from relay.protocol import HOSTED_ITEM_TYPES, TOOL_SEARCH_ITEM_TYPES
from relay.providers import images
from relay.providers.base import (
    Delta,
    FinishDelta,
    FinishReason,
    ProviderError,
    ProviderRequest,
    ReasoningDelta,
    ReasoningState,
    RefusalDelta,
    TextDelta,
    TokenCount,
    ToolCallDelta,
    UsageDelta,
    estimated_tokens,
)
from relay.providers.tool_names import search_as_function, wire_name
from relay.providers.upstream import Upstream

KIND = "anthropic"
JSON_TOOL = "json_output"
REFUSAL_TEXT = "The model declined to continue this response."
# Messages wants its first message from the user; a history that opens with the assistant (a
# replayed transcript, an answer's commentary given back before the question) gets this turn
# before it. Neutral text: it is not an instruction, only the place where the user's turn was.
OPENING_TURN = {"role": "user", "content": [{"type": "text", "text": "(continued)"}]}
DEFAULT_BUDGET = 8192  # thinking tokens for an effort the deployment's thinking_budgets lacks
_STOP: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "stop",
}
# Mid-stream error types (the body's error.type) and the HTTP status they stand for.
_ERROR_STATUS = {
    "overloaded_error": 529,
    "rate_limit_error": 429,
    "api_error": 500,
    "invalid_request_error": 400,
    "request_too_large": 413,
}
# Request fields Messages has no counterpart for: refused, never dropped.
_UNSUPPORTED = ("presence_penalty", "frequency_penalty", "seed", "top_logprobs")
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)", re.DOTALL)


def build(config: AnthropicConfig) -> AnthropicProvider:
    return AnthropicProvider(config)


def _refuse(what: str, param: str | None = None) -> ProviderError:
    return ProviderError(
        f"{what} cannot be sent to an Anthropic upstream",
        status=400,
        code="unsupported_parameter" if param else "unsupported_input",
        retryable=False,
        param=param,
    )


class AnthropicProvider:
    def __init__(self, config: AnthropicConfig) -> None:
        self._config = config
        headers = {"anthropic-version": config.anthropic_version, **config.headers}
        self._upstream = Upstream(
            config.base_url,
            api_key=config.api_key(),
            key_header="x-api-key",
            extra_headers=headers,
            timeout_s=config.timeout_s,
            max_connections=config.max_connections,
            deployment=config.label,
            key_env=config.api_key_env,
        )

    async def aclose(self) -> None:
        await self._upstream.aclose()

    async def list_models(self) -> Any:
        """The upstream's models list (`/v1/models`), for `relay check`."""
        return await self._upstream.ask(self._upstream.target("/v1/models"))

    async def count_tokens(self, request: ProviderRequest) -> TokenCount:
        """Messages' own count (`/v1/messages/count_tokens`): exact."""
        return await self._upstream.count_tokens(
            "/v1/messages/count_tokens",
            self.build_body(request),
            ("model", "messages", "system", "tools", "tool_choice", "thinking"),
        )

    async def count_text(self, text: str) -> TokenCount:
        return estimated_tokens(text)  # the upstream counts only whole requests

    async def open(self, request: ProviderRequest) -> AsyncIterator[Delta]:
        body = self.build_body(request)
        offered = {tool["name"] for tool in body.get("tools", ())}
        name = _json_tool(request)
        json_tool = name if name in offered else None
        response = await self._upstream.post(
            self._upstream.target("/v1/messages"), orjson.dumps(body)
        )
        return await self._upstream.stream(response, self._check, _StreamState(json_tool))

    # Request translation ------------------------------------------------------------------------

    def build_body(self, request: ProviderRequest) -> dict[str, Any]:
        req = request.request
        config = self._config
        for name in _UNSUPPORTED:
            if getattr(req, name) is not None:
                raise _refuse(f"'{name}'", name)
        if request.want_logprobs:
            raise _refuse("logprobs", "include")
        if req.text is not None and req.text.verbosity is not None:
            raise _refuse("'text.verbosity'", "text.verbosity")
        system, messages = _messages(request)
        if request.instructions:
            system.insert(0, request.instructions)
        max_tokens = req.max_output_tokens or config.default_max_output_tokens
        body: dict[str, Any] = {
            "model": request.upstream_model,
            "max_tokens": max_tokens,
            "messages": messages,
            "stream": True,
        }
        if system:
            body["system"] = [{"type": "text", "text": "\n\n".join(system)}]
        tools = [_tool(tool) for tool in request.tools]
        choice: dict[str, Any] | None = None
        if tools:
            choice = _tool_choice(request.tool_choice)
        elif request.tool_choice == "none" and request.all_tools:
            # Offered, but not to be called: Messages wants the definitions of the tools that
            # earlier turns called, and has a choice for exactly this.
            tools = [_tool(tool) for tool in request.all_tools]
            choice = {"type": "none"}
        fmt = req.text.format if req.text is not None else None
        json_tool = _json_tool(request)
        if fmt is not None and fmt.type in ("json_schema", "json_object"):
            schema = fmt.schema_ if fmt.type == "json_schema" else {"type": "object"}
            if config.json_output == "native":
                body["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
            else:
                tools.append(
                    {
                        "name": json_tool,
                        "description": "Give the final answer as this tool's input.",
                        "input_schema": schema,
                    }
                )
                if choice is None:  # no tools of the client's: the answer is the JSON
                    choice = {"type": "tool", "name": json_tool}
        if tools:
            body["tools"] = tools
        effort = request.reasoning_effort
        # A tool loop that began without Anthropic's thinking (on another provider, or with
        # reasoning off) must go on without it: Messages wants the turn whose calls are
        # answered to open with its signed thinking.
        thinking = effort not in (None, "none") and _thinking_may_continue(messages)
        if thinking:
            assert effort is not None
            budget = config.thinking_budgets.get(effort) or DEFAULT_BUDGET
            if req.max_output_tokens is None:
                body["max_tokens"] = max_tokens = max_tokens + budget
            budget = min(budget, max_tokens - 1)
            if budget < 1024:
                raise _refuse(
                    f"reasoning with max_output_tokens {max_tokens} (Anthropic's thinking "
                    "needs a budget of at least 1,024 tokens below it)",
                    "max_output_tokens",
                )
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
            if req.temperature is not None and req.temperature != 1:
                raise _refuse("'temperature' other than 1 with reasoning", "temperature")
            if req.top_k is not None:
                raise _refuse("'top_k' with reasoning", "top_k")
            if req.top_p is not None and req.top_p < 0.95:
                raise _refuse("'top_p' below 0.95 with reasoning", "top_p")
            if choice == {"type": "tool", "name": json_tool}:
                # Thinking cannot be combined with a forced tool: the JSON tool is offered,
                # and its input is still the answer when the model calls it.
                choice = {"type": "auto"}
            elif choice is not None and choice["type"] in ("any", "tool"):
                raise _refuse("a forced tool choice with reasoning", "tool_choice")
        if choice is not None:
            if not request.parallel_tool_calls and choice["type"] != "none":
                choice["disable_parallel_tool_use"] = True
            body["tool_choice"] = choice
        for name in ("temperature", "top_p", "top_k"):
            value = getattr(req, name)
            if value is not None:
                body[name] = value
        user = req.safety_identifier or req.user
        if user:
            # Messages refuses user ids that look like an email or a phone number: an opaque
            # digest identifies the user as well for abuse reports.
            digest = hashlib.sha256(user.encode()).hexdigest()[:32]
            body["metadata"] = {"user_id": digest}
        if req.service_tier is not None:
            tiers = {"auto": "auto", "default": "standard_only"}
            if req.service_tier not in tiers:
                raise _refuse(f"service_tier '{req.service_tier}'", "service_tier")
            body["service_tier"] = tiers[req.service_tier]
        if config.prompt_caching == "auto" or (
            config.prompt_caching == "key" and req.prompt_cache_key
        ):
            _cache_breakpoints(body)
        return body

    # Stream translation -------------------------------------------------------------------------

    def _check(self, event: Any) -> None:
        """Raise the failure an event reports (an `error` event)."""
        if not isinstance(event, dict):
            raise ProviderError("the upstream sent an event that is not a JSON object")
        if event.get("type") == "error":
            raise self._error_event(event.get("error"))

    def _error_event(self, error: Any) -> ProviderError:
        kind = error.get("type") if isinstance(error, dict) else None
        status = _ERROR_STATUS.get(str(kind), 502)
        raw = orjson.dumps({"error": error})
        # The same mapping as an HTTP status: a 400 is the request's (not retried, and not
        # the deployment's failure), 429 and 529 are retried elsewhere.
        return self._upstream.status_error(status, {}, raw)


class _StreamState:
    """What one stream remembers between events: the blocks open by index, usage, stop."""

    def __init__(self, json_tool: str | None) -> None:
        self._json_tool = json_tool
        self._blocks: dict[int, dict[str, Any]] = {}
        self._input = 0
        self._cache_read = 0
        self._cache_write = 0
        self._output = 0
        self._stop: str | None = None
        self.finished = False

    def opening(self, event: dict[str, Any]) -> bool:
        return event.get("type") in ("message_start", "ping")

    def cut_short(self) -> bool:
        return not self.finished  # its terminal event is the only end

    def feed(self, event: dict[str, Any]) -> list[Delta]:
        kind = event["type"]
        if kind == "message_start":
            self._usage(event["message"].get("usage") or {})
            # The input side now, the whole at the end: a stream cut short in between is
            # charged its input exactly (its output is counted, see relay.engine.counting).
            return [self._usage_delta(output_tokens=0)]
        if kind == "content_block_start":
            return self._start(int(event["index"]), event["content_block"])
        if kind == "content_block_delta":
            return self._delta(int(event["index"]), event["delta"])
        if kind == "content_block_stop":
            index = int(event["index"])
            block = self._blocks.pop(index, {})
            if block.get("type") == "thinking":
                return [ReasoningState({"kind": KIND, "signature": block.get("signature", "")})]
            if block.get("type") == "tool_use" and not block.get("arguments"):
                return [ToolCallDelta(index=index, arguments="{}")]  # a call without input
            return []
        if kind == "message_delta":
            self._stop = (event.get("delta") or {}).get("stop_reason") or self._stop
            self._usage(event.get("usage") or {})
            return []
        if kind == "message_stop":
            self.finished = True
        return []  # ping, and event types added later

    def _usage(self, usage: dict[str, Any]) -> None:
        # message_start has the input side; message_delta's counts are cumulative.
        self._input = int(usage.get("input_tokens") or self._input)
        self._cache_read = int(usage.get("cache_read_input_tokens") or self._cache_read)
        self._cache_write = int(usage.get("cache_creation_input_tokens") or self._cache_write)
        self._output = int(usage.get("output_tokens") or self._output)

    def _start(self, index: int, block: dict[str, Any]) -> list[Delta]:
        kind = block.get("type")
        self._blocks[index] = {"type": kind}
        if kind == "redacted_thinking":
            return [ReasoningState({"kind": KIND, "redacted": block.get("data", "")})]
        if kind == "tool_use":
            if block.get("name") == self._json_tool:
                self._blocks[index]["type"] = "json"
                return []
            return [ToolCallDelta(index=index, name=block["name"], call_id=block.get("id"))]
        if kind == "text" and block.get("text"):
            return [TextDelta(block["text"])]
        if kind == "thinking" and block.get("thinking"):
            return [ReasoningDelta(block["thinking"])]
        return []

    def _delta(self, index: int, delta: dict[str, Any]) -> list[Delta]:
        kind = delta.get("type")
        block = self._blocks.get(index, {})
        if kind == "text_delta" and delta.get("text"):
            return [TextDelta(delta["text"])]
        if kind == "thinking_delta" and delta.get("thinking"):
            return [ReasoningDelta(delta["thinking"])]
        if kind == "signature_delta":
            block["signature"] = block.get("signature", "") + delta.get("signature", "")
            return []
        if kind == "input_json_delta" and delta.get("partial_json"):
            if block.get("type") == "json":
                return [TextDelta(delta["partial_json"])]
            block["arguments"] = True
            return [ToolCallDelta(index=index, arguments=delta["partial_json"])]
        return []

    def closing(self) -> list[Delta]:
        out: list[Delta] = []
        if self._stop == "refusal":
            out.append(RefusalDelta(REFUSAL_TEXT))
        out.append(self._usage_delta(self._output))
        out.append(FinishDelta(_STOP.get(self._stop or "end_turn", "stop")))
        return out

    def _usage_delta(self, output_tokens: int) -> UsageDelta:
        return UsageDelta(
            input_tokens=self._input + self._cache_read + self._cache_write,
            output_tokens=output_tokens,
            cached_tokens=self._cache_read,
            cache_write_tokens=self._cache_write,
        )


# Items -> messages ------------------------------------------------------------------------------


def _messages(request: ProviderRequest) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, messages) for the request's whole context. Consecutive items of one
    side join into one message: Messages wants user and assistant turns to alternate, and a
    turn's tool results all in the user message after its tool calls."""
    history = request.history
    if history is not None:
        # A stored chain's translation is kept with it: a long conversation costs each turn
        # its new items.
        # Kept per search function: the search items' blocks depend on it.
        key = KIND if request.search_function is None else f"{KIND}:{request.search_function}"
        translated = history.derive(key, lambda done, items: _extend(done, items, request), _EMPTY)
        system, messages = _extend(translated, request.items, request)
    else:
        system, messages = _extend(_EMPTY, request.items, request)
    # The messages are shared with the stored chain's translation: never changed in place.
    opening = [OPENING_TURN] if messages and messages[0]["role"] == "assistant" else []
    return list(system), [*opening, *messages]


_Translated = tuple[tuple[str, ...], tuple[dict[str, Any], ...]]
_EMPTY: _Translated = ((), ())


def _extend(
    done: _Translated, items: list[dict[str, Any]], request: ProviderRequest
) -> _Translated:
    system = list(done[0])
    messages = list(done[1])
    for item in items:
        kind = item.get("type", "message")
        role = item.get("role", "user")
        if kind == "message" and role in ("system", "developer"):
            system.append(_text_of(item.get("content")))
            continue
        side, blocks = _blocks(item, kind, role, request)
        if not blocks:
            continue
        if messages and messages[-1]["role"] == side:
            content = [*messages[-1]["content"], *blocks]
            if side == "user":
                # Tool results open the user turn that answers the calls (Messages' rule).
                content.sort(key=lambda block: block["type"] != "tool_result")
            messages[-1] = {"role": side, "content": content}
        else:
            messages.append({"role": side, "content": blocks})
    return tuple(system), tuple(messages)


def _blocks(
    item: dict[str, Any], kind: str, role: str, request: ProviderRequest
) -> tuple[str, list[dict[str, Any]]]:
    if kind == "message" and role == "assistant":
        text = _text_of(item.get("content"))
        return "assistant", [{"type": "text", "text": text}] if text else []
    if kind == "message":
        return "user", _user_blocks(item.get("content"))
    if kind in ("function_call", "custom_tool_call"):
        name = item["name"]
        if item.get("namespace"):
            name = wire_name(item["namespace"], name)
        if kind == "custom_tool_call":
            arguments: Any = {"input": item["input"]}
        else:
            try:
                arguments = orjson.loads(item["arguments"] or "{}")
            except orjson.JSONDecodeError:
                raise _refuse("a function_call whose arguments are not JSON") from None
        if not isinstance(arguments, dict):
            raise _refuse("a function_call whose arguments are not a JSON object")
        return "assistant", [
            {"type": "tool_use", "id": item["call_id"], "name": name, "input": arguments}
        ]
    if kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output")
        content: Any = output if isinstance(output, str) else _user_blocks(output)
        return "user", [{"type": "tool_result", "tool_use_id": item["call_id"], "content": content}]
    if kind == images.ITEM:  # not the image (relay.providers.images)
        return "assistant", [{"type": "text", "text": images.reference(item)}]
    if kind in HOSTED_ITEM_TYPES:
        return "assistant", []  # an upstream's hosted call: its results are in the text
    if kind in TOOL_SEARCH_ITEM_TYPES:
        # A search the model was offered (the client runs it): its tool_use and tool_result.
        # Any other never reached the model: the tools it loaded are offered in full
        # (plan_tools), as if there all along (chat_messages does the same).
        as_function = search_as_function(item, request.search_function)
        if as_function is None:
            return "assistant", []
        return _blocks(as_function, as_function["type"], role, request)
    if kind == "reasoning":
        state = request.state_of(item)
        if state is None or state.get("kind") != KIND:
            return "assistant", []  # not Anthropic's: Messages takes no unsigned thinking
        if "redacted" in state:
            return "assistant", [{"type": "redacted_thinking", "data": state["redacted"]}]
        # The text as streamed: content, or the summary when the client asked for one.
        parts = item.get("content") or item.get("summary") or ()
        text = "".join(part.get("text") or "" for part in parts)
        return "assistant", [
            {"type": "thinking", "thinking": text, "signature": state.get("signature", "")}
        ]
    raise _refuse(f"input item type '{kind}'")


def _thinking_may_continue(messages: list[dict[str, Any]]) -> bool:
    """Whether the request may turn thinking on: not when it answers tool calls of a tool
    loop whose first assistant message does not open with thinking (Messages keeps one
    thinking setting for the whole assistant turn, tool results included)."""

    def answers_calls(message: dict[str, Any]) -> bool:
        return any(block["type"] == "tool_result" for block in message["content"])

    if not messages or messages[-1]["role"] != "user" or not answers_calls(messages[-1]):
        return True
    opening: dict[str, Any] | None = None
    for message in reversed(messages[:-1]):
        if message["role"] == "assistant":
            opening = message
        elif not answers_calls(message):
            break  # the user's own turn: the loop began after it
    if opening is None:
        return True
    first = opening["content"][0] if opening["content"] else {}
    return first.get("type") in ("thinking", "redacted_thinking")


def _json_tool(request: ProviderRequest) -> str:
    """The name of the tool that carries JSON output: JSON_TOOL, unless a tool of the
    client's has that name."""
    taken = {tool["name"] for tool in (*request.tools, *request.all_tools)}
    name = JSON_TOOL
    while name in taken:
        name = f"relay_{name}"
    return name


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    pieces = []
    for part in content or ():
        pieces.append(part.get("refusal") if part.get("type") == "refusal" else part.get("text"))
    return "".join(piece or "" for piece in pieces)


def _user_blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return [_user_block(part) for part in content or ()]


def _user_block(part: dict[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": part.get("text", "")}
    if kind == "input_image" and part.get("image_url"):
        return {"type": "image", "source": _source(part["image_url"])}
    if kind == "input_file" and part.get("file_data"):
        data = part["file_data"]
        if not _DATA_URL.match(data):
            data = f"data:application/pdf;base64,{data}"
        return {"type": "document", "source": _source(data)}
    if kind == "input_file" and part.get("file_url"):
        return {"type": "document", "source": _source(part["file_url"])}
    if kind in ("input_image", "input_file"):
        raise _refuse(f"an {kind} part given by file_id (send it inline or by URL)")
    raise _refuse(f"content part type '{kind}'")


def _source(url: str) -> dict[str, Any]:
    match = _DATA_URL.match(url)
    if match is None:
        return {"type": "url", "url": url}
    media_type, data = match["type"], match["data"]
    if media_type == "text/plain":
        try:
            text = base64.b64decode(data, validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            raise _refuse("a text/plain file whose data is not base64") from None
        return {"type": "text", "media_type": media_type, "data": text}
    return {"type": "base64", "media_type": media_type, "data": data}


# Tools and caching ------------------------------------------------------------------------------


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    # The engine offers function tools only (relay.engine.checks.plan_tools).
    out: dict[str, Any] = {
        "name": tool["name"],
        "input_schema": tool.get("parameters") or {"type": "object", "properties": {}},
    }
    if tool.get("description"):
        out["description"] = tool["description"]
    return out


def _tool_choice(choice: str | dict[str, str]) -> dict[str, Any]:
    if isinstance(choice, dict):
        return {"type": "tool", "name": choice["name"]}
    return {"type": {"auto": "auto", "none": "none", "required": "any"}[choice]}


def _cache_breakpoints(body: dict[str, Any]) -> None:
    """Cache the tools, the system prompt and the conversation up to its latest turn: each
    turn of an agent loop then reads the prefix the previous one wrote (Messages allows four
    breakpoints; these are three)."""
    ephemeral = {"type": "ephemeral"}
    if body.get("tools"):
        body["tools"][-1] = {**body["tools"][-1], "cache_control": ephemeral}
    if body.get("system"):
        body["system"][-1] = {**body["system"][-1], "cache_control": ephemeral}
    messages = body["messages"]
    if messages and messages[-1]["content"]:
        # A new last message (the translation it came from is kept with the chain).
        *before, last = messages[-1]["content"]
        content = [*before, {**last, "cache_control": ephemeral}]
        messages[-1] = {**messages[-1], "content": content}
