"""A loopback upstream that speaks OpenAI chat completions, scripted by the requested model.

`ChatUpstream` runs a Starlette app under uvicorn in a background thread on 127.0.0.1 and
records every request it receives (`requests`: JSON bodies, `headers`: lower-cased headers), so a
test can assert exactly what Relay sent upstream. The `chat_upstream` fixture (session scope)
starts one with the API key `UPSTREAM_KEY`; tests that need another set-up use the class as a
context manager. Models (scripts):

  echo            the words of the last message's text; logprobs when asked
  tools/parallel  one / two calls to the first tool offered (get_weather if none)
  tools_stop      a tool call finished with "stop", as Ollama does
  tools_repeat    a tool call with no `index` and the id and name repeated on every piece
  reasoning       `reasoning_content` deltas, then text; `reasoning_alt` uses `reasoning`
  refusal         `refusal` deltas
  length          some text, then finish_reason "length"
  json_body       a plain JSON completion although a stream was asked for
  no_done         a complete stream without the final `data: [DONE]`
  truncated       text, then a clean end of stream with no finish_reason and no [DONE]
  done_unfinished text, then `[DONE]` with no finish_reason
  role_only       the role chunk, then `[DONE]`: nothing else (llama-cpp-python's server does
                  this to requests it cannot take while busy)
  error_first     a 200 whose first chunk is `{"error": ...}`
  split           CRLF framing, comments, and the bytes sent in 7-byte pieces
  slow_headers    waits 1 s before answering (for client timeouts)
  drop_mid_stream some chunks, then the connection is cut
  error_chunk     some text, then `data: {"error": {...}}`; error_chunk_429 with code 429
  malformed       some text, then a chunk whose `choices` holds a string
  rogue_tool      a call to `not_offered`, whatever tools were sent
  small_context   echo, but a context-length error past SMALL_CONTEXT messages
  http_NNN        HTTP status NNN with an OpenAI error body (429 adds Retry-After: 7)
  retry_after_once
                  the first request with a given last message: a 429 with Retry-After: 1;
                  the next ones: echo (for retries that honour retry-after)
  stall           one word, then 2 s of silence, then the rest (for read timeouts mid-stream)
  slow_stream     SLOW_WORDS words, one every SLOW_INTERVAL_S; how each such stream ended
                  (finished, or cut by the client after N words) is kept in `slow_streams`
  agent           an agent's two steps: call exec_command with {"cmd": "echo relay-ok"} (else
                  the first tool, with {"city": "Paris"}), then say "The tool said: <output>"
  searcher        a client-run tool search's model (offered first, as the search): calls it
                  with {"query": "calendar"}; given the search's result, calls the last tool
                  offered (one the search loaded) with {"title": "standup"}; given that
                  tool's output, says "The tool said: <output>"
  directed        calls what the last user message asks, one call a line: `call <name> <JSON
                  arguments>` (several lines: parallel calls); given tool outputs, says
                  "Tools said: <output> ; <output>..." (for server-side tool loops)
  insistent       calls the first tool offered with {"query": "again"}, turn after turn;
                  offered none, says "Out of tools." (for the loop's bounds)
  coder           a coding agent's model: asked a "Question:", answers "Answered."; else,
                  offered tools, calls the first with {"cmd": "next"}; asked to summarise
                  (compaction's request), answers the lines of the context that hold "FACT-",
                  once each (a summary that keeps what later turns ask about)
  painter         an image model, as OpenRouter streams one: "Here is your picture.", then the
                  image (fake_images.PNG) in `delta.images`, as a data URL; painter_whole
                  answers with one completion (`message.images`) although a stream was asked
  compliance      "tools" when the request offers tools, else "echo": what the official Open
                  Responses compliance suite needs from one model (docs/compliance.md)
  echo_credentials
                  a 400 whose message repeats every header received, whole and in the forms
                  an upstream might write it (token only, cut in half, percent-encoded);
                  echo_credentials_stream repeats them in an error chunk mid-stream
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from fake_images import PNG
from loopback_server import LoopbackServer, serve_forever
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = ["MODELS", "UPSTREAM_KEY", "ChatUpstream", "chat_upstream"]

# Random, as real keys are: a fragment of a key is scrubbed wherever it appears in upstream text,
# so a key spelling out words ("upstream") would redact them from error messages too.
UPSTREAM_KEY = "sk-lb-7Qm2xV9pK4rT8wZ3nY6cJ1hF5dG0sAe"
MODELS = [
    "echo",
    "tools",
    "parallel",
    "tools_stop",
    "tools_repeat",
    "reasoning",
    "reasoning_alt",
    "refusal",
    "length",
    "directed",
    "insistent",
    "coder",
    "json_body",
    "no_done",
    "truncated",
    "done_unfinished",
    "role_only",
    "error_first",
    "split",
    "slow_headers",
    "drop_mid_stream",
    "error_chunk",
    "error_chunk_429",
    "malformed",
    "rogue_tool",
    "slow_stream",
    "stall",
    "echo_credentials",
    "echo_credentials_stream",
    "compliance",
    "agent",
    "searcher",
    "retry_after_once",
    "painter",
    "painter_whole",
]
SLOW_WORDS = 200
SLOW_INTERVAL_S = 0.05
# Headers every HTTP client sends; echo_credentials repeats all others.
_PLAIN_HEADERS = {"host", "content-length", "content-type", "user-agent", "accept-encoding"}
CREATED = 1_700_000_000
# small_context: answers like echo, but refuses more than this many chat messages.
SMALL_CONTEXT = 4
_WORD = re.compile(r"\S+\s*")


class _Dropped(Exception):
    """Raised inside a streaming body so that uvicorn cuts the connection mid-response."""


class ChatUpstream(LoopbackServer):
    base_path = "/v1"
    label = "chat upstream"

    def __init__(self, api_key: str | None = None, port: int = 0) -> None:
        self.slow_streams: list[str] = []
        self._refused_once: set[str] = set()
        routes = [
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            # Token counting as vLLM (messages in, count out) and llama.cpp's server
            # (template, then tokens) do it; here a token is a word of a message.
            Route("/tokenize", self._tokenize, methods=["POST"]),
            Route("/apply-template", self._apply_template, methods=["POST"]),
        ]
        super().__init__(routes, api_key=api_key, port=port)

    def reset(self) -> None:
        super().reset()
        self.slow_streams.clear()

    def deployment(self, name: str, script: str, key_env: str, **more: Any) -> dict[str, Any]:
        """A chat deployment of Relay's on this upstream, answering by `script` (the model
        name this upstream reads as what to do), its key read from `key_env`."""
        return {
            "name": name,
            "provider": "openai_chat",
            "base_url": self.base_url,
            "api_key_env": key_env,
            "upstream_model": script,
            **more,
        }

    # Endpoints ---------------------------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        data = [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "loopback"} for m in MODELS
        ]
        return JSONResponse({"object": "list", "data": data})

    async def _chat(self, request: Request) -> Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.")
        self.record(request, body)
        model = str(body.get("model", ""))
        if match := re.fullmatch(r"http_(\d{3})", model):
            status = int(match.group(1))
            if status in (401, 403):
                return _auth_error(status, request.headers.get("authorization", ""))
            headers = {"Retry-After": "7"} if status == 429 else None
            return _error(status, f"Scripted failure {status} for model {model}.", headers)
        if model == "small_context" and len(body.get("messages", [])) > SMALL_CONTEXT:
            # vLLM's wording for a prompt over the context window.
            return _error(
                400,
                "This model's maximum context length is 64 tokens. However, you "
                "requested 1000 tokens in the messages.",
            )
        if model == "small_context":
            model = "echo"
        if model == "retry_after_once":
            last = _last_text(body)
            if last not in self._refused_once:
                self._refused_once.add(last)
                return _error(429, "Slow down a moment.", {"Retry-After": "1"})
            model = "echo"
        if model not in MODELS:
            return _error(404, f"The model `{model}` does not exist.", code="model_not_found")
        if model == "slow_headers":
            await asyncio.sleep(1.0)
        if model == "echo_credentials":
            return _error(400, _echo_credentials(request))
        if model == "echo_credentials_stream":
            echoed = _echo_credentials(request)
            return StreamingResponse(_failing_stream(body, echoed), media_type="text/event-stream")
        if model == "slow_stream":
            return StreamingResponse(self._slow_stream(body), media_type="text/event-stream")
        answer = _answer(model, body)
        # Like some hosted upstreams' load balancers: a session cookie on every answer, which a
        # gateway must not carry to later requests (they may be another tenant's).
        cookie = {"set-cookie": "upstream_session=abc123; Path=/"}
        if not body.get("stream") or model in ("json_body", "painter_whole"):
            return JSONResponse(_completion(model, body, answer), headers=cookie)
        return StreamingResponse(
            _stream(model, body, answer), media_type="text/event-stream", headers=cookie
        )

    async def _tokenize(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        if "messages" in body:  # vLLM's shape
            words = _prompt(body["messages"]).split()
            return JSONResponse({"count": len(words), "max_model_len": 4096, "tokens": []})
        return JSONResponse({"tokens": list(range(len(str(body["content"]).split())))})

    async def _apply_template(self, request: Request) -> Response:
        return JSONResponse({"prompt": _prompt(orjson.loads(await request.body())["messages"])})

    async def _slow_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        sent = 0
        try:
            for _ in range(SLOW_WORDS):
                chunk = _chunk("slow_stream", [_choice({"content": "word "})], body)
                yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                sent += 1
                await asyncio.sleep(SLOW_INTERVAL_S)
            finish = _chunk("slow_stream", [_choice({}, None, "stop")], body)
            yield b"data: " + orjson.dumps(finish) + b"\n\ndata: [DONE]\n\n"
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


def _answer(model: str, body: dict[str, Any]) -> dict[str, Any]:
    """The script as chat deltas plus a finish reason; rendered as a stream or one completion."""
    deltas: list[dict[str, Any]] = []
    finish = "stop"
    if model == "compliance":  # for the official compliance suite: a call when tools are offered
        model = "tools" if body.get("tools") else "echo"
    if model == "agent":
        return _agent_turn(body)
    if model == "searcher":
        return _searcher_turn(body)
    if model == "directed":
        return _directed_turn(body)
    if model == "insistent":
        return _insistent_turn(body)
    if model == "coder":
        return _coder_turn(body)
    if model in ("tools", "parallel", "tools_stop", "tools_repeat", "rogue_tool"):
        tools = body.get("tools") or [{"function": {"name": "get_weather"}}]
        name = "not_offered" if model == "rogue_tool" else tools[0]["function"]["name"]
        cities = ["Paris", "Tokyo"] if model == "parallel" else ["Paris"]
        for index, city in enumerate(cities):
            call_id = f"call_loop_{index}"
            deltas.append(_call(index, call_id, name, ""))
            for piece in ('{"city": ', f'"{city[:3]}', f'{city[3:]}"}}'):
                if model == "tools_repeat":
                    deltas.append(_call(None, call_id, name, piece))
                else:
                    deltas.append(
                        {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                    )
        if model == "tools_repeat":
            deltas[0]["tool_calls"][0].pop("index")
        finish = "stop" if model == "tools_stop" else "tool_calls"
    elif model in ("reasoning", "reasoning_alt"):
        field = "reasoning_content" if model == "reasoning" else "reasoning"
        deltas = [{field: "Let me "}, {field: "think."}, {"content": "Done."}]
    elif model == "refusal":
        deltas = [{"refusal": piece} for piece in _WORD.findall("I can't help with that.")]
    elif model in ("painter", "painter_whole"):
        image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
        deltas = [{"content": piece} for piece in _WORD.findall("Here is your picture.")]
        deltas.append({"images": [{**image, "index": 0}]})
    elif model == "length":
        deltas = [{"content": piece} for piece in _WORD.findall("This is cut short")]
        finish = "length"
    else:
        deltas = [{"content": piece} for piece in _WORD.findall(_last_text(body) or "Hello")]
    return {"deltas": deltas, "finish": finish}


def _agent_turn(body: dict[str, Any]) -> dict[str, Any]:
    """An agent's model, in two steps: call a tool (Codex's shell, exec_command, to run
    `echo relay-ok`; else the first tool offered, with {"city": "Paris"}), then, given its
    output, say what it gave."""
    messages = body.get("messages") or []
    if messages and messages[-1].get("role") == "tool":
        said = f"The tool said: {_text(messages[-1].get('content')).strip()}"
        return {"deltas": [{"content": piece} for piece in _WORD.findall(said)], "finish": "stop"}
    names = [tool["function"]["name"] for tool in body.get("tools") or []]
    if not names:
        return {"deltas": [{"content": "No tool was offered."}], "finish": "stop"}
    if "exec_command" in names:
        name, arguments = "exec_command", {"cmd": "echo relay-ok"}
    else:
        name, arguments = names[0], {"city": "Paris"}
    call = _call(0, "call_agent_0", name, orjson.dumps(arguments).decode())
    return {"deltas": [call], "finish": "tool_calls"}


def _searcher_turn(body: dict[str, Any]) -> dict[str, Any]:
    """Search (the first tool), call what the search loaded (the last tool), then say what it
    gave."""
    messages = body.get("messages") or []
    names = [tool["function"]["name"] for tool in body.get("tools") or []]
    last = messages[-1] if messages else {}
    if last.get("role") != "tool":
        name, arguments = names[0], {"query": "calendar"}
    elif _called(messages, last["tool_call_id"]) == names[0]:
        name, arguments = names[-1], {"title": "standup"}
    else:
        said = f"The tool said: {_text(last.get('content')).strip()}"
        return {"deltas": [{"content": piece} for piece in _WORD.findall(said)], "finish": "stop"}
    call = _call(0, f"call_searcher_{len(messages)}", name, orjson.dumps(arguments).decode())
    return {"deltas": [call], "finish": "tool_calls"}


def _directed_turn(body: dict[str, Any]) -> dict[str, Any]:
    """Call what the user asked for (`call <name> <arguments>` lines); given the outputs,
    say them."""
    messages = body.get("messages") or []
    outputs = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        outputs.insert(0, _text(message.get("content")).strip())
    if outputs:
        return _said("Tools said: " + " ; ".join(outputs))
    asked = re.findall(r"^call (\S+) (.*)$", _last_text(body), re.MULTILINE)
    if not asked or not body.get("tools"):
        return _said(_last_text(body) or "Hello")
    deltas = [
        _call(index, f"call_directed_{len(messages)}_{index}", name, arguments)
        for index, (name, arguments) in enumerate(asked)
    ]
    return {"deltas": deltas, "finish": "tool_calls"}


def _insistent_turn(body: dict[str, Any]) -> dict[str, Any]:
    tools = body.get("tools") or []
    if not tools or body.get("tool_choice") == "none":
        return _said("Out of tools.")
    name = tools[0]["function"]["name"]
    call_id = f"call_insistent_{len(body.get('messages') or [])}"
    return {"deltas": [_call(0, call_id, name, '{"query": "again"}')], "finish": "tool_calls"}


# What compaction asks its summarising turn (relay.engine.compaction.REQUEST).
SUMMARISE = "Summarise the conversation so far, as instructed."
_FACT = re.compile(r"FACT-\d+: [^\n]*")


def _coder_turn(body: dict[str, Any]) -> dict[str, Any]:
    messages = body.get("messages") or []
    last = _last_text(body)
    if messages and messages[-1].get("role") == "user" and last == SUMMARISE:
        context = "\n".join(_text(message.get("content")) for message in messages[:-1])
        facts = dict.fromkeys(_FACT.findall(context))
        return _said("\n".join(facts) or "Nothing to keep.")
    if messages and messages[-1].get("role") == "user" and last.startswith("Question:"):
        return _said("Answered.")
    tools = body.get("tools") or []
    if not tools:
        return _said("Noted.")
    call_id = f"call_coder_{uuid.uuid4().hex[:12]}"  # unique, as a model's are
    call = _call(0, call_id, tools[0]["function"]["name"], '{"cmd": "next"}')
    return {"deltas": [call], "finish": "tool_calls"}


def _said(text: str) -> dict[str, Any]:
    return {"deltas": [{"content": piece} for piece in _WORD.findall(text)], "finish": "stop"}


def _called(messages: list[dict[str, Any]], call_id: str) -> str:
    """The name of the function an assistant message called by `call_id`."""
    return next(
        call["function"]["name"]
        for message in messages
        for call in message.get("tool_calls") or ()
        if call["id"] == call_id
    )


def _call(index: int | None, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    call: dict[str, Any] = {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    if index is None:
        del call["index"]
    return {"tool_calls": [call]}


def _prompt(messages: list[dict[str, Any]]) -> str:
    """The messages as one text, a role word before each (a stand-in chat template)."""
    return " ".join(f"{m['role']}: {_text(m.get('content'))}" for m in messages)


def _last_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        text = _text(message.get("content"))
        if text:
            return text
    return ""


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content or [] if p.get("type") == "text")


def _usage(body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    prompt = sum(len(_text(m.get("content")).split()) for m in body.get("messages") or [])
    reasoning = sum(1 for d in answer["deltas"] if "reasoning_content" in d or "reasoning" in d)
    completion = len(answer["deltas"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        # A cache hit is simulated for requests that carry a cache key.
        "prompt_tokens_details": {"cached_tokens": prompt if body.get("prompt_cache_key") else 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def _logprobs(body: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any] | None:
    if not body.get("logprobs") or not delta.get("content"):
        return None
    token = delta["content"]
    top = [
        {"token": t, "logprob": lp, "bytes": list(t.encode())}
        for t, lp in [(token, -0.5), ("other", -1.5), ("else", -2.5)][
            : body.get("top_logprobs") or 0
        ]
    ]
    entry = {"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": top}
    return {"content": [entry], "refusal": None}


# Rendering --------------------------------------------------------------------------------------


def _chunk(model: str, choices: list[dict[str, Any]], body: dict[str, Any]) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-loopback",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_loopback",
        "choices": choices,
    }
    if (body.get("stream_options") or {}).get("include_usage"):
        chunk["usage"] = None  # OpenAI writes the key on every chunk once usage is asked for
    return chunk


def _choice(delta: dict[str, Any], logprobs: Any = None, finish: str | None = None) -> Any:
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


async def _stream(model: str, body: dict[str, Any], answer: dict[str, Any]) -> AsyncIterator[bytes]:
    newline = "\r\n" if model == "split" else "\n"

    def event(payload: Any) -> bytes:
        data = payload if isinstance(payload, str) else orjson.dumps(payload).decode()
        return f"data: {data}{newline}{newline}".encode()

    frames = [
        event(_chunk(model, [_choice({"role": "assistant", "content": "", "refusal": None})], body))
    ]
    if model == "split":
        frames.append(f": keep-alive{newline}{newline}".encode())
    for delta in answer["deltas"]:
        frames.append(event(_chunk(model, [_choice(delta, _logprobs(body, delta))], body)))
    if model == "drop_mid_stream":
        for frame in frames[:3]:
            yield frame
        await asyncio.sleep(0.05)  # let the client read what was sent before the cut
        raise _Dropped("scripted connection drop")
    if model in ("error_chunk", "error_chunk_429", "error_first"):
        for frame in frames[: 1 if model == "error_first" else 2]:  # the role (, some text)
            yield frame
        error: dict[str, Any] = {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        if model == "error_chunk_429":  # OpenRouter's shape: the HTTP status as the code
            error = {"message": "Rate limit exceeded upstream", "code": 429}
        yield event({"error": error})
        return
    if model == "stall":
        yield frames[0]
        yield frames[1]
        await asyncio.sleep(2.0)
        del frames[:2]
    if model == "malformed":
        yield frames[0]
        yield frames[1]
        yield event({"object": "chat.completion.chunk", "choices": ["not an object"]})
        return
    if model == "role_only":
        del frames[1:]
    if model not in ("truncated", "done_unfinished", "role_only"):
        frames.append(event(_chunk(model, [_choice({}, None, answer["finish"])], body)))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage_chunk = _chunk(model, [], body)
            usage_chunk["usage"] = _usage(body, answer)
            frames.append(event(usage_chunk))
    if model not in ("no_done", "truncated"):
        frames.append(event("[DONE]"))
    if model == "split":
        data = b"".join(frames)
        for start in range(0, len(data), 7):
            yield data[start : start + 7]
            await asyncio.sleep(0)
        return
    for frame in frames:
        yield frame


def _completion(model: str, body: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    content = [d["content"] for d in answer["deltas"] if "content" in d]
    reasoning = [d.get("reasoning_content") or d.get("reasoning") for d in answer["deltas"]]
    refusal = [d["refusal"] for d in answer["deltas"] if "refusal" in d]
    images = [image for d in answer["deltas"] for image in d.get("images", [])]
    calls: dict[str, dict[str, Any]] = {}
    for delta in answer["deltas"]:
        for call in delta.get("tool_calls", []):
            if "id" in call and call["id"] not in calls:
                calls[call["id"]] = {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""},
                }
            key = call.get("id") or list(calls)[call["index"]]
            calls[key]["function"]["arguments"] += call["function"].get("arguments", "")
    if content:
        message["content"] = "".join(content)
    if any(reasoning):
        message["reasoning_content"] = "".join(r for r in reasoning if r)
    if refusal:
        message["refusal"] = "".join(refusal)
    if calls:
        message["tool_calls"] = list(calls.values())
    if images:
        message["images"] = images
    logprobs = None
    if body.get("logprobs"):
        entries = [_logprobs(body, d) for d in answer["deltas"]]
        logprobs = {"content": [e["content"][0] for e in entries if e], "refusal": None}
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_loopback",
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": answer["finish"],
            }
        ],
        "usage": _usage(body, answer),
    }


def _error(
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    code: str | None = None,
) -> JSONResponse:
    kind = {429: "rate_limit_exceeded", 400: "invalid_request_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    error = {"message": message, "type": kind, "param": None, "code": code}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


async def _failing_stream(body: dict[str, Any], message: str) -> AsyncIterator[bytes]:
    for payload in (
        _chunk("echo_credentials_stream", [_choice({"content": "Partial "})], body),
        {"error": {"message": message, "type": "server_error", "param": None, "code": None}},
    ):
        yield b"data: " + orjson.dumps(payload) + b"\n\n"


def _echo_credentials(request: Request) -> str:
    """What careless upstreams write back: every header, whole and in other forms."""
    forms = []
    for name, value in request.headers.items():
        if name.lower() in _PLAIN_HEADERS:
            continue
        token = value.partition(" ")[2] or value
        forms += [f"{name}: {value}", token, token[: len(token) // 2], quote(value)]
    return "Invalid request; you sent " + " | ".join(forms)


def _auth_error(status: int, authorization: str) -> JSONResponse:
    # Echo the whole key back, worse than OpenAI's masked echo, to prove Relay never repeats it.
    given = authorization.removeprefix("Bearer ")
    return _error(status, f"Incorrect API key provided: {given}.", code="invalid_api_key")


@pytest.fixture(scope="session")
def chat_upstream() -> Iterator[ChatUpstream]:
    """A running loopback upstream that requires `Authorization: Bearer UPSTREAM_KEY`."""
    with ChatUpstream(api_key=UPSTREAM_KEY) as upstream:
        yield upstream


if __name__ == "__main__":  # python tests/chat_upstream.py [PORT]: serve until interrupted
    serve_forever(ChatUpstream)
