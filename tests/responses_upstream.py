"""A loopback upstream that speaks the OpenAI Responses API, scripted by the requested model.

`ResponsesUpstream` runs a Starlette app under uvicorn in a background thread on 127.0.0.1 and
records every request it receives (`requests`: JSON bodies, `headers`: lower-cased headers), so a
test can assert exactly what Relay sent upstream. The `responses_upstream` fixture (session scope)
starts one with the API key `RESPONSES_KEY`; tests that need another set-up use the class as a
context manager. Endpoints: `POST /v1/responses` (JSON, or SSE with `stream: true`),
`POST /v1/responses/input_tokens` and `GET /v1/models`.

The upstream keeps nothing, as a gateway that owns the state must expect: `store` must be sent
as false (absent means true, as at OpenAI, and is refused), `previous_response_id` always
fails with previous_response_not_found, `conversation` and `background: true` are refused. The
whole context has to come in `input`, where a `function_call_output` needs its `function_call`
and a reasoning item's `encrypted_content` must be one this server made (see `seal`; a token
from another server, or tampered with, is refused with invalid_encrypted_content). Streams
number their events from 0 (`sequence_number`) and, as OpenAI's do, end without `data: [DONE]`.
A token is a word: of the instructions, and of the input's message texts and tool outputs.
Models (scripts):

  echo            a message with the words of the last user message (else "Hello")
  tools           a call to the first function tool offered (or the one tool_choice forces;
                  get_weather if none), arguments {"city": "Paris"} in two deltas; when the
                  last input item is a function_call_output: "The tool said: <output>"
  reasoning       a reasoning item (summary "Thinking about <last user words>.", with
                  `encrypted_content` when `include` asks for reasoning.encrypted_content),
                  then as `tools`
  web_search      a web_search_call item searching the last user words, then a message with a
                  url_citation annotation; 400 unless a web_search(_preview) tool is offered
  image_generation
                  an image_generation_call drawing the last user words (in_progress, generating,
                  the tool's `partial_images` partial images, completed; the image is
                  fake_images.PNG), then "Here is your image." ("I edited your image." when the
                  input holds an earlier image whole); 400 unless an image_generation tool is
                  offered
  length          the text "partial", then status incomplete (max_output_tokens)
  fail_mid        some text, then response.failed (server_error "The model crashed.")
  error_event     response.created, response.in_progress, then a bare `error` event and the end
                  of the stream (no terminal event); a 500 when not streamed
  slow_headers    waits 1 s before answering, then as `echo`
  slow_stream     SLOW_WORDS words, one every SLOW_INTERVAL_S; how each such stream ended
                  (finished, or cut by the client after N words) is kept in `slow_streams`
  http_NNN        HTTP status NNN with an OpenAI error body (429 adds Retry-After: 7)
  compliance      "tools" when the request offers function tools, else "echo": what the official
                  Open Responses compliance suite needs from one model (docs/compliance.md)
  tool_search     Codex's tool search (execution "client"): a tool_search_call searching the
                  last user words; after a tool_search_output, a call to the first function it
                  loaded; after a function_call_output, as `tools`. Tool search items and
                  functions with defer_loading need a tool_search tool in `tools` (400)
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from fake_images import PARTIALS, PNG
from loopback_server import LoopbackServer, serve_forever
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    "MODELS",
    "RESPONSES_KEY",
    "SLOW_INTERVAL_S",
    "SLOW_WORDS",
    "ResponsesUpstream",
    "responses_upstream",
]

# Random, as real keys are: a fragment of a key is scrubbed wherever it appears in upstream text.
RESPONSES_KEY = "sk-rsp-lb-8Vd3nK6qW1zT9mR4xB7cY2hJ5gF0pL"
MODELS = [
    "echo",
    "tools",
    "reasoning",
    "web_search",
    "tool_search",
    "image_generation",
    "length",
    "fail_mid",
    "error_event",
    "slow_headers",
    "slow_stream",
    "compliance",
]
SLOW_WORDS = 20
SLOW_INTERVAL_S = 0.05
CREATED = 1_700_000_000
ENCRYPTED_PREFIX = "rsenc_"
CITATION_URL = "https://example.com/result"
CITATION_TITLE = "Example result"
_WORD = re.compile(r"\S+\s*")
_TEXT_PARTS = {"input_text", "output_text", "text", "summary_text"}


class ResponsesUpstream(LoopbackServer):
    base_path = "/v1"
    label = "responses upstream"

    def __init__(self, api_key: str | None = None, port: int = 0) -> None:
        self.slow_streams: list[str] = []
        # Signs this server's reasoning tokens; another instance cannot make one that verifies.
        self._secret = secrets.token_bytes(32)
        routes = [
            Route("/v1/responses", self._responses, methods=["POST"]),
            Route("/v1/responses/input_tokens", self._input_tokens, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
        ]
        super().__init__(routes, api_key=api_key, port=port)

    def reset(self) -> None:
        super().reset()
        self.slow_streams.clear()

    # Reasoning tokens --------------------------------------------------------------------------

    def seal(self, text: str) -> str:
        """The `encrypted_content` this server gives a reasoning item whose summary is `text`."""
        mac = hmac.new(self._secret, text.encode(), hashlib.sha256).digest()
        return f"{ENCRYPTED_PREFIX}{_b64(mac)}.{_b64(text.encode())}"

    def unseal(self, token: str) -> str | None:
        """The summary text sealed in `token`, or None when this server did not make it."""
        if not isinstance(token, str) or not token.startswith(ENCRYPTED_PREFIX):
            return None
        mac_part, dot, text_part = token.removeprefix(ENCRYPTED_PREFIX).partition(".")
        try:
            mac = base64.b64decode(mac_part, validate=True)
            text = base64.b64decode(text_part, validate=True).decode()
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
            return None
        expected = hmac.new(self._secret, text.encode(), hashlib.sha256).digest()
        return text if dot and hmac.compare_digest(mac, expected) else None

    # Endpoints ---------------------------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        data = [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "loopback"} for m in MODELS
        ]
        return JSONResponse({"object": "list", "data": data})

    async def _responses(self, request: Request) -> Response:
        body, refused = await self._receive(request)
        if refused is not None:
            return refused
        if (refused := self._validate(body, create=True)) is not None:
            return refused
        model = body["model"]
        if model == "web_search" and not _web_search_tool(body):
            return _error(400, "web_search tool required", param="tools")
        if model == "image_generation" and _image_tool(body) is None:
            return _error(400, "image_generation tool required", param="tools")
        if _needs_tool_search(body) and not any(
            tool.get("type") == "tool_search" for tool in body.get("tools") or []
        ):
            return _error(400, "deferred tools and tool search items need tool_search")
        if model == "slow_headers":
            await asyncio.sleep(1.0)
        stream = bool(body.get("stream"))
        if model == "error_event" and not stream:
            return _error(
                500, "The server had an error while processing your request.", code="server_error"
            )
        events = _Run(self, body).events()
        if model == "slow_stream" and stream:
            return StreamingResponse(self._slow_stream(events), media_type="text/event-stream")
        if model == "slow_stream":
            await asyncio.sleep(SLOW_WORDS * SLOW_INTERVAL_S)
        if not stream:
            return JSONResponse(events[-1]["response"])
        return StreamingResponse(_stream(events), media_type="text/event-stream")

    async def _input_tokens(self, request: Request) -> Response:
        body, refused = await self._receive(request)
        if refused is not None:
            return refused
        if (refused := self._validate(body, create=False)) is not None:
            return refused
        return JSONResponse({"object": "response.input_tokens", "input_tokens": _input_words(body)})

    async def _receive(self, request: Request) -> tuple[dict[str, Any], Response | None]:
        if (denied := self._check_key(request)) is not None:
            return {}, denied
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return {}, _error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return {}, _error(400, "The request body must be a JSON object.")
        self.record(request, body)
        return body, None

    def _validate(self, body: dict[str, Any], *, create: bool) -> Response | None:
        """OpenAI's checks, in its order, plus this upstream's: it keeps no state."""
        model = body.get("model")
        if not model:
            return _missing("model")
        if not isinstance(model, str):
            return _error(400, "Invalid type for 'model': expected a string.", param="model")
        if match := re.fullmatch(r"http_(\d{3})", model):
            status = int(match.group(1))
            if status in (401, 403):
                return _auth_error(status, "")
            headers = {"Retry-After": "7"} if status == 429 else None
            code = {429: "rate_limit_exceeded"}.get(
                status, "server_error" if status >= 500 else None
            )
            return _error(
                status, f"Scripted failure {status} for model {model}.", headers, code=code
            )
        if model not in MODELS:
            return _error(
                404,
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        if body.get("previous_response_id") is not None:
            return _error(
                400,
                f"Previous response with id '{body['previous_response_id']}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if body.get("conversation") is not None:
            return _error(
                404,
                "Conversation not found: this mock keeps no state.",
                param="conversation",
                code="conversation_not_found",
            )
        if create and body.get("store", True) is not False:
            return _error(
                400,
                "this mock keeps no state; send store: false",
                param="store",
                code="invalid_value",
            )
        if create and body.get("background"):
            return _error(
                400, "Background mode requires store: true.", param="background", code=None
            )
        if "input" not in body and create:
            return _missing("input")
        items = body.get("input", [])
        if not isinstance(items, str | list):
            return _error(
                400,
                "Invalid type for 'input': expected a string or an array of input items.",
                param="input",
                code="invalid_type",
            )
        return self._check_items(items) if isinstance(items, list) else None

    def _check_items(self, items: list[Any]) -> Response | None:
        calls = set()
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                return _error(
                    400,
                    f"Invalid type for 'input[{index}]': expected an object.",
                    param=f"input[{index}]",
                    code="invalid_type",
                )
            kind = item.get("type", "message")
            if kind == "function_call":
                calls.add(item.get("call_id"))
            elif kind == "function_call_output" and item.get("call_id") not in calls:
                return _error(
                    400,
                    f"No tool call found for function call output with call_id "
                    f"{item.get('call_id')}.",
                    param="input",
                )
            elif (
                kind == "reasoning"
                and item.get("encrypted_content") is not None
                and self.unseal(item["encrypted_content"]) is None
            ):
                return _error(
                    400,
                    "The encrypted content for item "
                    f"{item.get('id', f'input[{index}]')} could not be verified.",
                    param="input",
                    code="invalid_encrypted_content",
                )
        return None

    async def _slow_stream(self, events: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        sent = 0
        try:
            for event in events:
                yield _frame(event)
                if event["type"] == "response.output_text.delta":
                    sent += 1
                    await asyncio.sleep(SLOW_INTERVAL_S)
            self.slow_streams.append("finished")
        except BaseException:
            # Starlette cancels the body's task when the client (Relay) disconnects.
            self.slow_streams.append(f"cut after {sent} words")
            raise

    def _check_key(self, request: Request) -> Response | None:
        given = request.headers.get("authorization", "")
        if self.api_key is None or given == f"Bearer {self.api_key}":
            return None
        return _auth_error(401, given)


# Scripts ----------------------------------------------------------------------------------------


class _Run:
    """One response, built as the events OpenAI streams; a JSON answer is the last event's
    `response`."""

    def __init__(self, upstream: ResponsesUpstream, body: dict[str, Any]) -> None:
        self.upstream = upstream
        self.body = body
        self.model: str = body["model"]
        self.log: list[dict[str, Any]] = []
        self.output: list[dict[str, Any]] = []
        self.output_words = 0
        self.reasoning_words = 0
        self.response = _response(body)

    def events(self) -> list[dict[str, Any]]:
        self.emit("response.created", response=self.snapshot())
        self.emit("response.in_progress", response=self.snapshot())
        model, words = self.model, _last_user_words(self.body)
        if model == "compliance":  # the official compliance suite: a call when tools are offered
            model = "tools" if _function_tool(self.body) else "echo"
        if model == "error_event":
            self.log.append(
                {
                    "type": "error",
                    "sequence_number": len(self.log),
                    "code": "server_error",
                    "message": "The server had an error while processing your request.",
                    "param": None,
                }
            )
            return self.log
        if model == "fail_mid":
            self.message("The model was saying something", stop_after_deltas=True)
            error = {"code": "server_error", "message": "The model crashed."}
            return self.finish("failed", error=error)
        if model == "length":
            self.message("partial", status="incomplete")
            return self.finish("incomplete", incomplete={"reason": "max_output_tokens"})
        if model == "reasoning":
            self.reasoning(f"Thinking about {words or 'nothing'}.")
            model = "tools"
        if model == "image_generation":
            tool = _image_tool(self.body) or {}
            edits = any(
                item.get("type") == "image_generation_call" and item.get("result")
                for item in self.body["input"]
                if isinstance(item, dict)
            )
            self.image_generation(f"A picture of {words or 'nothing'}", tool)
            self.message("I edited your image." if edits else "Here is your image.")
        elif model == "web_search":
            query = words or "nothing"
            self.web_search(query)
            text = f"Here is what I found about {query}: {CITATION_TITLE}."
            start = text.index(CITATION_TITLE)
            citation = {
                "type": "url_citation",
                "start_index": start,
                "end_index": start + len(CITATION_TITLE),
                "url": CITATION_URL,
                "title": CITATION_TITLE,
            }
            self.message(text, annotations=[citation])
        elif model == "tool_search" and self._last_item_type() != "function_call_output":
            if self._last_item_type() == "tool_search_output":
                loaded = self.body["input"][-1]["tools"]
                self.function_call(loaded[0]["name"], ['{"title": ', '"standup"}'])
            else:
                self.tool_search(words or "nothing")
        elif model in ("tools", "tool_search"):
            items = self.body["input"] if isinstance(self.body["input"], list) else []
            if items and items[-1].get("type") == "function_call_output":
                self.message(f"The tool said: {_text(items[-1].get('output')).strip()}")
            elif self.body.get("tool_choice") == "none":
                self.message(words or "Hello")
            else:
                self.function_call(_tool_name(self.body), ['{"city": ', '"Paris"}'])
        elif model == "slow_stream":
            self.message(" ".join(["word"] * SLOW_WORDS))
        else:  # echo, slow_headers
            self.message(words or "Hello")
        return self.finish("completed")

    # Events ------------------------------------------------------------------------------------

    def emit(self, kind: str, **fields: Any) -> None:
        self.log.append({"type": kind, "sequence_number": len(self.log), **copy.deepcopy(fields)})

    def snapshot(self) -> dict[str, Any]:
        return {**self.response, "output": copy.deepcopy(self.output)}

    def add(self, item: dict[str, Any]) -> int:
        self.emit("response.output_item.added", output_index=len(self.output), item=item)
        self.output.append(item)
        return len(self.output) - 1

    def message(
        self,
        text: str,
        *,
        annotations: list[dict[str, Any]] | None = None,
        status: str = "completed",
        stop_after_deltas: bool = False,
    ) -> None:
        item_id = _id("msg")
        item: dict[str, Any] = {
            "id": item_id,
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        index = self.add(item)
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": []}
        self.emit("response.content_part.added", **where, part=part)
        item["content"].append(part)
        for piece in _WORD.findall(text):
            self.emit("response.output_text.delta", **where, delta=piece, logprobs=[])
            part["text"] += piece
            self.output_words += 1
        if stop_after_deltas:  # cut off: the item stays as far as it got
            item["status"] = "incomplete"
            return
        for number, annotation in enumerate(annotations or []):
            self.emit(
                "response.output_text.annotation.added",
                **where,
                annotation_index=number,
                annotation=annotation,
            )
            part["annotations"].append(annotation)
        self.emit("response.output_text.done", **where, text=part["text"], logprobs=[])
        self.emit("response.content_part.done", **where, part=part)
        item["status"] = status
        self.emit("response.output_item.done", output_index=index, item=item)

    def function_call(self, name: str, pieces: list[str]) -> None:
        item_id = _id("fc")
        item: dict[str, Any] = {
            "id": item_id,
            "type": "function_call",
            "status": "in_progress",
            "arguments": "",
            "call_id": _id("call"),
            "name": name,
        }
        index = self.add(item)
        for piece in pieces:
            self.emit(
                "response.function_call_arguments.delta",
                item_id=item_id,
                output_index=index,
                delta=piece,
            )
            item["arguments"] += piece
            self.output_words += 1
        self.emit(
            "response.function_call_arguments.done",
            item_id=item_id,
            output_index=index,
            name=name,
            arguments=item["arguments"],
        )
        item["status"] = "completed"
        self.emit("response.output_item.done", output_index=index, item=item)

    def reasoning(self, text: str) -> None:
        item_id = _id("rs")
        item: dict[str, Any] = {"id": item_id, "type": "reasoning", "summary": []}
        index = self.add(item)
        where = {"item_id": item_id, "output_index": index, "summary_index": 0}
        part = {"type": "summary_text", "text": ""}
        self.emit("response.reasoning_summary_part.added", **where, part=part)
        item["summary"].append(part)
        for piece in _WORD.findall(text):
            self.emit("response.reasoning_summary_text.delta", **where, delta=piece)
            part["text"] += piece
            self.reasoning_words += 1
        self.emit("response.reasoning_summary_text.done", **where, text=part["text"])
        self.emit("response.reasoning_summary_part.done", **where, part=part)
        if "reasoning.encrypted_content" in (self.body.get("include") or []):
            item["encrypted_content"] = self.upstream.seal(part["text"])
        self.emit("response.output_item.done", output_index=index, item=item)

    def _last_item_type(self) -> str | None:
        items = self.body["input"]
        return items[-1].get("type") if isinstance(items, list) and items else None

    def tool_search(self, query: str) -> None:
        item: dict[str, Any] = {
            "id": _id("tsc"),
            "type": "tool_search_call",
            "status": "in_progress",
            "execution": "client",
            "call_id": _id("call"),
            "arguments": {"query": query, "limit": 8},
        }
        index = self.add(item)
        item["status"] = "completed"
        self.emit("response.output_item.done", output_index=index, item=item)

    def web_search(self, query: str) -> None:
        item_id = _id("ws")
        item: dict[str, Any] = {
            "id": item_id,
            "type": "web_search_call",
            "status": "in_progress",
            "action": {"type": "search", "query": query},
        }
        index = self.add(item)
        for stage in ("in_progress", "searching", "completed"):
            self.emit(f"response.web_search_call.{stage}", item_id=item_id, output_index=index)
        item["status"] = "completed"
        self.emit("response.output_item.done", output_index=index, item=item)

    def image_generation(self, prompt: str, tool: dict[str, Any]) -> None:
        item_id = _id("ig")
        item: dict[str, Any] = {
            "id": item_id,
            "type": "image_generation_call",
            "status": "in_progress",
            "result": None,
        }
        index = self.add(item)
        where = {"item_id": item_id, "output_index": index}
        self.emit("response.image_generation_call.in_progress", **where)
        self.emit("response.image_generation_call.generating", **where)
        settings = {
            "size": tool.get("size") or "1024x1024",
            "quality": tool.get("quality") or "medium",
            "background": tool.get("background") or "opaque",
            "output_format": tool.get("output_format") or "png",
        }
        for number in range(int(tool.get("partial_images") or 0)):
            self.emit(
                "response.image_generation_call.partial_image",
                **where,
                partial_image_index=number,
                partial_image_b64=PARTIALS[number],
                **settings,
            )
        self.emit("response.image_generation_call.completed", **where)
        item.update(status="completed", result=PNG, revised_prompt=prompt, **settings)
        self.emit("response.output_item.done", output_index=index, item=item)

    def finish(
        self,
        status: str,
        *,
        incomplete: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        self.response["status"] = status
        self.response["incomplete_details"] = incomplete
        self.response["error"] = error
        if status == "completed":
            self.response["completed_at"] = int(time.time())
        if status != "failed":
            inputs = _input_words(self.body)
            outputs = self.output_words + self.reasoning_words
            self.response["usage"] = {
                "input_tokens": inputs,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": outputs,
                "output_tokens_details": {"reasoning_tokens": self.reasoning_words},
                "total_tokens": inputs + outputs,
            }
        self.emit(f"response.{status}", response=self.snapshot())
        return self.log


def _response(body: dict[str, Any]) -> dict[str, Any]:
    """The response object as created: every key OpenAI writes, the request's settings echoed
    with OpenAI's defaults."""
    reasoning = body.get("reasoning") or {}
    if body["model"] == "reasoning":
        reasoning = {
            "effort": reasoning.get("effort") or "medium",
            "summary": reasoning.get("summary"),
        }
    else:
        reasoning = {"effort": None, "summary": None}
    return {
        "id": _id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "completed_at": None,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "model": body["model"],
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "prompt_cache_key": body.get("prompt_cache_key"),
        "reasoning": reasoning,
        "safety_identifier": body.get("safety_identifier"),
        "service_tier": "default",
        "store": False,
        "temperature": body.get("temperature") if body.get("temperature") is not None else 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium", **(body.get("text") or {})},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": [_echo_tool(tool) for tool in body.get("tools") or []],
        "top_logprobs": body.get("top_logprobs") or 0,
        "top_p": body.get("top_p") if body.get("top_p") is not None else 1.0,
        "presence_penalty": body.get("presence_penalty") or 0.0,
        "frequency_penalty": body.get("frequency_penalty") or 0.0,
        "truncation": body.get("truncation") or "disabled",
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def _echo_tool(tool: Any) -> Any:
    if isinstance(tool, dict) and tool.get("type") == "function":
        return {"description": None, "parameters": None, "strict": True, **tool}
    return tool


def _web_search_tool(body: dict[str, Any]) -> bool:
    return any(
        isinstance(t, dict) and t.get("type") in ("web_search", "web_search_preview")
        for t in body.get("tools") or []
    )


def _image_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    return next(
        (
            tool
            for tool in body.get("tools") or []
            if isinstance(tool, dict) and tool.get("type") == "image_generation"
        ),
        None,
    )


def _needs_tool_search(body: dict[str, Any]) -> bool:
    items = body.get("input") if isinstance(body.get("input"), list) else []
    deferred = any(t.get("defer_loading") for t in body.get("tools") or [])
    return deferred or any(item.get("type", "").startswith("tool_search") for item in items)


def _function_tool(body: dict[str, Any]) -> bool:
    return any(isinstance(t, dict) and t.get("type") == "function" for t in body.get("tools") or [])


def _tool_name(body: dict[str, Any]) -> str:
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function" and choice.get("name"):
        return str(choice["name"])
    allowed = None
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = {t.get("name") for t in choice.get("tools") or [] if isinstance(t, dict)}
    for tool in body.get("tools") or []:
        if not isinstance(tool, dict) or tool.get("type") != "function" or not tool.get("name"):
            continue
        if allowed is None or tool["name"] in allowed:
            return str(tool["name"])
    return "get_weather"


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    items = body.get("input", [])
    if isinstance(items, str):
        return [{"type": "message", "role": "user", "content": items}]
    return [i for i in items if isinstance(i, dict) and i.get("type", "message") == "message"]


def _last_user_words(body: dict[str, Any]) -> str:
    for message in reversed(_messages(body)):
        if message.get("role") == "user":
            return " ".join(_text(message.get("content")).split())
    return ""


def _input_words(body: dict[str, Any]) -> int:
    texts = [_text(body.get("instructions"))]
    items = body.get("input", [])
    if isinstance(items, str):
        texts.append(items)
    else:
        for item in items:
            if not isinstance(item, dict):
                continue
            kind = item.get("type", "message")
            if kind == "message":
                texts.append(_text(item.get("content")))
            elif kind == "function_call_output":
                texts.append(_text(item.get("output")))
    return sum(len(text.split()) for text in texts)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return " ".join(
        str(p.get("text", ""))
        for p in content
        if isinstance(p, dict) and p.get("type") in _TEXT_PARTS
    )


# Rendering --------------------------------------------------------------------------------------


def _frame(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: ".encode() + orjson.dumps(event) + b"\n\n"


async def _stream(events: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    for event in events:
        yield _frame(event)


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _error(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    kind = {429: "rate_limit_exceeded"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    error = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _missing(param: str) -> JSONResponse:
    return _error(
        400,
        f"Missing required parameter: '{param}'.",
        param=param,
        code="missing_required_parameter",
    )


def _auth_error(status: int, authorization: str) -> JSONResponse:
    # Echo the whole key back, worse than OpenAI's masked echo, to prove Relay never repeats it.
    given = authorization.removeprefix("Bearer ")
    return _error(status, f"Incorrect API key provided: {given}.", code="invalid_api_key")


@pytest.fixture(scope="session")
def responses_upstream() -> Iterator[ResponsesUpstream]:
    """A running loopback Responses upstream that requires `Authorization: Bearer RESPONSES_KEY`."""
    with ResponsesUpstream(api_key=RESPONSES_KEY) as upstream:
        yield upstream


if __name__ == "__main__":  # python tests/responses_upstream.py [PORT]: serve until interrupted
    serve_forever(ResponsesUpstream)
