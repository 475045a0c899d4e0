"""A loopback upstream that speaks Anthropic's Messages API, scripted by the requested model.

`AnthropicUpstream` runs a Starlette app under uvicorn in a background thread on 127.0.0.1
(`POST /v1/messages`, streamed or not, `POST /v1/messages/count_tokens` and `GET /v1/models`,
the scripted models) and records every
JSON body it receives (`requests`, with the path of each in `paths`; `headers`: lower-cased
headers), so a test can assert exactly what Relay sent upstream. The `anthropic_upstream`
fixture (session scope) starts one with the API key `ANTHROPIC_KEY`, sent as `x-api-key`; tests
that need another set-up use the class as a context manager. `base_url` stops before /v1.

Requests are checked as the real API checks them, and refused with a 400 invalid_request_error
that says why: the header `anthropic-version`; no unknown top-level field; `model`,
`max_tokens` (>= 1) and a non-empty `messages` that opens with a user turn; content blocks of a
known type for their role, text blocks with some non-blank text; `system` as a string or a list
of text blocks; tool names; every `tool_result` answering a `tool_use` of the assistant turn
just before it, and every such `tool_use` answered; `thinking` (a budget of at least 1,024,
below `max_tokens`; no temperature but 1 and no forced tool with it). With thinking enabled,
the assistant turn whose tool calls the last user turn answers must open with its `thinking`
block (whose `signature`, an HMAC of its text under a secret of this process, must verify) or
with a `redacted_thinking` block this process issued, and every thinking block sent must verify.

Usage: a token is a word of the system prompt and of the messages' text (text blocks and
tool_result contents); `count_tokens` answers the same number. A body with `cache_control`
anywhere reports that prompt cached but one token: created the first time its prefix (up to
the last breakpoint) is seen by this instance, read afterwards. Models (scripts):

  echo            one text block: the last user turn's text
  tools           a tool_use of the forced tool (tool_choice "tool"), else of the first tool,
                  its input filled from the input_schema (string "Paris", number 21, boolean
                  true, array [], object {}; an enum's first value), streamed in 3 pieces;
                  "The tool said: <results>" once the last user turn holds tool_results;
                  "no tools" with tool_choice "none"; echo when no tool is offered
  parallel        tools, but two tool_use blocks (the first two tools) unless tool_choice
                  forces one tool or sets disable_parallel_tool_use
  thinking        needs thinking enabled; a signed thinking block "Let me think about <last
                  user words>." (two thinking_delta pieces, one signature_delta), then tools
  redacted        thinking, with a redacted_thinking block before the thinking block
  searcher        a client-run tool search's model (offered first, as the search): a tool_use
                  of it; given its tool_result, a tool_use of the last tool (one the search
                  loaded); given that one's, "The tool said: <results>" (inputs as in tools)
  length          "partial answer", stop_reason "max_tokens"
  refusal         "I can't help with that.", stop_reason "refusal"
  error_mid       some text, then an `error` event (overloaded_error) and the end of the
                  stream; unstreamed, an HTTP 529
  overloaded      HTTP 529 overloaded_error
  prompt_too_long HTTP 400 "prompt is too long: 250000 tokens > 200000 maximum"
  slow_headers    waits 1 s before answering, then echo
  http_NNN        HTTP status NNN with Anthropic's error type for it (429 adds retry-after: 7)
Any other model is a 404 not_found_error. A bad x-api-key gets a 401 whose message repeats the
key received, whole, to prove that Relay never passes an upstream's words about keys on.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from loopback_server import LoopbackServer, serve_forever
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    "ANTHROPIC_KEY",
    "ANTHROPIC_MODELS",
    "AnthropicUpstream",
    "anthropic_upstream",
    "sign_thinking",
]

# Random, as real keys are (a fragment of a key is scrubbed wherever it appears in upstream text).
ANTHROPIC_KEY = "sk-ant-lb-3Rk8wQ2mZ7vN4pX9tL1cB6yH0dF5gJs"
ANTHROPIC_MODELS = [
    "echo",
    "tools",
    "parallel",
    "thinking",
    "redacted",
    "searcher",
    "length",
    "refusal",
    "error_mid",
    "overloaded",
    "prompt_too_long",
    "slow_headers",
]
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
# Top-level fields the real API knows; any other is refused, as it is there.
MESSAGES_FIELDS = {
    "model",
    "messages",
    "max_tokens",
    "system",
    "metadata",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    "container",
    "mcp_servers",
    "context_management",
    "output_config",
    "output_format",
}
COUNT_TOKENS_FIELDS = {
    "model",
    "messages",
    "system",
    "tools",
    "tool_choice",
    "thinking",
    "mcp_servers",
    "context_management",
    "output_config",
    "output_format",
}
_USER_BLOCKS = {"text", "image", "document", "search_result", "tool_result", "container_upload"}
_ASSISTANT_BLOCKS = {
    "text",
    "thinking",
    "redacted_thinking",
    "tool_use",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "mcp_tool_use",
    "mcp_tool_result",
}
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_WORD = re.compile(r"\S+\s*")
# Signs thinking text and redacted_thinking data; new in every test process, as a real
# upstream's keys are unknown to the client.
_SECRET = secrets.token_bytes(32)
_REDACTED_TAG = b"loopback-redacted:"


class _Invalid(Exception):
    """A request the real API would refuse with a 400 invalid_request_error."""


def sign_thinking(thinking: str) -> str:
    """The signature this process gives (and accepts for) a thinking block with this text."""
    digest = hmac.new(_SECRET, thinking.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def _redacted_data() -> str:
    nonce = secrets.token_bytes(24)
    mac = hmac.new(_SECRET, _REDACTED_TAG + nonce, hashlib.sha256).digest()
    return base64.b64encode(nonce + mac).decode()


def _redacted_ok(data: Any) -> bool:
    try:
        raw = base64.b64decode(str(data), validate=True)
    except ValueError:
        return False
    nonce, mac = raw[:24], raw[24:]
    expected = hmac.new(_SECRET, _REDACTED_TAG + nonce, hashlib.sha256).digest()
    return len(raw) == 56 and hmac.compare_digest(mac, expected)


def _signature_ok(block: dict[str, Any]) -> bool:
    signature, thinking = block.get("signature"), block.get("thinking")
    if not isinstance(signature, str) or not isinstance(thinking, str):
        return False
    return hmac.compare_digest(signature, sign_thinking(thinking))


class AnthropicUpstream(LoopbackServer):
    label = "Anthropic upstream"

    def __init__(self, api_key: str | None = None, port: int = 0) -> None:
        self.paths: list[str] = []
        # Hashes of the prompt prefixes cached so far (prompt caching's created/read split).
        self._cached: set[str] = set()
        routes = [
            Route("/v1/messages", self._messages, methods=["POST"]),
            Route("/v1/messages/count_tokens", self._count_tokens, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ]
        super().__init__(routes, api_key=api_key, port=port)

    def record(self, request: Request, body: dict[str, Any]) -> None:
        super().record(request, body)
        self.paths.append(request.url.path)

    def reset(self) -> None:
        super().reset()
        self.paths.clear()
        self._cached.clear()

    # Endpoints ---------------------------------------------------------------------------------

    async def _receive(self, request: Request) -> dict[str, Any] | Response:
        """The request's JSON body, recorded; or the error response the real API would give."""
        given = request.headers.get("x-api-key", "")
        if self.api_key is not None and given != self.api_key:
            # The key echoed whole, to prove that Relay never repeats an upstream's message.
            return _error(401, f"invalid x-api-key: {given}")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "The request body is not valid JSON.")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        self.record(request, body)
        if not request.headers.get("anthropic-version"):
            return _error(400, "anthropic-version: header is required")
        return body

    async def _models(self, request: Request) -> Response:
        given = request.headers.get("x-api-key", "")
        if self.api_key is not None and given != self.api_key:
            return _error(401, f"invalid x-api-key: {given}")
        data = [
            {
                "type": "model",
                "id": model,
                "display_name": model,
                "created_at": "2025-01-01T00:00:00Z",
            }
            for model in ANTHROPIC_MODELS
        ]
        return JSONResponse(
            {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
        )

    async def _messages(self, request: Request) -> Response:
        body = await self._receive(request)
        if isinstance(body, Response):
            return body
        try:
            _validate(body, count_only=False)
        except _Invalid as invalid:
            return _error(400, str(invalid))
        model = body["model"]
        if match := re.fullmatch(r"http_(\d{3})", model):
            status = int(match.group(1))
            headers = {"retry-after": "7"} if status == 429 else None
            return _error(status, f"Scripted failure {status} for model {model}.", headers)
        if model == "overloaded":
            return _error(529, "Overloaded")
        if model == "prompt_too_long":
            return _error(400, "prompt is too long: 250000 tokens > 200000 maximum")
        if model not in ANTHROPIC_MODELS:
            return _error(404, f"model: {model}")
        thinking = (body.get("thinking") or {}).get("type") == "enabled"
        if model in ("thinking", "redacted") and not thinking:
            return _error(400, "thinking required for this mock model")
        if model == "slow_headers":
            await asyncio.sleep(1.0)
        stream = bool(body.get("stream"))
        if model == "error_mid" and not stream:
            return _error(529, "Overloaded")
        blocks, stop_reason = _script(model, body)
        message = {
            "id": f"msg_lb{secrets.token_hex(12)}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": blocks,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {**self._input_usage(body), "output_tokens": _output_tokens(blocks)},
        }
        headers = {"request-id": _request_id()}
        if not stream:
            return JSONResponse(message, headers=headers)
        return StreamingResponse(
            _stream(message, cut=model == "error_mid"),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )

    async def _count_tokens(self, request: Request) -> Response:
        body = await self._receive(request)
        if isinstance(body, Response):
            return body
        try:
            _validate(body, count_only=True)
        except _Invalid as invalid:
            return _error(400, str(invalid))
        return JSONResponse(
            {"input_tokens": _input_words(body)}, headers={"request-id": _request_id()}
        )

    def _input_usage(self, body: dict[str, Any]) -> dict[str, int]:
        words = _input_words(body)
        usage = {
            "input_tokens": words,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        if not _has_cache_control(body):
            return usage
        prefix = _cache_prefix(body)
        cached = (
            "cache_read_input_tokens" if prefix in self._cached else "cache_creation_input_tokens"
        )
        self._cached.add(prefix)
        usage[cached] = words - 1
        usage["input_tokens"] = 1
        return usage


# Validation -------------------------------------------------------------------------------------


def _validate(body: dict[str, Any], *, count_only: bool) -> None:
    known = COUNT_TOKENS_FIELDS if count_only else MESSAGES_FIELDS
    for field in body:
        if field not in known:
            raise _Invalid(f"{field}: Extra inputs are not permitted")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Invalid("model: Field required")
    if not count_only:
        max_tokens = body.get("max_tokens")
        if "max_tokens" not in body:
            raise _Invalid("max_tokens: Field required")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _Invalid("max_tokens: must be an integer of at least 1")
        _validate_sampling(body)
        metadata = body.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise _Invalid("metadata: Input should be an object")
            for key, value in metadata.items():
                if key != "user_id":
                    raise _Invalid(f"metadata.{key}: Extra inputs are not permitted")
                if value is not None and not isinstance(value, str):
                    raise _Invalid("metadata.user_id: Input should be a valid string")
    _validate_system(body.get("system"))
    names = _validate_tools(body)
    _validate_tool_choice(body.get("tool_choice"), names)
    thinking = _validate_thinking(body, count_only=count_only)
    _validate_messages(body.get("messages"), thinking=thinking)


def _validate_sampling(body: dict[str, Any]) -> None:
    for field in ("temperature", "top_p"):
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise _Invalid(f"{field}: must be a number between 0 and 1")
    stops = body.get("stop_sequences")
    if stops is not None and (
        not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)
    ):
        raise _Invalid("stop_sequences: Input should be a list of strings")


def _validate_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise _Invalid("system: Input should be a string or a list of text blocks")
    for index, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _Invalid(f"system.{index}: Input should be a text block")
        _validate_text(block, f"system.{index}")


def _validate_tools(body: dict[str, Any]) -> list[str]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _Invalid("tools: Input should be a list")
    names: list[str] = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _Invalid(f"tools.{index}: Input should be an object")
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise _Invalid(
                f"tools.{index}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            )
        if name in names:
            raise _Invalid(f"tools: Tool names must be unique ({name})")
        if tool.get("type") in (None, "custom") and not isinstance(tool.get("input_schema"), dict):
            raise _Invalid(f"tools.{index}.input_schema: Field required")
        names.append(name)
    return names


def _validate_tool_choice(choice: Any, names: list[str]) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise _Invalid("tool_choice: type must be one of 'auto', 'any', 'tool', 'none'")
    if choice["type"] == "tool" and choice.get("name") not in names:
        raise _Invalid(f"tool_choice: tool {choice.get('name')!r} is not among the tools offered")
    if choice["type"] in ("any", "tool") and not names:
        raise _Invalid("tool_choice: a tool must be offered to force tool use")


def _validate_thinking(body: dict[str, Any], *, count_only: bool) -> bool:
    """Whether thinking is enabled (after checking how it is asked for)."""
    thinking = body.get("thinking")
    if thinking is None:
        return False
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
        raise _Invalid("thinking: type must be 'enabled' or 'disabled'")
    if thinking["type"] == "disabled":
        return False
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1024:
        raise _Invalid("thinking.enabled.budget_tokens: must be an integer of at least 1024")
    if not count_only and budget >= body["max_tokens"]:
        raise _Invalid("`max_tokens` must be greater than `thinking.budget_tokens`")
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        raise _Invalid("`temperature` may only be set to 1 when thinking is enabled")
    if (body.get("tool_choice") or {}).get("type") in ("any", "tool"):
        raise _Invalid("Thinking may not be enabled when tool_choice forces tool use")
    return True


def _validate_messages(messages: Any, *, thinking: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise _Invalid("messages: at least one message is required")
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise _Invalid(f"{where}: Input should be an object")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise _Invalid(f"{where}.role: Input should be 'user' or 'assistant'")
        if index == 0 and role != "user":
            raise _Invalid("messages: the first message must use the `user` role")
        content = message.get("content")
        if isinstance(content, str):
            if not content and not (role == "assistant" and index == len(messages) - 1):
                raise _Invalid(f"{where}: content must be non-empty")
            continue
        if not isinstance(content, list) or (not content and role == "user"):
            raise _Invalid(f"{where}.content: Input should be a string or a list of blocks")
        allowed = _USER_BLOCKS if role == "user" else _ASSISTANT_BLOCKS
        for position, block in enumerate(content):
            at = f"{where}.content.{position}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in allowed:
                raise _Invalid(f"{at}.type: `{kind}` blocks are not allowed in {role} messages")
            if kind == "text":
                _validate_text(block, at)
            elif kind == "tool_use" and (
                not isinstance(block.get("id"), str)
                or not isinstance(block.get("name"), str)
                or not isinstance(block.get("input"), dict)
            ):
                raise _Invalid(f"{at}: a tool_use block needs an id, a name and an object input")
            elif kind == "tool_result" and not isinstance(block.get("tool_use_id"), str):
                raise _Invalid(f"{at}.tool_use_id: Field required")
            elif thinking and kind == "thinking" and not _signature_ok(block):
                raise _Invalid(f"{at}: Invalid `signature` in `thinking` block")
            elif thinking and kind == "redacted_thinking" and not _redacted_ok(block.get("data")):
                raise _Invalid(
                    f"{at}: Invalid `data` in `redacted_thinking` block (its signature does not "
                    "verify)"
                )
    _validate_tool_pairs(messages)
    if thinking:
        _validate_tool_loop(messages)


def _validate_text(block: dict[str, Any], at: str) -> None:
    text = block.get("text")
    if not isinstance(text, str):
        raise _Invalid(f"{at}.text: Field required")
    if not text.strip():
        raise _Invalid(f"{at}.text: text content blocks must contain non-whitespace text")


def _blocks(message: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [b for b in content if b.get("type") == kind]


def _validate_tool_pairs(messages: list[dict[str, Any]]) -> None:
    """Each tool_result answers a tool_use of the assistant turn just before it, and each
    tool_use of a turn that a user turn follows is answered there."""
    for index, message in enumerate(messages):
        if message["role"] != "user":
            continue
        previous = messages[index - 1] if index else None
        offered = (
            {b["id"] for b in _blocks(previous, "tool_use")}
            if previous and previous["role"] == "assistant"
            else set()
        )
        answered = {b["tool_use_id"] for b in _blocks(message, "tool_result")}
        if stray := sorted(answered - offered):
            raise _Invalid(
                f"messages.{index}: unexpected `tool_use_id` found in `tool_result` blocks: "
                f"{', '.join(stray)}. Each `tool_result` block must have a corresponding "
                "`tool_use` block in the previous message."
            )
        if missing := sorted(offered - answered):
            raise _Invalid(
                f"messages.{index - 1}: `tool_use` ids without `tool_result` blocks in the next "
                f"message: {', '.join(missing)}"
            )


def _validate_tool_loop(messages: list[dict[str, Any]]) -> None:
    """With thinking on, the assistant turn whose calls the last user turn answers must open
    with its (signed) thinking, as the real API demands within a tool-use loop."""
    last = messages[-1]
    if last["role"] != "user" or not _blocks(last, "tool_result") or len(messages) < 2:
        return
    index = len(messages) - 2
    content = messages[index]["content"]
    first = content[0] if isinstance(content, list) and content else {"type": "text"}
    if first.get("type") not in ("thinking", "redacted_thinking"):
        raise _Invalid(
            f"messages.{index}.content.0.type: expected `thinking` or `redacted_thinking`, but "
            f"found `{first.get('type')}`. With thinking enabled, the assistant turn whose tool "
            "calls are answered must start with its thinking block, signature and all, as it "
            "was received."
        )


# Scripts ----------------------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return " ".join(b.get("text", "") for b in content if b.get("type") == "text")


def _tool_result_text(block: dict[str, Any]) -> str:
    return _text(block.get("content"))


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body["messages"]):
        if message["role"] == "user" and (text := _text(message["content"]).strip()):
            return text
    return ""


def _words(text: str) -> int:
    return len(text.split())


def _input_words(body: dict[str, Any]) -> int:
    """The prompt's tokens: words of the system prompt and of the messages' text."""
    system = body.get("system")
    words = _words(_text(system))
    for message in body["messages"]:
        words += _words(_text(message["content"]))
        for block in _blocks(message, "tool_result"):
            words += _words(_tool_result_text(block))
    return max(words, 1)


def _has_cache_control(value: Any) -> bool:
    if isinstance(value, dict):
        return "cache_control" in value or any(_has_cache_control(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_cache_control(v) for v in value)
    return False


def _strip_cache_control(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_cache_control(v) for k, v in value.items() if k != "cache_control"}
    if isinstance(value, list):
        return [_strip_cache_control(v) for v in value]
    return value


def _cache_prefix(body: dict[str, Any]) -> str:
    """A hash of the prompt up to its last cache breakpoint, in the API's cache order: tools,
    system, then messages block by block (the whole prompt when no block carries one)."""
    system = body.get("system")
    segments: list[Any] = [["tool", t] for t in body.get("tools") or []]
    if isinstance(system, str):
        segments.append(["system", {"type": "text", "text": system}])
    else:
        segments += [["system", block] for block in system or []]
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        segments += [[message["role"], block] for block in content]
    marked = [i for i, segment in enumerate(segments) if _has_cache_control(segment)]
    end = marked[-1] + 1 if marked else len(segments)
    prefix = [body["model"], _strip_cache_control(segments[:end])]
    return hashlib.sha256(orjson.dumps(prefix, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _tool_input(tool: dict[str, Any]) -> dict[str, Any]:
    schema = tool.get("input_schema") or {}
    properties = schema.get("properties") or {}
    names = schema.get("required") or list(properties)
    filled: dict[str, Any] = {}
    for name in names:
        spec = properties.get(name) or {}
        if spec.get("enum"):
            filled[name] = spec["enum"][0]
            continue
        kind = spec.get("type", "string")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "string")
        filled[name] = {
            "number": 21,
            "integer": 21,
            "boolean": True,
            "array": [],
            "object": {},
        }.get(kind, "Paris")
    return filled


def _tool_turn(model: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """What `tools` (and `parallel`, and the thinking models after their thinking) answer."""
    last = body["messages"][-1]
    if last["role"] == "user" and (results := _blocks(last, "tool_result")):
        said = "; ".join(_tool_result_text(block).strip() for block in results)
        return [_text_block(f"The tool said: {said}")], "end_turn"
    choice = body.get("tool_choice") or {}
    if choice.get("type") == "none":
        return [_text_block("no tools")], "end_turn"
    tools = body.get("tools") or []
    if not tools:
        return [_text_block(_last_user_text(body) or "Hello")], "end_turn"
    if choice.get("type") == "tool":
        chosen = [next(t for t in tools if t["name"] == choice["name"])]
    elif model == "parallel" and len(tools) >= 2 and not choice.get("disable_parallel_tool_use"):
        chosen = tools[:2]
    else:
        chosen = tools[:1]
    return [_tool_use(tool) for tool in chosen], "tool_use"


def _tool_use(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": f"toolu_lb{secrets.token_hex(10)}",
        "name": tool["name"],
        "input": _tool_input(tool),
    }


def _searcher_turn(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """Search (the first tool), call what the search loaded (the last tool), then say what it
    gave."""
    tools = body.get("tools") or []
    messages = body["messages"]
    results = _blocks(messages[-1], "tool_result")
    if not results:
        tool = tools[0]
    elif _used(messages[-2], results[0]["tool_use_id"]) == tools[0]["name"]:
        tool = tools[-1]
    else:
        return _tool_turn("tools", body)
    return [_tool_use(tool)], "tool_use"


def _used(message: dict[str, Any], tool_use_id: str) -> str:
    """The name of the tool an assistant message's tool_use of `tool_use_id` called."""
    return next(
        block["name"] for block in _blocks(message, "tool_use") if block["id"] == tool_use_id
    )


def _script(model: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The answer's content blocks and stop reason."""
    if model in ("tools", "parallel"):
        return _tool_turn(model, body)
    if model == "searcher":
        return _searcher_turn(body)
    if model in ("thinking", "redacted"):
        words = _last_user_text(body) or "the question"
        thought = f"Let me think about {words}."
        blocks = [{"type": "thinking", "thinking": thought, "signature": sign_thinking(thought)}]
        if model == "redacted":
            blocks.insert(0, {"type": "redacted_thinking", "data": _redacted_data()})
        rest, stop_reason = _tool_turn(model, body)
        return [*blocks, *rest], stop_reason
    if model == "length":
        return [_text_block("partial answer")], "max_tokens"
    if model == "refusal":
        return [_text_block("I can't help with that.")], "refusal"
    if model == "error_mid":
        return [_text_block("This answer is cut short")], "end_turn"
    # echo, slow_headers
    return [_text_block(_last_user_text(body) or "Hello")], "end_turn"


def _output_tokens(blocks: list[dict[str, Any]]) -> int:
    tokens = 0
    for block in blocks:
        if block["type"] == "text":
            tokens += _words(block["text"])
        elif block["type"] == "thinking":
            tokens += _words(block["thinking"])
        elif block["type"] == "tool_use":
            tokens += max(_words(orjson.dumps(block["input"]).decode()), 1)
        else:  # redacted_thinking
            tokens += 1
    return max(tokens, 1)


# Rendering --------------------------------------------------------------------------------------


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: ".encode() + orjson.dumps(payload) + b"\n\n"


def _halves(text: str) -> list[str]:
    pieces = _WORD.findall(text)
    middle = max(len(pieces) // 2, 1)
    return ["".join(pieces[:middle]), "".join(pieces[middle:])]


def _thirds(text: str) -> list[str]:
    step = -(-len(text) // 3)
    return [text[i : i + step] for i in range(0, len(text), step)]


def _block_events(index: int, block: dict[str, Any]) -> list[bytes]:
    """content_block_start, its deltas and content_block_stop for one content block."""
    kind = block["type"]
    deltas: list[dict[str, Any]] = []
    if kind == "text":
        start = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in _WORD.findall(block["text"])]
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [
            *(
                {"type": "thinking_delta", "thinking": piece}
                for piece in _halves(block["thinking"])
            ),
            {"type": "signature_delta", "signature": block["signature"]},
        ]
    elif kind == "tool_use":
        start = {**block, "input": {}}
        partial = orjson.dumps(block["input"]).decode()
        deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in _thirds(partial)]
    else:  # redacted_thinking: whole in its start event
        start = block
    events = [
        _event(
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": start},
        )
    ]
    events += [
        _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
        for d in deltas
    ]
    events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


async def _stream(message: dict[str, Any], *, cut: bool) -> AsyncIterator[bytes]:
    usage = message["usage"]
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    yield _event("message_start", {"type": "message_start", "message": start})
    yield _event("ping", {"type": "ping"})
    if cut:  # error_mid: part of the text, then an error event, then the end of the stream
        events = _block_events(0, message["content"][0])
        for event in events[:3]:  # content_block_start and two text deltas
            yield event
        await asyncio.sleep(0.01)
        yield _event(
            "error",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        )
        return
    for index, block in enumerate(message["content"]):
        for event in _block_events(index, block):
            yield event
    delta = {"stop_reason": message["stop_reason"], "stop_sequence": None}
    yield _event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": delta,
            "usage": {"output_tokens": usage["output_tokens"]},
        },
    )
    yield _event("message_stop", {"type": "message_stop"})


def _request_id() -> str:
    return f"req_lb{secrets.token_hex(12)}"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    request_id = _request_id()
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    return JSONResponse(
        body, status_code=status, headers={**(headers or {}), "request-id": request_id}
    )


@pytest.fixture(scope="session")
def anthropic_upstream() -> Iterator[AnthropicUpstream]:
    """A running loopback Anthropic upstream that requires `x-api-key: ANTHROPIC_KEY`."""
    with AnthropicUpstream(api_key=ANTHROPIC_KEY) as upstream:
        yield upstream


if __name__ == "__main__":  # python tests/anthropic_upstream.py [PORT]: serve until interrupted
    serve_forever(AnthropicUpstream)
