"""What every provider that calls an HTTP upstream shares: the pooled client with its
credentials, the scrubbing of those credentials from anything the upstream says, the mapping
of upstream failures to `ProviderError`, the SSE decoder and the delta stream that releases
its connection.

Upstream text is quoted only through `Upstream.quote`, which scrubs every credential sent
upstream, in every form (`relay.providers.credentials`), before cutting it to length.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson

from relay.observe import tracing
from relay.providers.base import Delta, ProviderError, TokenCount
from relay.providers.credentials import Scrubber, basic_token
from relay.providers.http_client import (
    ConnectFailed,
    HTTPClient,
    HTTPClientError,
    ProxyRefused,
    Response,
)
from relay.providers.proxy import proxy_for

MAX_MESSAGE = 500  # upstream error text we quote, so a huge HTML error page stays out of logs
MAX_SCANNED = 4 * MAX_MESSAGE  # scrubbed before the cut, however much the scrubbing shortens


TRUNCATED = "upstream_truncated"  # the code of a stream that ended before it finished


class EventState(Protocol):
    """What a provider remembers between the events of one stream, and turns them into."""

    finished: bool  # the stream's last event came: nothing more is read

    def opening(self, event: dict[str, Any]) -> bool:
        """The event only opens the stream (nothing of the answer yet)."""
        ...

    def cut_short(self) -> bool:
        """The body ended before `finished`: whether the stream lacks its end (its
        terminal event, a chat finish_reason), so that what came is not the whole answer."""
        ...

    def feed(self, event: dict[str, Any]) -> list[Delta]: ...

    def closing(self) -> list[Delta]: ...


class Upstream:
    """One upstream origin: its base path, the headers every request carries (the
    credential among them), a pooled HTTP client."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        key_header: str = "Authorization",
        extra_headers: Mapping[str, str] | None = None,
        timeout_s: float = 600.0,
        deployment: str,
        key_env: str | None = None,
        max_connections: int = 2048,
    ) -> None:
        url = urlsplit(base_url.rstrip("/"))
        self.base_path = url.path
        self.query = f"?{url.query}" if url.query else ""
        origin = f"{url.scheme}://{url.netloc.rpartition('@')[2]}"
        # What failures name: the deployment, where its key comes from, the URL it calls.
        self._deployment = deployment
        self._origin = origin
        if key_env is not None:
            self._credentials = f"its key, from the environment variable {key_env}"
        elif url.username is not None:
            self._credentials = "the user and password in its base_url"
        else:
            self._credentials = "no key: set its api_key_env to the variable that holds one"
        headers = {"Content-Type": "application/json"}
        if url.username is not None:
            # Credentials in the base URL (a proxy in front of a self-hosted model) are Basic auth.
            headers["Authorization"] = "Basic " + basic_token(url.username, url.password or "")
        if api_key:
            headers[key_header] = f"Bearer {api_key}" if key_header == "Authorization" else api_key
        headers.update(extra_headers or {})
        # Decided once, here: the environment is read at start-up, not per request.
        default_port = 443 if url.scheme == "https" else 80
        self.proxy = proxy_for(url.scheme, url.hostname or "", url.port or default_port)
        # Every credential sent, in every form, is scrubbed from the upstream text we quote
        # (the proxy's, which a proxy's error page or a broken upstream may echo, among them).
        self._scrub = Scrubber.for_upstream(
            api_key=api_key,
            username=url.username,
            password=url.password,
            headers=extra_headers,
            proxy_username=self.proxy.username if self.proxy else None,
            proxy_password=self.proxy.password if self.proxy else None,
        )
        # A dead host should fail fast so the engine can fall back; a slow model may take minutes
        # between bytes, so only the connect phase gets the shorter bound.
        self.http = HTTPClient(
            origin,
            headers=headers,
            connect_timeout_s=min(timeout_s, 10.0),
            read_timeout_s=timeout_s,
            max_connections=max_connections,
            proxy=self.proxy,
        )

    def target(self, path: str) -> str:
        """The request target of `path` under the base URL (its query kept)."""
        return self.base_path + path + self.query

    async def aclose(self) -> None:
        await self.http.aclose()

    async def post(self, target: str, body: bytes) -> Response:
        """POST `body`; the answer once the upstream accepted it (status < 300), else the
        failure as a ProviderError, its body read and quoted."""
        return await self._send("POST", target, body)

    async def _send(self, method: str, target: str, body: bytes) -> Response:
        try:
            # With tracing on, the upstream is told the trace (W3C traceparent) of this try.
            response = await self.http.send(method, target, body, tracing.outgoing())
        except HTTPClientError as exc:
            raise self.transport_error(exc) from None
        if response.status >= 300:
            try:
                raw = await response.read()
            except HTTPClientError:
                raw = b""
            finally:
                response.release()
            raise self.status_error(response.status, response.headers, raw, target)
        return response

    async def ask(self, target: str, question: dict[str, Any] | None = None) -> Any:
        """A small JSON exchange: a POST of `question` (token counting), or a GET without
        one (the models list `relay check` reads)."""
        if question is None:
            response = await self._send("GET", target, b"")
        else:
            response = await self.post(target, orjson.dumps(question))
        try:
            raw = await response.read()
        except HTTPClientError as exc:
            raise self.transport_error(exc) from None
        finally:
            response.release()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ProviderError("the upstream's answer is not JSON") from None

    async def count_tokens(
        self, path: str, body: dict[str, Any], fields: tuple[str, ...]
    ) -> TokenCount:
        """The upstream's own count of input tokens (Messages' count_tokens, Responses'
        input_tokens): `fields` of the body it would be sent, to `path`; the answer's
        `input_tokens`, exact."""
        question = {key: body[key] for key in fields if key in body}
        answer = await self.ask(self.target(path), question)
        try:
            return TokenCount(int(answer["input_tokens"]), exact=True)
        except (KeyError, TypeError, ValueError):
            raise ProviderError("the upstream's token count could not be read") from None

    # Errors --------------------------------------------------------------------------------------

    def quote(self, text: str) -> str:
        """Upstream text as Relay may repeat it: credentials scrubbed, then cut to length (in
        that order, so that a cut never leaves part of a key)."""
        return self._scrub(text[:MAX_SCANNED])[:MAX_MESSAGE]

    def transport_error(self, exc: BaseException) -> ProviderError:
        detail = self.quote(str(exc)) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            return ProviderError(
                f"the upstream timed out ({type(exc).__name__})",
                status=408,
                code="request_timeout",
            )
        if isinstance(exc, ProxyRefused) and exc.status < 500:
            return self._proxy_refused(detail, exc.status)
        if isinstance(exc, ConnectFailed):
            # A proxy's 5xx to a CONNECT (it could not reach the upstream) lands here too.
            return ProviderError(
                f"could not connect to the upstream: {detail}", code="upstream_unreachable"
            )
        return ProviderError(f"the upstream connection failed: {detail}")

    def status_error(
        self, status: int, headers: Mapping[str, str], raw: bytes, target: str | None = None
    ) -> ProviderError:
        """The failure an upstream answered with (`target`: the request's, when it was an
        HTTP status rather than an error event in a stream)."""
        retry_after = headers.get("retry-after")
        if status == 407 and self.proxy is not None:  # only a proxy asks for credentials so
            return self._proxy_refused(
                f"the proxy {self.proxy.url} refused the request (HTTP 407)", 407
            )
        if status in (401, 403):
            # The upstream's text is not quoted: some echo the (masked or whole) key back.
            return ProviderError(
                f"the upstream refused the credentials of deployment '{self._deployment}' "
                f"(HTTP {status}); it sent {self._credentials}",
                status=502,
                code="upstream_auth_failed",
                retryable=False,
            )
        message = self.quote(error_message(raw))
        if status == 429:
            return ProviderError(
                f"the upstream is rate limiting requests: {message}",
                status=429,
                code="rate_limit_exceeded",
                retry_after=retry_after,
            )
        if status in (400, 413) and CONTEXT_TOO_LONG.search(message):
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
                f"the upstream has no such endpoint or model (HTTP 404{self._where(target)}): "
                f"{message}",
                status=502,
                code="upstream_not_found",
            )
        if status == 529:  # Anthropic: overloaded, try again later or elsewhere
            return ProviderError(
                f"the upstream is overloaded (HTTP 529): {message}",
                status=503,
                code="upstream_overloaded",
                retry_after=retry_after,
            )
        # 408, 409, 5xx and the 4xx that mean "this upstream cannot serve it" (402 out of credit,
        # 405/415 misconfigured): another model in the fallback list may well succeed.
        return ProviderError(
            f"the upstream failed (HTTP {status}): {message}",
            status=503 if status == 503 else 502,
            retry_after=retry_after,
        )

    def _proxy_refused(self, detail: str, status: int) -> ProviderError:
        """A proxy that will not carry this deployment's requests (its credentials, its
        rules): no use retrying it, but another deployment may not go through it."""
        hint = ": check the user and password in the proxy's URL" if status == 407 else ""
        return ProviderError(f"{detail}{hint}", status=502, code="proxy_refused", retryable=False)

    def _where(self, target: str | None) -> str:
        """Where a request went and how that URL was made, for a 404: the mistakes in a
        base_url (a missing /v1, an endpoint written into it) differ only there. The query
        is left out (some upstreams take keys there)."""
        if target is None:
            return ""
        path = target.removesuffix(self.query)
        endpoint = path.removeprefix(self.base_path)
        return (
            f" from {self._origin}{path}, the base_url of deployment '{self._deployment}' "
            f"followed by {endpoint}: check its base_url and upstream_model"
        )

    async def stream(
        self, response: Response, check: Callable[[Any], None], state: EventState
    ) -> AsyncIterator[Delta]:
        """The deltas of an SSE answer whose events are JSON objects. Its opening events
        (`state.opening`: Responses' created and in_progress, Anthropic's message_start and
        pings) and the first one after them are read now: a failure among them (`check`
        raises it) is one before the first byte of the answer, retried and failed over like
        an HTTP error."""
        events = self.events(response)
        read: list[Any] = []
        try:
            while True:
                event = await anext(events, None)
                if event is None:
                    raise truncated("the upstream's stream ended before any of the answer")
                self._checked(check, event)
                read.append(event)
                if not state.opening(event):
                    break
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            # An event of the wrong shape is the upstream's failure, as below.
            await events.aclose()
            response.release()
            raise _unreadable(exc) from None
        except BaseException:
            await events.aclose()
            response.release()
            raise
        deltas = self._translate(response, events, read, check, state)
        return DeltaStream(response, deltas, events)

    @staticmethod
    def _checked(check: Callable[[Any], None], event: Any) -> None:
        try:
            check(event)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise _unreadable(exc) from None

    async def _translate(
        self,
        response: Response,
        events: AsyncGenerator[Any, None],
        read: list[Any],
        check: Callable[[Any], None],
        state: EventState,
    ) -> AsyncGenerator[Delta, None]:
        try:
            async with aclosing(events):
                for event in read:  # checked already
                    for delta in state.feed(event):
                        yield delta
                read.clear()  # not held in this frame for as long as the stream is open
                while not state.finished:
                    event = await anext(events, None)
                    if event is None:
                        if state.cut_short():
                            raise truncated("the upstream's stream ended before it finished")
                        break
                    check(event)
                    for delta in state.feed(event):
                        yield delta
                # Only the body's end is to come: the connection waits for it, then goes
                # back to the pool (before `events` is closed, which would close it).
                response.release(end_expected=True)
            for delta in state.closing():
                yield delta
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            # An event of the wrong shape is the upstream's failure, and must reach the
            # engine as one.
            raise _unreadable(exc) from None
        finally:
            response.release()

    async def events(
        self, response: Response, decoder: SSEDecoder | None = None
    ) -> AsyncGenerator[Any, None]:
        """The JSON payloads of an SSE answer, each network read's events before the next
        read; the connection released at the end (kept when the stream said [DONE], which
        `decoder.done` tells)."""
        decoder = decoder or SSEDecoder()
        try:
            while not decoder.done:
                data = await response.read_chunk()
                for event in decoder.feed(data) if data is not None else decoder.finish():
                    yield event
                if data is None:
                    break
        except HTTPClientError as exc:
            raise self.transport_error(exc) from None
        finally:
            response.release(end_expected=decoder.done)


def truncated(message: str) -> ProviderError:
    """A stream that ended without its end: an upstream failure (retried and failed over
    when nothing of the answer came yet), never a short success."""
    return ProviderError(message, code=TRUNCATED)


def _unreadable(exc: Exception) -> ProviderError:
    return ProviderError(f"the upstream sent an event Relay could not read ({type(exc).__name__})")


class DeltaStream(AsyncIterator[Delta]):
    """The delta generator, plus an `aclose` that releases the connection even if never started.

    An async generator that was never iterated skips its `finally`, which would leak the pooled
    connection when the engine is cancelled between `open()` and the first delta.
    """

    def __init__(
        self,
        response: Response,
        deltas: AsyncGenerator[Delta, None],
        events: AsyncGenerator[Any, None] | None = None,
    ) -> None:
        self._response = response
        self._deltas = deltas
        self._events = events  # the events `deltas` reads, started before it was

    def __aiter__(self) -> DeltaStream:
        return self

    async def __anext__(self) -> Delta:
        return await self._deltas.__anext__()

    async def aclose(self) -> None:
        try:
            await self._deltas.aclose()
            if self._events is not None:
                await self._events.aclose()
        finally:
            self._response.release()


class SSEDecoder:
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
                yield loads(payload)


def _lines(text: bytes) -> list[bytes]:
    if b"\r" in text:
        text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return text.split(b"\n")


def loads(payload: bytes) -> Any:
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
CONTEXT_TOO_LONG = re.compile(
    r"context[ _-]?(length|window|size)|maximum context|prompt is too long|too many tokens",
    re.IGNORECASE,
)


def error_message(raw: bytes) -> str:
    """The human part of an upstream error body, in any of the shapes we have seen."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:MAX_SCANNED].decode("utf-8", "replace").strip() or "no error message"
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
