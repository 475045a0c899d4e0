"""Provider for upstreams that speak the Responses API (OpenAI, Azure OpenAI, OpenRouter, vLLM).

Relay keeps the state: every turn goes with its whole context and `store: false`, so any
such upstream serves Relay's chains, conversations and background runs, and nothing is kept
upstream. Items go as the upstream takes them back (Relay's ids left out: the upstream never
saw them). Reasoning comes back with the upstream's encrypted content, which Relay seals in its
reasoning item with the deployment's name: it is given back to that deployment only; other
upstreams get the turn without it (they would refuse it as invalid_encrypted_content).
Hosted tools the deployment runs (`hosted_tools`) pass through, and their items and events
come back as they come (an image's partial images while it is drawn). Images generated earlier
go back as short references, but for the latest, to a deployment that runs image_generation
(relay.providers.images).

The upstream's events become deltas; Relay's builder makes the events the client sees, with
Relay's own ids and sequence numbers.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from relay.models.deployments import OpenAIResponsesConfig
from relay.protocol import HOSTED_ITEM_TYPES, TOOL_SEARCH_ITEM_TYPES
from relay.providers import images
from relay.providers.base import (
    AnnotationDelta,
    Delta,
    FinishDelta,
    HostedItem,
    HostedProgress,
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
from relay.providers.http_client import HTTPClientError, Response
from relay.providers.tool_names import CUSTOM_INPUT, search_as_function, wire_name
from relay.providers.upstream import DeltaStream, Upstream, error_message, loads

KIND = "openai_responses"
# Request fields sent as they are (an upstream that does not know one, top_k or seed at
# OpenAI, refuses it: a 400 the client sees, never a field dropped on the way).
_PASSTHROUGH = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_logprobs",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
    "max_output_tokens",
    "max_tool_calls",
)
_INCOMPLETE = {"max_output_tokens": "length", "content_filter": "content_filter"}
_CLIENT_ITEM_FIELDS = ("id", "status")  # Relay's, meaningless upstream
# Fields of the upstream's events that Relay makes its own (its ids, its numbering).
_RENUMBERED = ("type", "sequence_number", "item_id", "output_index")


def build(config: OpenAIResponsesConfig) -> OpenAIResponsesProvider:
    return OpenAIResponsesProvider(config)


class OpenAIResponsesProvider:
    def __init__(self, config: OpenAIResponsesConfig) -> None:
        # Whose encrypted reasoning this upstream takes back: the same upstream, with the
        # same credentials (names alone repeat across routes).
        self._name = f"{config.label}@{config.base_url}#{config.api_key_env or ''}"
        self._upstream = Upstream(
            config.base_url,
            api_key=config.api_key(),
            extra_headers=config.headers,
            timeout_s=config.timeout_s,
            max_connections=config.max_connections,
            deployment=config.label,
            key_env=config.api_key_env,
        )

    async def aclose(self) -> None:
        await self._upstream.aclose()

    async def list_models(self) -> Any:
        """The upstream's models list (`/models`), for `relay check`."""
        return await self._upstream.ask(self._upstream.target("/models"))

    async def count_tokens(self, request: ProviderRequest) -> TokenCount:
        """The upstream's own count (`/responses/input_tokens`): exact."""
        return await self._upstream.count_tokens(
            "/responses/input_tokens",
            self.build_body(request),
            ("model", "input", "instructions", "tools"),
        )

    async def count_text(self, text: str) -> TokenCount:
        return estimated_tokens(text)  # the upstream counts only whole requests

    async def open(self, request: ProviderRequest) -> AsyncIterator[Delta]:
        body = orjson.dumps(self.build_body(request))
        response = await self._upstream.post(self._upstream.target("/responses"), body)
        if response.headers.get("content-type", "").startswith("application/json"):
            return DeltaStream(response, self._whole(response))
        return await self._upstream.stream(response, self._check, _StreamState(self._name))

    # Request translation ------------------------------------------------------------------------

    def build_body(self, request: ProviderRequest) -> dict[str, Any]:
        req = request.request
        include = ["reasoning.encrypted_content"]
        if request.want_logprobs:
            include.append("message.output_text.logprobs")
        body: dict[str, Any] = {
            "model": request.upstream_model,
            "input": self._input(request),
            "store": False,
            "stream": True,
            "include": include,
        }
        if request.instructions:
            body["instructions"] = request.instructions
        searching = _searches(request)
        tools: list[dict[str, Any]] = [_function(tool, searching) for tool in request.tools]
        tools += request.hosted_tools
        if tools:
            body["tools"] = tools
            body["tool_choice"] = _tool_choice(request.tool_choice)
            body["parallel_tool_calls"] = request.parallel_tool_calls
        for name in _PASSTHROUGH:
            value = getattr(req, name)
            if value is not None:
                body[name] = value
        reasoning = {}
        if request.reasoning_effort is not None:
            reasoning["effort"] = request.reasoning_effort
        if req.reasoning is not None and req.reasoning.summary is not None:
            reasoning["summary"] = req.reasoning.summary
        if reasoning:
            body["reasoning"] = reasoning
        if req.text is not None:
            body["text"] = req.text.model_dump(mode="json", by_alias=True, exclude_none=True)
        return body

    def _input(self, request: ProviderRequest) -> list[dict[str, Any]]:
        """The whole context as this upstream takes it back. A stored chain's part is
        translated once and kept with the chain (per deployment: what reasoning goes back
        depends on it), so a long conversation costs each turn its new items."""
        searching = _searches(request)
        translate = self._item(request, searching)

        def extend(done: tuple[Any, ...], items: list[dict[str, Any]]) -> tuple[Any, ...]:
            return (*done, *(out for out in map(translate, items) if out is not None))

        history = request.history
        # Search items translate by who searches and, where the client does, its function.
        variant = "search" if searching else request.search_function or ""
        key = f"{KIND}:{self._name}:{variant}"
        before = () if history is None else history.derive(key, extend, ())
        out = [*before, *extend((), request.items)]
        if any(tool["type"] == "image_generation" for tool in request.hosted_tools):
            _latest_image_whole(out, request.context())
        return out

    def _item(self, request: ProviderRequest, searching: bool) -> Any:
        origin = self._name

        def upstream_item(item: dict[str, Any]) -> dict[str, Any] | None:
            kind = item.get("type", "message")
            if kind in TOOL_SEARCH_ITEM_TYPES and searching:
                return _searched_item(item)
            if kind in TOOL_SEARCH_ITEM_TYPES:
                # Without its own search, the upstream was offered the loaded tools in full,
                # and a client-run search as a function: its items are that call and output.
                as_function = search_as_function(item, request.search_function)
                if as_function is None:
                    return None
                item, kind = as_function, as_function["type"]
            if kind == "reasoning":
                state = request.state_of(item)
                if state is None or state.get("kind") != KIND or state.get("origin") != origin:
                    return None  # another upstream's reasoning: this one would refuse it
                return {
                    "type": "reasoning",
                    "id": state["id"],
                    "summary": item.get("summary") or [],
                    "encrypted_content": state["encrypted_content"],
                }
            if kind == images.ITEM:
                return _image_reference(item)
            if kind in HOSTED_ITEM_TYPES:
                return item  # the upstream's own item, id and status as it made them
            out = {key: value for key, value in item.items() if key not in _CLIENT_ITEM_FIELDS}
            if kind == "message":
                out.setdefault("type", "message")
            elif kind in ("function_call", "custom_tool_call"):
                # As the tools were declared: functions under their upstream names.
                name = item["name"]
                if out.pop("namespace", None):
                    name = wire_name(item["namespace"], name)
                arguments = out.pop("input", None)
                if kind == "custom_tool_call":
                    out["arguments"] = orjson.dumps({"input": arguments}).decode()
                out.update(type="function_call", name=name)
            elif kind == "custom_tool_call_output":
                out["type"] = "function_call_output"
            return out

        return upstream_item

    # Stream translation -------------------------------------------------------------------------

    async def _whole(self, response: Response) -> AsyncGenerator[Delta, None]:
        """An upstream that answered with the whole response object."""
        try:
            answer = loads(await response.read())
        except HTTPClientError as exc:
            raise self._upstream.transport_error(exc) from None
        finally:
            response.release()
        if isinstance(answer, dict) and answer.get("error"):
            raise self._failure(answer["error"])
        try:
            deltas = _StreamState(self._name).whole(answer)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ProviderError(
                f"the upstream sent a response Relay could not read ({type(exc).__name__})"
            ) from None
        for delta in deltas:
            yield delta

    def _check(self, event: Any) -> None:
        """Raise the failure an event reports (an `error` event, `response.failed`)."""
        if not isinstance(event, dict):
            raise ProviderError("the upstream sent an event that is not a JSON object")
        if event.get("type") == "error":
            raise self._failure(event.get("error") or event)
        if event.get("type") == "response.failed":
            raise self._failure((event.get("response") or {}).get("error"))

    def _failure(self, error: Any) -> ProviderError:
        raw = orjson.dumps({"error": error})
        code = error.get("code") if isinstance(error, dict) else None
        if code == "rate_limit_exceeded":
            return self._upstream.status_error(429, {}, raw)
        if code == "context_length_exceeded" or (isinstance(code, str) and "invalid" in code):
            # The request's fault (invalid_prompt, invalid_encrypted_content, ...): a 400, not
            # retried, not the deployment's failure.
            return self._upstream.status_error(400, {}, raw)
        message = self._upstream.quote(error_message(raw))
        return ProviderError(f"the upstream reported an error mid-stream: {message}")


class _StreamState:
    """What one stream remembers between events: calls by output index, whether their
    arguments streamed, the hosted items open."""

    def __init__(self, origin: str) -> None:
        self._origin = origin
        self._calls: dict[int, bool] = {}  # output index -> arguments streamed
        self._hosted: set[str] = set()  # the ids of the hosted items opened, not yet done
        self.finished = False

    def opening(self, event: dict[str, Any]) -> bool:
        return event.get("type") in ("response.created", "response.queued", "response.in_progress")

    def cut_short(self) -> bool:
        return not self.finished  # its terminal event is the only end

    def feed(self, event: dict[str, Any]) -> list[Delta]:
        kind: str = event["type"]
        if kind == "response.output_text.delta":
            return [TextDelta(event["delta"], event.get("logprobs") or None)]
        if kind == "response.refusal.delta":
            return [RefusalDelta(event["delta"])]
        if kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            return [ReasoningDelta(event["delta"])]
        if kind == "response.output_text.annotation.added":
            return [AnnotationDelta(event["annotation"])]
        if kind == "response.output_item.added":
            item = event["item"]
            if item.get("type") == "function_call":
                index = int(event["output_index"])
                self._calls[index] = False
                return [ToolCallDelta(index=index, name=item["name"], call_id=item.get("call_id"))]
            if item.get("type") in _OWN_ITEMS:
                return []
            self._hosted.add(item.get("id", ""))
            return [HostedItem(item, done=False)]
        if kind == "response.function_call_arguments.delta":
            index = int(event["output_index"])
            self._calls[index] = True
            return [ToolCallDelta(index=index, arguments=event["delta"])]
        if kind == "response.output_item.done":
            return self._item_done(int(event["output_index"]), event["item"])
        if kind in ("response.completed", "response.incomplete"):
            self.finished = True
            return self._closing(event["response"])
        item_id = event.get("item_id")
        if item_id in self._hosted:
            # A hosted item's progress, its data included (partial images).
            fields = {key: value for key, value in event.items() if key not in _RENUMBERED}
            return [HostedProgress(item_id, kind, fields)]
        return []

    def closing(self) -> list[Delta]:
        return []  # usage and finish came with the terminal event (feed)

    def _item_done(self, index: int, item: dict[str, Any]) -> list[Delta]:
        kind = item.get("type")
        if kind == "reasoning":
            if not item.get("encrypted_content"):
                return []
            return [
                ReasoningState(
                    {
                        "kind": KIND,
                        "origin": self._origin,
                        "id": item["id"],
                        "encrypted_content": item["encrypted_content"],
                    }
                )
            ]
        if kind == "function_call":
            if not self._calls.get(index) and item.get("arguments"):
                return [ToolCallDelta(index=index, arguments=item["arguments"])]
            return []
        if kind in ("message", None):
            return []
        self._hosted.discard(item.get("id", ""))
        return [HostedItem(item)]

    def _closing(self, response: dict[str, Any]) -> list[Delta]:
        usage = response.get("usage") or {}
        out: list[Delta] = [
            UsageDelta(
                input_tokens=int(usage.get("input_tokens") or 0),
                output_tokens=int(usage.get("output_tokens") or 0),
                cached_tokens=int(
                    (usage.get("input_tokens_details") or {}).get("cached_tokens") or 0
                ),
                reasoning_tokens=int(
                    (usage.get("output_tokens_details") or {}).get("reasoning_tokens") or 0
                ),
            )
        ]
        reason = (response.get("incomplete_details") or {}).get("reason")
        if response.get("status") == "incomplete":
            out.append(FinishDelta(_INCOMPLETE.get(str(reason), "length")))  # type: ignore[arg-type]
        else:
            out.append(FinishDelta("tool_calls" if self._calls else "stop"))
        return out

    def whole(self, answer: Any) -> list[Delta]:
        """A whole response object (an upstream that answered without streaming)."""
        if not isinstance(answer, dict):
            raise ProviderError("the upstream answered with JSON that is not a response")
        out: list[Delta] = []
        for index, item in enumerate(answer.get("output") or ()):
            kind = item.get("type")
            if kind == "message":
                for part in item.get("content") or ():
                    if part.get("type") == "refusal":
                        out.append(RefusalDelta(part.get("refusal", "")))
                    elif part.get("text"):
                        out.append(TextDelta(part["text"]))
                        out += [AnnotationDelta(note) for note in part.get("annotations") or ()]
            elif kind == "function_call":
                self._calls[index] = True
                out.append(
                    ToolCallDelta(
                        index, item.get("arguments", ""), item["name"], item.get("call_id")
                    )
                )
            elif kind == "reasoning":
                summary = "".join(part.get("text", "") for part in item.get("summary") or ())
                if summary:
                    out.append(ReasoningDelta(summary))
                out += self._item_done(index, item)
            else:
                out += self._item_done(index, item)
        self.finished = True
        return out + self._closing(answer)


# Items whose events become text, reasoning and call deltas; any other is a hosted item.
_OWN_ITEMS = frozenset({"message", "reasoning", None})


def _image_reference(item: dict[str, Any]) -> dict[str, Any]:
    """An image generated earlier as the upstream reads it: the assistant's short note of
    it, not the image."""
    text = images.reference(item)
    return {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _latest_image_whole(out: list[dict[str, Any]], context: list[dict[str, Any]]) -> None:
    """The context's latest image whole, in place of its reference: the upstream runs
    image_generation, and an edit ("make it darker") needs the pixels."""
    latest = next((item for item in reversed(context) if item.get("type") == images.ITEM), None)
    if latest is None or not latest.get("result"):
        return
    reference = _image_reference(latest)
    for index in range(len(out) - 1, -1, -1):
        if out[index] == reference:
            out[index] = latest
            return


def _function(tool: dict[str, Any], searching: bool) -> dict[str, Any]:
    # The engine offers function tools only (custom tools as functions of one string).
    # `defer_loading` only beside the upstream's tool search, which alone can load them.
    keys = ("description", "parameters", "strict") + (("defer_loading",) if searching else ())
    out = {"type": "function", "name": tool["name"]}
    for key in keys:
        if tool.get(key) is not None:
            out[key] = tool[key]
    return out


def _searches(request: ProviderRequest) -> bool:
    """Whether the upstream runs the request's tool search (the engine sent the tool)."""
    return any(tool["type"] == "tool_search" for tool in request.hosted_tools)


def _searched_item(item: dict[str, Any]) -> dict[str, Any]:
    """A tool search item as the upstream takes it back: the tools an output loaded under the
    names they were offered by (a namespace's functions as `<namespace>__<name>`)."""
    out = {key: value for key, value in item.items() if key not in _CLIENT_ITEM_FIELDS}
    if item["type"] == "tool_search_output":
        out["tools"] = [flat for tool in item["tools"] for flat in _flattened(tool)]
    return out


def _flattened(tool: dict[str, Any]) -> list[dict[str, Any]]:
    if tool.get("type") != "namespace":
        return [_function_shape(tool)]
    return [
        _function_shape({**member, "name": wire_name(tool["name"], member["name"])})
        for member in tool.get("tools") or ()
    ]


def _function_shape(tool: dict[str, Any]) -> dict[str, Any]:
    """A loaded tool as the engine offers tools: a custom tool as a function of one string."""
    if tool.get("type") != "custom":
        return tool
    out: dict[str, Any] = {
        key: tool[key] for key in ("name", "description", "defer_loading") if key in tool
    }
    return {"type": "function", **out, "parameters": CUSTOM_INPUT}


def _tool_choice(choice: str | dict[str, str]) -> str | dict[str, str]:
    if isinstance(choice, dict):
        return {"type": "function", "name": choice["name"]}
    return choice
