"""The HTTP/1.1 client Relay uses to call upstreams: a keep-alive pool for one origin, on
asyncio, with responses parsed by httptools (llhttp, the parser uvicorn runs on).

Why not aiohttp: on Python 3.11 a POST to a canned nginx on loopback took 250 us to the
first body bytes with aiohttp (its request and response objects, a task to write the body)
and about 70 us with this client (one write, one parse), on uvloop (docs/benchmarks.md has
the comparison, pyreqwest and rnet included). An upstream call is always the same shape (a
POST with a body we already hold as bytes, an answer read once, in order), so the client is
small:

- one request at a time per connection, one `transport.write` per request;
- idle connections are reused, newest first, for `idle_timeout_s` (4 s: below the 5 s that
  uvicorn, and so vLLM, keeps an idle connection open, the shortest common default), so a
  server rarely closes one as it is reused; a request is never sent twice: a POST that may
  have reached the server is not the client's to repeat (the router's retries decide);
- at most `max_connections` at once (busy ones: a stream holds its connection to its end);
  beyond, a request waits for one up to the connect timeout;
- a connect timeout, and a read timeout that bounds each wait for bytes, not the whole
  answer (a model may stream for minutes);
- reading pauses while `MAX_BUFFER` bytes wait for the consumer (a slow downstream client);
- answers are asked for uncompressed; gzip and deflate are still decoded should a server
  compress anyway;
- through a forward proxy (`relay.providers.proxy`, decided once per client): an https
  upstream through a CONNECT tunnel, TLS to the upstream inside it (`loop.start_tls`, which
  asyncio and uvloop both have), each tunnel a pooled connection like a direct one; an http
  upstream with absolute-form targets (`POST http://host/path`), which every proxy must take
  (RFC 9112, 3.2.2) while many refuse CONNECT to ports other than 443 (Squid's default).
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

from relay import __version__
from relay.providers.proxy import Proxy

MAX_BUFFER = 1 << 20  # bytes received and not yet read before the socket stops being read
MAX_IDLE = 256  # idle connections kept per origin; more are closed when released
# How long a released answer whose end is expected may take to end before its connection is
# closed rather than reused.
END_WAIT_S = 1.0


class HTTPClientError(Exception):
    """A transport failure: no usable answer came back."""


class ConnectFailed(HTTPClientError):
    """The upstream could not be reached (refused, unresolvable, TLS handshake failed)."""


class ConnectionLost(HTTPClientError):
    """The connection closed or broke before the answer was complete."""


class ReadTimeout(HTTPClientError, TimeoutError):
    """No byte arrived for `read_timeout_s`."""


class ConnectTimeout(ConnectFailed, TimeoutError):
    """The connection was not established within `connect_timeout_s`."""


class ProxyRefused(ConnectFailed):
    """The proxy answered a CONNECT with something other than 2xx (`status`)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def _header_block(*layers: Mapping[str, str]) -> bytes:
    """The header lines, rendered once; a later layer's header replaces an earlier one's of
    the same name, whatever its case."""
    merged: dict[str, tuple[str, str]] = {}
    for layer in layers:
        for name, value in layer.items():
            bad_name = not name.isascii() or any(c in name for c in ":\r\n\0 ") or not name
            if bad_name or any(c in value for c in "\r\n\0") or not value.isascii():
                raise ValueError(f"invalid HTTP header {name!r}")
            merged[name.lower()] = (name, value)
    return "".join(f"{name}: {value}\r\n" for name, value in merged.values()).encode("ascii")


class Response:
    """An answer: status and headers at once, the body as it arrives. `release()` it."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self.status = connection.status
        # Lower-case names; a repeated header's values joined with ", " (RFC 9110, 5.3).
        self.headers = connection.headers
        self.released = False

    async def read_chunk(self) -> bytes | None:
        """The body's next piece as it arrived (decoded if the server compressed it); None
        at its end."""
        while True:
            chunk = await self._connection.read_chunk()
            if chunk is None or chunk:
                return chunk

    async def chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self.read_chunk()) is not None:
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def release(self, *, end_expected: bool = False) -> None:
        """Give the connection back: to the pool when the answer was read to its end and the
        server keeps it alive, closed otherwise. Idempotent.

        `end_expected`: the caller has all it needs and the end follows at once (an SSE
        stream after `[DONE]`, whose chunked terminator often comes in a later packet): the
        rest is discarded as it comes and the connection goes to the pool at the end, or is
        closed if the end takes longer than END_WAIT_S. Without it, an unfinished answer
        closes the connection at once, which is how an upstream learns to stop generating."""
        if not self.released:
            self.released = True
            self._connection.finish_response(end_expected)


class HTTPClient:
    """Requests (POSTs, but for `relay check`) to URLs of one origin (`scheme://host:port`)
    over pooled connections."""

    def __init__(
        self,
        origin: str,
        *,
        headers: Mapping[str, str],
        connect_timeout_s: float,
        read_timeout_s: float,
        idle_timeout_s: float = 4.0,
        max_connections: int = 2048,
        ssl_context: ssl.SSLContext | None = None,
        proxy: Proxy | None = None,
    ) -> None:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {origin!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        if parts.scheme == "https":
            # Certificates are verified against the system's CAs unless told otherwise.
            self._ssl: ssl.SSLContext | None = ssl_context or ssl.create_default_context()
        else:
            self._ssl = None
        default_port = self._port == (443 if self._ssl else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        authority = host if default_port else f"{host}:{self._port}"
        self._proxy = proxy
        # Where connections go (the upstream or its proxy), and how they are opened.
        self._address = (proxy.host, proxy.port) if proxy else (self._host, self._port)
        self._open = self._tunnel if proxy and self._ssl else self._dial
        self._where = f"{self._host}:{self._port}" + (f" through {proxy.url}" if proxy else "")
        proxy_auth = {}
        if proxy is not None and proxy.authorization is not None:
            proxy_auth = {"Proxy-Authorization": proxy.authorization}
        # Without a tunnel, requests go to the proxy, with the upstream in their target.
        self._target_prefix = f"http://{authority}" if proxy and not self._ssl else ""
        self._headers = _header_block(
            {"Host": authority, "User-Agent": f"relay/{__version__}"},
            headers,
            {"Accept-Encoding": "identity"},
            {} if self._target_prefix == "" else proxy_auth,
        )
        # The tunnel's request: the proxy's credentials go there, never inside the tunnel.
        tunnel_to = f"{host}:{self._port}"  # CONNECT names the port always (RFC 9110, 9.3.6)
        self._connect_request = b"".join(
            [
                f"CONNECT {tunnel_to} HTTP/1.1\r\n".encode(),
                _header_block(
                    {"Host": tunnel_to, "User-Agent": f"relay/{__version__}"}, proxy_auth
                ),
                b"\r\n",
            ]
        )
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._idle: deque[tuple[float, _Connection]] = deque()
        self._busy: set[_Connection] = set()
        self._max_connections = max_connections
        # A slot per busy connection, taken before a connection is (reused or opened, so a
        # burst of opening ones counts too), given back when it leaves `_busy`.
        self._slots = asyncio.Semaphore(max_connections)

    async def post(self, target: str, body: bytes) -> Response:
        """Send `body` to `target` (a path, with its query) and wait for the status line and
        headers. Raises HTTPClientError (ConnectFailed, ConnectionLost, ReadTimeout)."""
        return await self.send("POST", target, body)

    async def send(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """`post`, by any method (`relay check` GETs a models list); `headers`: this
        request's own, beside those every request of this client carries (a trace's
        `traceparent`)."""
        request = b"".join(
            [
                f"{method} {self._target_prefix}{target} HTTP/1.1\r\n".encode(),
                self._headers,
                b"" if headers is None else _header_block(headers),
                b"Content-Length: %d\r\n\r\n" % len(body),
                body,
            ]
        )
        await self._take_slot()
        try:
            connection = self._reusable() or await self._connect()
        except BaseException:
            self._slots.release()
            raise
        return await connection.exchange(request)

    async def _take_slot(self) -> None:
        if not self._slots.locked():
            await self._slots.acquire()  # free: no wait
            return
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise ConnectTimeout(
                f"all {self._max_connections} connections to {self._host}:{self._port} "
                f"stayed busy for {self.connect_timeout_s} s"
            ) from None

    def _reusable(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            since, connection = self._idle.pop()
            if now - since < self._idle_timeout_s and connection.usable():
                self._busy.add(connection)
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                connection = await self._open()
        except TimeoutError:
            raise ConnectTimeout(
                f"no connection to {self._where} within {self.connect_timeout_s} s"
            ) from None
        except (OSError, ssl.SSLError) as error:
            raise ConnectFailed(f"{self._where}: {error}") from None
        self._busy.add(connection)
        return connection

    async def _dial(self) -> _Connection:
        """A connection to the upstream, or to the proxy that takes absolute-form targets."""
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: _Connection(self), *self._address, ssl=self._ssl
        )
        return connection

    async def _tunnel(self) -> _Connection:
        """A connection through the proxy's CONNECT tunnel, with TLS to the upstream inside
        it: its certificate and name verified as on a direct connection."""
        assert self._proxy is not None and self._ssl is not None
        loop = asyncio.get_running_loop()
        transport, handshake = await loop.create_connection(
            lambda: _TunnelRequest(self._connect_request), *self._address
        )
        try:
            status, reason = await handshake.answer
            if not 200 <= status < 300:
                raise ProxyRefused(
                    f"the proxy {self._proxy.url} refused a tunnel to {self._host}:{self._port} "
                    f"(HTTP {status} {reason})",
                    status,
                )
            connection = _Connection(self)
            tls = await loop.start_tls(transport, connection, self._ssl, server_hostname=self._host)
        except BaseException:
            handshake.answer.cancel()  # a late answer or loss has no one to hear it
            transport.abort()
            raise
        if tls is None:  # the proxy closed the tunnel during the handshake
            raise ConnectionResetError("the proxy closed the tunnel")
        connection.connection_made(tls)
        return connection

    def _put_back(self, connection: _Connection) -> None:
        self._busy.discard(connection)
        if len(self._idle) < MAX_IDLE:
            self._idle.append((time.monotonic(), connection))
        else:
            connection.close()
        self._slots.release()

    def _forget(self, connection: _Connection) -> None:
        if connection in self._busy:
            self._busy.discard(connection)
            self._slots.release()

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop()[1].close()
        for connection in list(self._busy):
            connection.close()


class _TunnelRequest(asyncio.Protocol):
    """Sends a CONNECT and reads the head of the proxy's answer; `answer` is its status and
    reason. On a 2xx the connection is handed to TLS (`loop.start_tls` takes it over)."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._parser = httptools.HttpResponseParser(self)
        self._reason = b""
        self.answer: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self._request)

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return  # a refusal's body: the connection is closed anyway
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._settle(ConnectionError(f"the proxy sent a malformed answer ({error})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._settle(exc or ConnectionResetError("the proxy closed the connection"))

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_headers_complete(self) -> None:
        reason = self._reason.decode("latin-1")
        self._settle((self._parser.get_status_code(), reason))

    def _settle(self, outcome: tuple[int, str] | Exception) -> None:
        if self.answer.done():
            return
        if isinstance(outcome, Exception):
            self.answer.set_exception(outcome)
        else:
            self.answer.set_result(outcome)


class _Connection(asyncio.Protocol):
    """One connection; one exchange at a time. httptools calls the on_* methods."""

    def __init__(self, client: HTTPClient) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        """Fresh state for the next exchange on this connection."""
        self._cancel_timer()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.received_any = False
        self._headers_done: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._keep_alive = False
        self._error: HTTPClientError | None = None
        # Neither a length nor chunked: the body ends when the connection does.
        self._until_close = False
        self._decoder: zlib._Decompress | None = None
        self._last_data = 0.0
        self._paused = False
        self._awaiting_end = False  # released; the rest is discarded until the end

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ConnectionLost("the upstream switched protocols"))
        except httptools.HttpParserError as error:
            self._fail(ConnectionLost(f"the upstream sent a malformed HTTP answer ({error})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_timer()
        if self._awaiting_end:
            self.close()
            return
        headers_came = self._headers_done is not None and self._headers_done.done()
        if headers_came and self._until_close and not self._complete:
            self.on_message_complete()
        elif not self._complete:
            detail = f": {exc}" if exc else ""
            self._fail(ConnectionLost(f"the upstream closed the connection{detail}"))
        # An idle connection stays in the pool until _reusable() finds it unusable.

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self.headers = {}  # an interim answer (100 Continue): the real one follows
            return
        self.status = status
        encoding = self.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(47)  # 32 + 15: gzip or zlib framing, detected
        elif encoding != "identity":
            self._fail(ConnectionLost(f"the upstream used an unsupported encoding {encoding!r}"))
            return
        self._until_close = (
            "content-length" not in self.headers and "transfer-encoding" not in self.headers
        )
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.status == 0 or self._error is not None or self._awaiting_end:
            return  # the body of an interim answer, of one we gave up on, or released
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error as error:
                self._fail(ConnectionLost(f"the upstream sent a corrupt compressed body: {error}"))
                return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > MAX_BUFFER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0 or self._error is not None:
            return
        self._complete = True
        # Asked now: once the parser has moved past the message it no longer knows.
        self._keep_alive = self._parser.should_keep_alive()
        self._cancel_timer()
        if self._awaiting_end:
            self._awaiting_end = False
            self.finish_response(end_expected=False)
            return
        if self._decoder is not None:
            self._chunks.append(self._decoder.flush())
        self._wake()

    # what Response and HTTPClient call

    def usable(self) -> bool:
        return not self._closed and self._transport is not None and not self._transport.is_closing()

    async def exchange(self, request: bytes) -> Response:
        assert self._transport is not None
        self._reset()
        self._headers_done = self._loop.create_future()
        self._transport.write(request)
        self._last_data = self._loop.time()
        self._timer = self._loop.call_at(self._last_data + self._client.read_timeout_s, self._tick)
        try:
            await self._headers_done
        except BaseException:
            self.close()  # a cancelled or failed exchange leaves the connection unusable
            raise
        return Response(self)

    async def read_chunk(self) -> bytes | None:
        """The next piece of the body; None at its end. Raises what broke the connection."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return None
            self._waiter = self._loop.create_future()
            await self._waiter
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= MAX_BUFFER // 2 and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return chunk

    def finish_response(self, end_expected: bool) -> None:
        reusable = self._error is None and self.usable()
        if reusable and self._paused and self._transport is not None:
            # Released with much of it unread: what comes next must be read again.
            self._paused = False
            self._transport.resume_reading()
        if reusable and self._complete and self._keep_alive:
            self._client._put_back(self)
        elif reusable and not self._complete and end_expected:
            self._awaiting_end = True
            self._chunks.clear()
            self._buffered = 0
            self._cancel_timer()
            self._timer = self._loop.call_later(END_WAIT_S, self.close)
        else:
            self.close()

    def close(self) -> None:
        self._client._forget(self)
        self._cancel_timer()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self._closed = True

    # internals

    def _fail(self, error: HTTPClientError) -> None:
        if self._error is None and not self._complete:
            self._error = error
        self._cancel_timer()
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_exception(self._error or error)
        self._wake()
        if self._transport is not None:
            self._transport.abort()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        """The read timeout: one timer a period, not one a chunk, moved on to the deadline
        of the last byte. While we stopped reading ourselves, the silence is not the
        upstream's."""
        now = self._loop.time()
        if self._paused:
            self._last_data = now
        deadline = self._last_data + self._client.read_timeout_s
        if now < deadline:
            self._timer = self._loop.call_at(deadline, self._tick)
            return
        self._timer = None
        self._fail(ReadTimeout(f"no data from the upstream for {self._client.read_timeout_s} s"))
