"""relay.providers.http_client against scripted loopback servers, on asyncio's loop and on
uvloop (the loop `relay serve` runs)."""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trustme
import uvloop
from test_openai_chat_provider import collect, failure, make_request, text_of

from relay.providers import http_client
from relay.providers.http_client import (
    MAX_BUFFER,
    ConnectFailed,
    ConnectionLost,
    ConnectTimeout,
    HTTPClient,
    ReadTimeout,
)
from relay.providers.openai_chat import OpenAIChatProvider

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Awaitable[None]], None]:
    """Run a test body on a fresh loop of each kind."""
    runner = asyncio.run if request.param == "asyncio" else uvloop.run
    return lambda body: runner(body)  # type: ignore[arg-type]


@dataclass
class Server:
    """A loopback server whose every connection runs `handler`; it counts connections and
    keeps the raw requests it read."""

    handler: Handler
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None
    port: int = 0
    tls: ssl.SSLContext | None = None

    async def __aenter__(self) -> Server:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "localhost", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls else 'http'}://localhost:{self.port}"

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        return request


def answer(body: bytes, *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunk(data: bytes) -> bytes:
    """One piece of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


async def fetch(http: HTTPClient, target: str = "/") -> bytes:
    """POST, read the whole answer, give the connection back."""
    response = await http.post(target, b"{}")
    try:
        return await response.read()
    finally:
        response.release()


def client(origin: str, **options: float) -> HTTPClient:
    return HTTPClient(
        origin,
        headers={"Content-Type": "application/json", "authorization": "Bearer one"},
        connect_timeout_s=options.get("connect", 2.0),
        read_timeout_s=options.get("read", 2.0),
    )


def test_keep_alive_reuses_one_connection(run: Callable[[Awaitable[None]], None]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await server.read_request(reader)
            writer.write(answer(b"echo:" + request.rpartition(b"\r\n\r\n")[2]))

    server = Server(handler)

    async def body() -> None:
        async with server:
            http = client(server.origin)
            for n in range(3):
                response = await http.post("/v1/chat?x=1", b"%d" % n)
                assert (response.status, await response.read()) == (200, b"echo:%d" % n)
                response.release()
            await http.aclose()

    run(body())
    assert server.connections == 1
    head = server.requests[0].split(b"\r\n\r\n")[0].decode()
    lines = head.split("\r\n")
    assert lines[0] == "POST /v1/chat?x=1 HTTP/1.1"
    assert f"Host: localhost:{server.port}" in lines
    assert "Content-Length: 1" in lines
    assert "authorization: Bearer one" in lines
    assert "Accept-Encoding: identity" in lines


def test_an_idle_connection_the_server_closed_is_replaced(
    run: Callable[[Awaitable[None]], None],
) -> None:
    """The server answers once per connection and closes without saying so: the next request
    meets a dead pooled connection, and is sent again on a fresh one."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(b"ok"))
        await writer.drain()

    server = Server(handler)

    async def body() -> None:
        async with server:
            http = client(server.origin)
            for _ in range(3):
                assert await fetch(http) == b"ok"
                await asyncio.sleep(0.05)  # the close reaches us, or not: both must work
            await http.aclose()

    run(body())
    assert server.connections == 3
    assert len(server.requests) == 3


def test_a_request_the_server_may_have_read_is_never_sent_twice(
    run: Callable[[Awaitable[None]], None],
) -> None:
    """The second request on a kept connection is read by the server, which then closes
    without answering: it may have acted on it (a generation begun), so the client reports
    the loss instead of sending it again; the router decides on retries."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(b"ok"))
        await writer.drain()
        await server.read_request(reader)  # and close without answering

    server = Server(handler)

    async def body() -> None:
        async with server:
            http = client(server.origin)
            assert await fetch(http) == b"ok"
            with pytest.raises(ConnectionLost):
                await http.post("/", b"{}")
            await http.aclose()

    run(body())
    assert len(server.requests) == 2


def test_connections_are_capped_and_a_request_waits_for_one(
    run: Callable[[Awaitable[None]], None],
) -> None:
    """Two connections at most: a third request waits until one is given back, and one that
    finds none free within the connect timeout is a ConnectTimeout."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(answer(b"ok"))
            await writer.drain()

    server = Server(handler)

    async def body() -> None:
        async with server:
            http = HTTPClient(
                server.origin,
                headers={},
                connect_timeout_s=0.3,
                read_timeout_s=2.0,
                max_connections=2,
            )
            held = [await http.post("/", b"{}") for _ in range(2)]
            with pytest.raises(ConnectTimeout, match="all 2 connections"):
                await http.post("/", b"{}")
            third = asyncio.ensure_future(fetch(http))
            await asyncio.sleep(0.05)
            assert not third.done()  # waiting for a connection
            await held[0].read()
            held[0].release()
            assert await asyncio.wait_for(third, 1) == b"ok"
            held[1].release()
            await http.aclose()

    run(body())
    assert server.connections == 2


def test_connection_close_is_not_reused(run: Callable[[Awaitable[None]], None]) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(answer(b"ok", "Connection: close"))

    server = Server(handler)

    async def body() -> None:
        async with server:
            http = client(server.origin)
            for _ in range(2):
                assert await fetch(http) == b"ok"
            await http.aclose()

    run(body())
    assert server.connections == 2


def test_a_fresh_connection_that_dies_is_an_error_not_a_retry(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)  # and close without answering

    server = Server(handler)

    async def body() -> None:
        async with server:
            http = client(server.origin)
            with pytest.raises(ConnectionLost):
                await http.post("/", b"{}")
            await http.aclose()

    run(body())
    assert server.connections == 1


def test_bodies_chunked_close_delimited_and_gzip(run: Callable[[Awaitable[None]], None]) -> None:
    """The three ways an answer's end is known, and a compressed answer, each arriving in
    pieces; the pieces come out in order and whole."""
    packed = gzip.compress(b'{"compressed": true}')

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            kind = (await server.read_request(reader)).split(b" ")[1]
            if kind == b"/close":
                writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil ")
                await writer.drain()
                await asyncio.sleep(0.01)
                writer.write(b"the end")
                await writer.drain()
                return  # closing ends the body
            if kind == b"/chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for piece in (b"data: one\n\n", b"data: two\n\n"):
                    writer.write(chunk(piece))
                    await writer.drain()
                    await asyncio.sleep(0.01)
                writer.write(b"0\r\n\r\n")
            else:
                half = len(packed) // 2
                writer.write(answer(packed, "Content-Encoding: gzip")[:-half])
                await writer.drain()
                await asyncio.sleep(0.01)
                writer.write(packed[-half:])
            await writer.drain()

    server = Server(handler)

    async def body() -> None:
        async with server:
            http = client(server.origin)
            chunked = await http.post("/chunked", b"{}")
            assert [piece async for piece in chunked.chunks()] == [
                b"data: one\n\n",
                b"data: two\n\n",
            ]
            chunked.release()
            closed = await http.post("/close", b"{}")
            assert await closed.read() == b"until the end"
            closed.release()
            compressed = await http.post("/gzip", b"{}")
            assert compressed.headers["content-encoding"] == "gzip"
            assert await compressed.read() == b'{"compressed": true}'
            compressed.release()
            await http.aclose()

    run(body())


def test_read_timeout_before_and_after_the_headers(
    run: Callable[[Awaitable[None]], None],
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await server.read_request(reader)
        if request.startswith(b"POST /late-body"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
            await writer.drain()
        await reader.read()  # then silence

    server = Server(handler)

    async def body() -> None:
        async with server:
            http = client(server.origin, read=0.2)
            with pytest.raises(ReadTimeout):
                await http.post("/no-headers", b"{}")
            response = await http.post("/late-body", b"{}")
            pieces = response.chunks()
            assert await anext(pieces) == b"half"
            with pytest.raises(ReadTimeout):
                await anext(pieces)
            response.release()
            await http.aclose()

    run(body())


def test_a_slow_reader_pauses_the_socket_and_loses_nothing(
    run: Callable[[Awaitable[None]], None],
) -> None:
    """4 MiB sent at once while the consumer waits: reading stops past the buffer limit (the
    server's writes back up) and resumes as the consumer catches up."""
    payload = bytes(range(256)) * (4 << 12)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(payload))
        await writer.drain()
        await reader.read()

    server = Server(handler)
    waited: list[bool] = []

    async def body() -> None:
        async with server:
            http = client(server.origin)
            response = await http.post("/", b"{}")
            await asyncio.sleep(0.3)
            # Past the limit the socket is no longer read: what waits is bounded.
            waited.append(response._connection._buffered <= 2 * (1 << 20))
            assert await response.read() == payload
            response.release()
            await http.aclose()

    run(body())
    assert waited == [True]


def test_an_answer_released_while_reading_is_paused_leaves_the_connection_reading(
    run: Callable[[Awaitable[None]], None],
) -> None:
    """An answer that arrived whole past the buffer limit (reading paused) and is released
    unread, as after [DONE]: its connection goes back to the pool and reads the next answer."""
    first = answer(b"x" * (MAX_BUFFER + 1000))

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        # All but the last KiB, then the rest in one small write: the read that takes the
        # buffer past MAX_BUFFER is the one that ends the answer, however the kernel splits
        # the first part (a single write made this depend on the split, and flaky).
        writer.write(first[:-1024])
        await asyncio.sleep(0.2)
        writer.write(first[-1024:])
        await server.read_request(reader)
        writer.write(answer(b"second"))

    server = Server(handler)

    async def body() -> None:
        async with server:
            http = client(server.origin, read=1.0)
            response = await http.post("/", b"{}")
            for _ in range(100):
                if response._connection._complete:
                    break
                await asyncio.sleep(0.05)
            assert response._connection._complete and response._connection._paused
            await response.read_chunk()
            response.release()
            assert await fetch(http) == b"second"
            await http.aclose()

    run(body())
    assert server.connections == 1


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
SSE_HI = (
    b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}\n\n'
)


def test_a_chat_stream_keeps_its_connection_when_the_end_follows_done(
    run: Callable[[Awaitable[None]], None],
) -> None:
    """Servers write [DONE] and the chunked terminator apart (two packets): the provider stops
    reading at [DONE], and the connection still goes back to the pool once the end came."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(SSE_HEAD + chunk(SSE_HI) + chunk(b"data: [DONE]\n\n"))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"0\r\n\r\n")

    server = Server(handler)

    async def body() -> None:
        async with server:
            provider = OpenAIChatProvider(f"http://127.0.0.1:{server.port}/v1", None)
            try:
                for _ in range(3):
                    assert text_of(await collect(provider, make_request())) == "hi"
                    await asyncio.sleep(0.1)
            finally:
                await provider.aclose()

    run(body())
    assert server.connections == 1
    assert len(server.requests) == 3


def test_an_answer_whose_expected_end_never_comes_is_closed(
    run: Callable[[Awaitable[None]], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_client, "END_WAIT_S", 0.1)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = server.connections == 1
        await server.read_request(reader)
        writer.write(SSE_HEAD + chunk(b"data: [DONE]\n\n"))
        if first:
            await reader.read()  # and never end the body
        writer.write(b"0\r\n\r\n")
        await reader.read()

    server = Server(handler)

    async def body() -> None:
        async with server:
            http = client(server.origin)
            response = await http.post("/", b"{}")
            assert await response.read_chunk() == b"data: [DONE]\n\n"
            response.release(end_expected=True)
            await asyncio.sleep(0.3)
            assert await fetch(http) == b"data: [DONE]\n\n"
            await http.aclose()

    run(body())
    assert server.connections == 2


def test_https_verifies_the_upstream_certificate(run: Callable[[Awaitable[None]], None]) -> None:
    """TLS with SNI and verification: a certificate from a trusted CA for "localhost" works
    (and its connection is reused); the same server is refused under the system's CAs."""
    authority = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(tls)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(answer(b"secret"))

    server = Server(handler, tls=tls)

    async def body() -> None:
        async with server:
            http = HTTPClient(
                server.origin,
                headers={},
                connect_timeout_s=2,
                read_timeout_s=2,
                ssl_context=trusting,
            )
            for _ in range(2):
                assert await fetch(http) == b"secret"
            await http.aclose()
            untrusting = client(server.origin)
            with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
                await fetch(untrusting)
            await untrusting.aclose()

    run(body())
    assert server.connections == 1  # kept alive; the refused one never finished its handshake


def test_connection_refused_is_connect_failed(run: Callable[[Awaitable[None]], None]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def body() -> None:
        http = client(f"http://127.0.0.1:{port}")
        with pytest.raises(ConnectFailed):
            await http.post("/", b"{}")
        await http.aclose()

    run(body())


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Bad": "one\r\nInjected: two"},
        {"Bad Name": "x"},
        {"": "x"},
        {"X-Nul": "a\0b"},
        {"X-Snow": "\u2603"},
    ],
)
def test_header_injection_is_refused_up_front(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="invalid HTTP header"):
        HTTPClient("http://127.0.0.1:1", headers=headers, connect_timeout_s=1, read_timeout_s=1)


def test_credentials_in_a_base_url_become_basic_auth(
    run: Callable[[Awaitable[None]], None],
) -> None:
    """A chat upstream behind a proxy that wants user:password in the URL: the provider sends
    them as Basic auth, never in the Host header or the request line, and redacts the
    password from what it raises."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 24\r\n\r\nsecret-password-1 broke\n")
        await writer.drain()
        await reader.read()

    server = Server(handler)

    async def body() -> None:
        async with server:
            base = f"http://me:secret-password-1@127.0.0.1:{server.port}/v1"
            provider = OpenAIChatProvider(base, None)
            try:
                error = await failure(provider, make_request())
            finally:
                await provider.aclose()
            assert "secret-password-1" not in error.message
            assert "[redacted]" in error.message

    run(body())
    head = server.requests[0].split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert head[0] == "POST /v1/chat/completions HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}" in head
    assert "Authorization: Basic bWU6c2VjcmV0LXBhc3N3b3JkLTE=" in head
