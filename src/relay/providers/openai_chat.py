"""Provider for OpenAI-compatible chat-completions upstreams (vLLM, Ollama, llama.cpp, Groq, ...).

The request side builds a chat-completions body (its messages come from
`relay.providers.chat_messages`); the stream side turns `chat.completion.chunk` SSE events into
deltas. Nothing here retries: every failure becomes a `ProviderError` and the engine decides on
fallbacks. Upstream text is quoted only through `_quote`, which scrubs every credential sent
upstream, in every form (`relay.providers.credentials`).
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel

from relay.providers.base import (
    Delta,
    FinishDelta,
    FinishReason,
    ProviderError,
    ProviderRequest,
    ReasoningDelta,
    RefusalDelta,
    TextDelta,
    TokenCount,
    ToolCallDelta,
    UsageDelta,
)
from relay.providers.chat_messages import chat_messages_json
from relay.providers.credentials import Scrubber, basic_token
from relay.providers.http_client import (
    ConnectFailed,
    HTTPClient,
    HTTPClientError,
    Response,
)

# Re-exported for relay.providers.llama_local, which imported it from here before the
# translation moved to relay.providers.chat_messages.
__all__ = ["OpenAIChatProvider"]

# Request fields copied verbatim when set; every chat upstream we target names them the same.
_PASSTHROUGH = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "top_k",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
)
_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
    "function_call": "tool_calls",
}
_MAX_MESSAGE = 500  # upstream error text we quote, so a huge HTML error page stays out of logs
BYTES_PER_TOKEN = 4
_MAX_SCANNED = 4 * _MAX_MESSAGE  # scrubbed before the cut, however much the scrubbing shortens


class OpenAIChatProvider:
    """One upstream base URL (ending before `/chat/completions`) with one pooled HTTP client."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout_s: float = 600.0,
        max_tokens_param: str = "max_tokens",
        extra_headers: dict[str, str] | None = None,
        forward_fields: frozenset[str] = frozenset(),
        replay_reasoning: bool = False,
        count_tokens: str = "estimate",
    ) -> None:
        url = urlsplit(base_url.rstrip("/") + "/chat/completions")
        self._target = url.path + (f"?{url.query}" if url.query else "")
        # vLLM and llama.cpp's server count tokens at the server's root, beside /v1.
        self._root = url.path.removesuffix("/chat/completions").removesuffix("/v1")
        self._count_tokens = count_tokens
        self._max_tokens_param = max_tokens_param
        self._forward_fields = forward_fields
        self._replay_reasoning = replay_reasoning
        headers = {"Content-Type": "application/json"}
        if url.username is not None:
            # Credentials in the base URL (a proxy in front of a self-hosted model) are Basic auth.
            headers["Authorization"] = "Basic " + basic_token(url.username, url.password or "")
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        headers.update(extra_headers or {})
        # Every credential sent, in every form, is scrubbed from the upstream text we quote.
        self._scrub = Scrubber.for_upstream(
            api_key=api_key,
            username=url.username,
            password=url.password,
            headers=extra_headers,
        )
        # A dead host should fail fast so the engine can fall back; a slow model may take minutes
        # between bytes, so only the connect phase gets the shorter bound.
        self._http = HTTPClient(
            f"{url.scheme}://{url.netloc.rpartition('@')[2]}",
            headers=headers,
            connect_timeout_s=min(timeout_s, 10.0),
            read_timeout_s=timeout_s,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def count_tokens(self, request: ProviderRequest) -> TokenCount:
        """Exact where the route says the upstream can count (`count_tokens`: vLLM's
        /tokenize takes the chat messages and tools; llama.cpp's server applies its template
        with /apply-template, then /tokenize); else an estimate: chat completions has no
        standard way to count, and about BYTES_PER_TOKEN bytes of the messages and tools as
        sent make a token, the usual rule for English text and JSON."""
        body = self._build_body(request)
        messages, tools = body["messages"], body.get("tools")
        if self._count_tokens == "estimate":
            sent = orjson.dumps({"messages": messages, "tools": tools})
            return TokenCount(-(-len(sent) // BYTES_PER_TOKEN), exact=False)
        try:
            if self._count_tokens == "vllm":
                question = {"model": body["model"], "messages": messages}
                if tools:
                    question["tools"] = tools
                answer = await self._ask(f"{self._root}/tokenize", question)
                return TokenCount(int(answer["count"]), exact=True)
            prompt = await self._ask(f"{self._root}/apply-template", {"messages": messages})
            answer = await self._ask(
                f"{self._root}/tokenize", {"content": prompt["prompt"], "add_special": True}
            )
            return TokenCount(len(answer["tokens"]), exact=True)
        except (KeyError, TypeError, ValueError):
            raise ProviderError("the upstream's token count could not be read") from None

    async def _ask(self, target: str, question: dict[str, Any]) -> Any:
        """A small JSON exchange with the upstream (token counting)."""
        try:
            response = await self._http.post(target, orjson.dumps(question))
            try:
                raw = await response.read()
            finally:
                response.release()
        except HTTPClientError as exc:
            raise self._transport_error(exc) from None
        if response.status >= 300:
            raise self._status_error(response.status, response.headers, raw)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ProviderError("the upstream's token count is not JSON") from None

    async def open(self, request: ProviderRequest) -> AsyncIterator[Delta]:
        body = orjson.dumps(self._build_body(request))
        try:
            response = await self._http.post(self._target, body)
        except HTTPClientError as exc:
            raise self._transport_error(exc) from None
        if response.status >= 300:
            try:
                raw = await response.read()
            except HTTPClientError:
                raw = b""
            finally:
                response.release()
            raise self._status_error(response.status, response.headers, raw)
        return _DeltaStream(response, self._deltas(response))

    # Request translation ------------------------------------------------------------------------

    def _build_body(self, request: ProviderRequest) -> dict[str, Any]:
        """The chat-completions body for `request`."""
        req = request.request
        body: dict[str, Any] = {
            "model": request.upstream_model,
            # Already JSON: a remembered history's messages are encoded once (chat_messages).
            "messages": orjson.Fragment(
                chat_messages_json(
                    request, request.instructions, replay_reasoning=self._replay_reasoning
                )
            ),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        tools = [_tool(tool) for tool in request.tools]
        if tools:
            body["tools"] = tools
            body["tool_choice"] = _tool_choice(request.tool_choice)
            body["parallel_tool_calls"] = request.parallel_tool_calls
        for name in _PASSTHROUGH:
            value = getattr(req, name)
            if value is not None:
                body[name] = value
        if req.max_output_tokens is not None:
            body[self._max_tokens_param] = req.max_output_tokens
        if req.text is not None:
            fmt = req.text.format
            if fmt is not None and fmt.type == "json_schema":
                schema = {
                    "name": fmt.name,
                    "schema": fmt.schema_,
                    "strict": fmt.strict,
                    "description": fmt.description,
                }
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {k: v for k, v in schema.items() if v is not None},
                }
            elif fmt is not None and fmt.type == "json_object":
                body["response_format"] = {"type": "json_object"}
            if req.text.verbosity is not None:
                body["verbosity"] = req.text.verbosity
        if request.reasoning_effort is not None:
            body["reasoning_effort"] = request.reasoning_effort
        if request.want_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = req.top_logprobs or 0
        for name in sorted(self._forward_fields):
            value = getattr(req, name, None)
            if value is None and req.model_extra:
                value = req.model_extra.get(name)
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
            if value is not None:
                body[name] = value
        return body

    # Stream translation -------------------------------------------------------------------------

    async def _deltas(self, response: Response) -> AsyncGenerator[Delta, None]:
        events = _SSEDecoder()
        try:
            content_type = response.headers.get("content-type", "")
            if content_type.startswith("application/json"):
                # Some upstreams ignore `stream: true` and answer with one completion object.
                completion = _loads(await response.read())
                for delta in self._completion_deltas(completion):
                    yield delta
                return
            state = _StreamState()
            # Every event that one network read completed is translated before the next read.
            while not events.done:
                data = await response.read_chunk()
                for chunk in events.feed(data) if data is not None else events.finish():
                    for delta in self._chunk_deltas(chunk, state):
                        yield delta
                if data is None:
                    break
            if not events.done and state.finish is None:
                raise ProviderError("the upstream closed the stream before it finished")
            for delta in state.closing():
                yield delta
        except HTTPClientError as exc:
            raise self._transport_error(exc) from None
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            # A chunk of the wrong shape (a string where an object belongs, ...) is the
            # upstream's failure, and must reach the engine as one.
            raise ProviderError(
                f"the upstream sent a chunk Relay could not read ({type(exc).__name__})"
            ) from None
        finally:
            # After [DONE] only the body's end is to come: the connection waits for it.
            response.release(end_expected=events.done)

    def _chunk_deltas(self, chunk: Any, state: _StreamState) -> list[Delta]:
        if not isinstance(chunk, dict):
            raise ProviderError("the upstream sent a stream event that is not a JSON object")
        if chunk.get("error"):
            raise self._error_chunk(chunk["error"])
        out: list[Delta] = []
        if isinstance(chunk.get("usage"), dict):
            # Kept, not yielded: vLLM's continuous usage repeats running totals on every chunk.
            state.usage = _usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out.append(ReasoningDelta(reasoning))
            content = delta.get("content")
            if isinstance(content, str) and content:
                logprobs = (choice.get("logprobs") or {}).get("content")
                out.append(TextDelta(content, _logprobs(logprobs) if logprobs else None))
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                out.append(RefusalDelta(refusal))
            calls = list(delta.get("tool_calls") or ())
            if isinstance(delta.get("function_call"), dict):  # the pre-tools wire shape
                calls.append({"index": 0, "function": delta["function_call"]})
            for position, call in enumerate(calls):
                piece = state.tool_piece(call, position)
                if piece is not None:
                    out.append(piece)
            if choice.get("finish_reason"):
                state.finish = _FINISH.get(choice["finish_reason"], "stop")
        return out

    def _completion_deltas(self, completion: Any) -> list[Delta]:
        if not isinstance(completion, dict):
            raise ProviderError("the upstream answered with JSON that is not a chat completion")
        if completion.get("error"):
            raise self._error_chunk(completion["error"])
        choices = completion.get("choices") or [{}]
        choice = next((c for c in choices if c.get("index", 0) == 0), choices[0])
        message = choice.get("message") or {}
        # One chunk whose delta is the whole message reuses the streaming translation exactly.
        state = _StreamState()
        chunk = {
            "choices": [{**choice, "index": 0, "delta": message}],
            "usage": completion.get("usage"),
        }
        out = self._chunk_deltas(chunk, state)
        if state.finish is None:
            state.finish = "stop"
        return out + state.closing()

    # Errors --------------------------------------------------------------------------------------

    def _quote(self, text: str) -> str:
        """Upstream text as Relay may repeat it: credentials scrubbed, then cut to length (in
        that order, so that a cut never leaves part of a key)."""
        return self._scrub(text[:_MAX_SCANNED])[:_MAX_MESSAGE]

    def _transport_error(self, exc: BaseException) -> ProviderError:
        detail = self._quote(str(exc)) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            return ProviderError(
                f"the upstream timed out ({type(exc).__name__})",
                status=408,
                code="request_timeout",
            )
        if isinstance(exc, ConnectFailed):
            return ProviderError(
                f"could not connect to the upstream: {detail}", code="upstream_unreachable"
            )
        return ProviderError(f"the upstream connection failed: {detail}")

    def _status_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ProviderError:
        retry_after = headers.get("retry-after")
        if status in (401, 403):
            # The upstream's text is not quoted: some echo the (masked or whole) key back.
            return ProviderError(
                f"the upstream rejected Relay's credentials (HTTP {status})",
                status=502,
                code="upstream_auth_failed",
                retryable=False,
            )
        message = self._quote(_error_message(raw))
        if status == 429:
            return ProviderError(
                f"the upstream is rate limiting requests: {message}",
                status=429,
                code="rate_limit_exceeded",
                retry_after=retry_after,
            )
        if status in (400, 413) and _CONTEXT_TOO_LONG.search(message):
            return ProviderError(
                f"the input is longer than the model's context window: {message}",
                status=400,
                code="context_length_exceeded",
                retryable=False,
            )
        if status in (400, 413, 422):
            return ProviderError(
                f"the upstream rejected the request (HTTP {status}): {message}",
                status=400,
                code="upstream_invalid_request",
                retryable=False,
            )
        if status == 404:
            # A wrong base URL, or the model missing upstream: Relay's configuration is at
            # fault, not the request, and another model in the fallback list may well serve it.
            return ProviderError(
                f"the upstream has no such endpoint or model (HTTP 404): {message}",
                status=502,
                code="upstream_not_found",
            )
        # 408, 409, 5xx and the 4xx that mean "this upstream cannot serve it" (402 out of credit,
        # 405/415 misconfigured): another model in the fallback list may well succeed.
        return ProviderError(
            f"the upstream failed (HTTP {status}): {message}",
            status=503 if status == 503 else 502,
            retry_after=retry_after,
        )

    def _error_chunk(self, error: Any) -> ProviderError:
        raw = orjson.dumps({"error": error})
        code = error.get("code") if isinstance(error, dict) else None
        if isinstance(code, int) and 400 <= code < 600:  # OpenRouter puts the HTTP status here
            return self._status_error(code, {}, raw)
        if code == "rate_limit_exceeded":
            return self._status_error(429, {}, raw)
        message = self._quote(_error_message(raw))
        return ProviderError(f"the upstream reported an error mid-stream: {message}")


class _DeltaStream(AsyncIterator[Delta]):
    """The delta generator, plus an `aclose` that releases the connection even if never started.

    An async generator that was never iterated skips its `finally`, which would leak the pooled
    connection when the engine is cancelled between `open()` and the first delta.
    """

    def __init__(self, response: Response, deltas: AsyncGenerator[Delta, None]) -> None:
        self._response = response
        self._deltas = deltas

    def __aiter__(self) -> _DeltaStream:
        return self

    async def __anext__(self) -> Delta:
        return await self._deltas.__anext__()

    async def aclose(self) -> None:
        try:
            await self._deltas.aclose()
        finally:
            self._response.release()


class _StreamState:
    """What one stream remembers between chunks: usage, finish and which tool calls started."""

    def __init__(self) -> None:
        self.usage: UsageDelta | None = None
        self.finish: FinishReason | None = None
        self.started_calls: set[int] = set()
        self.named_calls: set[int] = set()
        self.identified_calls: set[int] = set()

    def tool_piece(self, call: dict[str, Any], position: int) -> ToolCallDelta | None:
        # Some upstreams (Gemini's compat layer) omit `index`; some repeat name and id on every
        # piece. The contract is "name and id once, on the first piece", so normalise here.
        index = call.get("index")
        index = index if isinstance(index, int) else position
        function = call.get("function") or {}
        name = function.get("name") or None
        call_id = call.get("id") or None
        arguments = function.get("arguments")
        arguments = arguments if isinstance(arguments, str) else ""
        if index in self.named_calls:
            name = None
        if index in self.identified_calls:
            call_id = None
        if name is None and call_id is None and not arguments and index in self.started_calls:
            return None
        self.started_calls.add(index)
        if name is not None:
            self.named_calls.add(index)
        if call_id is not None:
            self.identified_calls.add(index)
        return ToolCallDelta(index=index, arguments=arguments, name=name, call_id=call_id)

    def closing(self) -> list[Delta]:
        """Usage then finish, once each, after the last content delta."""
        out: list[Delta] = []
        if self.usage is not None:
            out.append(self.usage)
        finish = self.finish or ("tool_calls" if self.started_calls else "stop")
        if finish == "stop" and self.started_calls:
            finish = "tool_calls"  # Ollama and some llama.cpp builds say "stop" after tool calls
        out.append(FinishDelta(finish))
        return out


class _SSEDecoder:
    """The parsed `data:` payloads of an SSE stream, fed its body as it arrives, whatever the
    network split: LF, CRLF or CR line endings (all three are legal), multi-line data joined
    with newlines as the SSE spec says; comments, event, id and retry fields carry nothing we
    need. `done` once `[DONE]` came; what follows it is ignored.

    Works on bytes (the line endings are ASCII, so a character split across reads is whole
    again before its line is parsed) and parses lazily: a read that brought the whole answer
    lets its first delta go on its way before the rest is parsed."""

    def __init__(self) -> None:
        self._pending = b""
        self._data: list[bytes] = []
        self.done = False

    def feed(self, chunk: bytes) -> Iterator[Any]:
        text = self._pending + chunk
        # A trailing "\r" may be the first half of "\r\n": keep it for the next chunk.
        held = b"\r" if text.endswith(b"\r") else b""
        lines = _lines(text[: len(text) - len(held)])
        self._pending = lines.pop() + held
        return self._events(lines)

    def finish(self) -> Iterator[Any]:
        """The end of the body: a last line without its ending, an event without its blank
        line."""
        lines = _lines(self._pending.removesuffix(b"\r")) if self._pending else []
        self._pending = b""
        return self._events([*lines, b""])

    def _events(self, lines: list[bytes]) -> Iterator[Any]:
        if self.done:
            return
        for line in lines:
            if line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            elif not line and self._data:
                payload = b"\n".join(self._data)
                self._data = []
                if payload.strip() == b"[DONE]":
                    self.done = True
                    return
                yield _loads(payload)


def _lines(text: bytes) -> list[bytes]:
    if b"\r" in text:
        text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return text.split(b"\n")


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    try:
        # Bytes that are not UTF-8 become U+FFFD, as a text decoder would have made them.
        return orjson.loads(payload.decode("utf-8", "replace"))
    except orjson.JSONDecodeError:
        raise ProviderError("the upstream sent data that is not valid JSON") from None


# How vLLM, OpenAI, llama.cpp server and others word a prompt over the context window.
_CONTEXT_TOO_LONG = re.compile(
    r"context[ _-]?(length|window|size)|maximum context|prompt is too long|too many tokens",
    re.IGNORECASE,
)


def _error_message(raw: bytes) -> str:
    """The human part of an upstream error body, in any of the shapes we have seen."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:_MAX_SCANNED].decode("utf-8", "replace").strip() or "no error message"
    message: Any = body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message") or error
        elif error:
            message = error  # Ollama: {"error": "model 'x' not found"}
        else:
            message = body.get("message") or body.get("detail") or body  # vLLM, FastAPI
    return message if isinstance(message, str) else orjson.dumps(message).decode()


def _usage(usage: dict[str, Any]) -> UsageDelta:
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return UsageDelta(
        input_tokens=int(usage.get("prompt_tokens") or 0),
        output_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


def _logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat logprobs to the Responses shape, whose `bytes` is required (chat's is nullable)."""

    def one(entry: dict[str, Any]) -> dict[str, Any]:
        token = str(entry.get("token", ""))
        raw = entry.get("bytes")
        return {
            "token": token,
            "logprob": float(entry.get("logprob", 0.0)),
            "bytes": raw if isinstance(raw, list) else list(token.encode()),
        }

    return [
        {**one(entry), "top_logprobs": [one(top) for top in entry.get("top_logprobs") or ()]}
        for entry in entries
    ]


# Tools -----------------------------------------------------------------------------------------


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    # The engine offers function tools only (relay.engine.checks.plan_tools).
    function = {key: tool.get(key) for key in ("name", "description", "parameters", "strict")}
    return {"type": "function", "function": {k: v for k, v in function.items() if v is not None}}


def _tool_choice(choice: str | dict[str, str]) -> str | dict[str, Any]:
    """ "auto", "none" and "required" as they are; {"name": ...} as chat's forced function."""
    if isinstance(choice, dict):
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice
