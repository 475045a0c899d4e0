"""Provider for OpenAI-compatible chat-completions upstreams (vLLM, Ollama, llama.cpp, Groq, ...).

The request side builds a chat-completions body (its messages come from
`relay.providers.chat_messages`); the stream side turns `chat.completion.chunk` SSE events into
deltas. Nothing here retries: every failure becomes a `ProviderError` and the router decides on
retries and fallbacks. The client, error mapping and SSE decoding are `relay.providers.upstream`'s.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson
from pydantic import BaseModel

from relay.models.deployments import OpenAIChatConfig
from relay.providers.base import (
    Delta,
    FinishDelta,
    FinishReason,
    ImageDelta,
    ProviderError,
    ProviderRequest,
    ReasoningDelta,
    RefusalDelta,
    TextDelta,
    TokenCount,
    ToolCallDelta,
    UsageDelta,
    estimated_tokens,
)
from relay.providers.chat_messages import chat_messages_json
from relay.providers.http_client import HTTPClientError, Response
from relay.providers.images import from_data_url
from relay.providers.upstream import DeltaStream, Upstream, error_message, loads

__all__ = ["OpenAIChatProvider", "build"]

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
# Delta fields that carry the answer: a chunk with none of them only opens the stream.
_ANSWER_FIELDS = (
    "content",
    "reasoning_content",
    "reasoning",
    "refusal",
    "tool_calls",
    "function_call",
    "images",
)


def build(config: OpenAIChatConfig) -> OpenAIChatProvider:
    return OpenAIChatProvider(
        config.base_url,
        config.api_key(),
        timeout_s=config.timeout_s,
        max_connections=config.max_connections,
        max_tokens_param=config.max_tokens_param,
        extra_headers=config.headers,
        forward_fields=frozenset(config.forward_fields),
        replay_reasoning=config.replay_reasoning,
        count_tokens=config.count_tokens,
        deployment=config.label,
        key_env=config.api_key_env,
    )


class OpenAIChatProvider:
    """One upstream base URL (ending before `/chat/completions`) with one pooled HTTP client."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout_s: float = 600.0,
        max_connections: int = 2048,
        max_tokens_param: str = "max_tokens",
        extra_headers: dict[str, str] | None = None,
        forward_fields: frozenset[str] = frozenset(),
        replay_reasoning: bool = False,
        count_tokens: str = "estimate",
        deployment: str = "openai_chat",
        key_env: str | None = None,
    ) -> None:
        self._upstream = Upstream(
            base_url,
            api_key=api_key,
            extra_headers=extra_headers,
            timeout_s=timeout_s,
            max_connections=max_connections,
            deployment=deployment,
            key_env=key_env,
        )
        self._target = self._upstream.target("/chat/completions")
        # vLLM and llama.cpp's server count tokens at the server's root, beside /v1.
        self._root = self._upstream.base_path.removesuffix("/v1")
        self._count_tokens = count_tokens
        self._max_tokens_param = max_tokens_param
        self._forward_fields = forward_fields
        self._replay_reasoning = replay_reasoning

    async def aclose(self) -> None:
        await self._upstream.aclose()

    async def list_models(self) -> Any:
        """The upstream's models list (`/models`), for `relay check`."""
        return await self._upstream.ask(self._upstream.target("/models"))

    async def count_tokens(self, request: ProviderRequest) -> TokenCount:
        """Exact where the route says the upstream can count (`count_tokens`: vLLM's
        /tokenize takes the chat messages and tools; llama.cpp's server applies its template
        with /apply-template, then /tokenize); else an estimate: chat completions has no
        standard way to count, so the messages and tools as sent are estimated by their size."""
        body = self._build_body(request)
        messages, tools = body["messages"], body.get("tools")
        if self._count_tokens == "estimate":
            return estimated_tokens(orjson.dumps({"messages": messages, "tools": tools}))
        try:
            if self._count_tokens == "vllm":
                question = {"model": body["model"], "messages": messages}
                if tools:
                    question["tools"] = tools
                answer = await self._upstream.ask(f"{self._root}/tokenize", question)
                return TokenCount(int(answer["count"]), exact=True)
            prompt = await self._upstream.ask(
                f"{self._root}/apply-template", {"messages": messages}
            )
            answer = await self._upstream.ask(
                f"{self._root}/tokenize", {"content": prompt["prompt"], "add_special": True}
            )
            return TokenCount(len(answer["tokens"]), exact=True)
        except (KeyError, TypeError, ValueError):
            raise ProviderError("the upstream's token count could not be read") from None

    async def count_text(self, text: str) -> TokenCount:
        return estimated_tokens(text)

    async def open(self, request: ProviderRequest) -> AsyncIterator[Delta]:
        body = orjson.dumps(self._build_body(request))
        response = await self._upstream.post(self._target, body)
        if response.headers.get("content-type", "").startswith("application/json"):
            # Some upstreams ignore `stream: true` and answer with one completion object.
            return DeltaStream(response, self._completion(response))
        return await self._upstream.stream(response, self._check, _StreamState())

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

    async def _completion(self, response: Response) -> AsyncGenerator[Delta, None]:
        """A whole chat completion (an upstream that ignored `stream: true`), as deltas."""
        try:
            completion = loads(await response.read())
        except HTTPClientError as exc:
            raise self._upstream.transport_error(exc) from None
        finally:
            response.release()
        for delta in self._completion_deltas(completion):
            yield delta

    def _completion_deltas(self, completion: Any) -> list[Delta]:
        if not isinstance(completion, dict):
            raise ProviderError("the upstream answered with JSON that is not a chat completion")
        self._check(completion)
        state = _StreamState()
        try:
            choices = completion.get("choices") or [{}]
            choice = next((c for c in choices if c.get("index", 0) == 0), choices[0])
            # One chunk whose delta is the whole message: the streaming translation exactly.
            chunk = {
                "choices": [{**choice, "index": 0, "delta": choice.get("message") or {}}],
                "usage": completion.get("usage"),
            }
            deltas = state.feed(chunk)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ProviderError(
                f"the upstream sent a completion Relay could not read ({type(exc).__name__})"
            ) from None
        state.finish = state.finish or "stop"
        return deltas + state.closing()

    def _check(self, chunk: Any) -> None:
        """Raise the failure a chunk reports: as the first event of a 200 (then it is one
        before the first byte, retried and failed over), or mid-stream."""
        if not isinstance(chunk, dict):
            raise ProviderError("the upstream sent a stream event that is not a JSON object")
        if chunk.get("error"):
            raise self._error_chunk(chunk["error"])

    # Errors ---------------------------------------------------------------------------------------

    def _error_chunk(self, error: Any) -> ProviderError:
        raw = orjson.dumps({"error": error})
        code = error.get("code") if isinstance(error, dict) else None
        if isinstance(code, int) and 400 <= code < 600:  # OpenRouter puts the HTTP status here
            return self._upstream.status_error(code, {}, raw)
        if code == "rate_limit_exceeded":
            return self._upstream.status_error(429, {}, raw)
        message = self._upstream.quote(error_message(raw))
        return ProviderError(f"the upstream reported an error mid-stream: {message}")


class _StreamState:
    """What one stream remembers between chunks: usage, finish and which tool calls started.

    A chat stream has no terminal event of its own: usage may come after the finish_reason,
    then `[DONE]`; so it is read to the body's end (`finished` stays false), and a body that
    ends without a finish_reason was cut short (an overloaded llama.cpp server sends the role
    chunk and `[DONE]`, nothing else)."""

    finished = False

    def __init__(self) -> None:
        self.usage: UsageDelta | None = None
        self.finish: FinishReason | None = None
        self.started_calls: set[int] = set()
        self.named_calls: set[int] = set()
        self.identified_calls: set[int] = set()

    def opening(self, chunk: dict[str, Any]) -> bool:
        """A chunk that carries nothing of the answer (the role, an empty delta)."""
        if chunk.get("usage") is not None:
            return False
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                return False
            delta = choice.get("delta") or {}
            if any(delta.get(key) for key in _ANSWER_FIELDS):
                return False
        return True

    def cut_short(self) -> bool:
        return self.finish is None

    def feed(self, chunk: dict[str, Any]) -> list[Delta]:
        out: list[Delta] = []
        if isinstance(chunk.get("usage"), dict):
            # Kept, not yielded: vLLM's continuous usage repeats running totals on every chunk.
            self.usage = _usage(chunk["usage"])
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
            # Images an image model drew (OpenRouter's `images`), each whole in one chunk.
            out += [_image(entry) for entry in delta.get("images") or ()]
            calls = list(delta.get("tool_calls") or ())
            if isinstance(delta.get("function_call"), dict):  # the pre-tools wire shape
                calls.append({"index": 0, "function": delta["function_call"]})
            for position, call in enumerate(calls):
                piece = self.tool_piece(call, position)
                if piece is not None:
                    out.append(piece)
            if choice.get("finish_reason"):
                self.finish = _FINISH.get(choice["finish_reason"], "stop")
        return out

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


def _usage(usage: dict[str, Any]) -> UsageDelta:
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return UsageDelta(
        input_tokens=int(usage.get("prompt_tokens") or 0),
        output_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


def _image(entry: Any) -> ImageDelta:
    """An entry of an answer's `images`: {"type": "image_url", "image_url": {"url":
    "data:image/png;base64,..."}}."""
    url = entry.get("image_url") if isinstance(entry, dict) else None
    if isinstance(url, dict):
        url = url.get("url")
    try:
        result, output_format = from_data_url(url if isinstance(url, str) else "")
    except ValueError:
        raise ProviderError(
            "the upstream answered with an image that is not inline base64 data (a data: URL)"
        ) from None
    return ImageDelta(result, output_format)


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
