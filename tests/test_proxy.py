"""Upstream calls through a real forward proxy (proxy.py, from PyPI, run as a process on
loopback, with Basic credentials): https upstreams through a CONNECT tunnel, http upstreams
with absolute-form targets, NO_PROXY, refusals, and Relay serving a request through it."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from chat_upstream import UPSTREAM_KEY, ChatUpstream
from live_server import free_port, relay_server
from test_http_client import Server, answer, fetch, run  # noqa: F401  (run: a fixture)
from test_openai_chat_provider import failure, make_request

from relay.config import RouteConfig, Settings
from relay.providers.base import ProviderError
from relay.providers.http_client import HTTPClient
from relay.providers.openai_chat import OpenAIChatProvider
from relay.providers.proxy import Proxy, proxy_for

USER, PASSWORD = "relay", "proxy-pass-5f3k9q"
VIA = b"Via: 1.1 proxy.py"  # what proxy.py adds to a request it forwards
PROXY_VARIABLES = ["http_proxy", "https_proxy", "no_proxy", "all_proxy"]


class ProxyProcess:
    """proxy.py on a free loopback port, asking for USER:PASSWORD."""

    def __init__(self, folder: Path) -> None:
        port_file = folder / "port"
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0"),
                *("--port-file", str(port_file), "--num-workers", "1", "--num-acceptors", "1"),
                *("--basic-auth", f"{USER}:{PASSWORD}", "--log-level", "WARNING"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("proxy.py did not start")
            time.sleep(0.05)
        self.port = int(port_file.read_text())

    def url(self, password: str = PASSWORD) -> str:
        return f"http://{USER}:{password}@127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    running = ProxyProcess(tmp_path_factory.mktemp("proxy"))
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy variable of the machine running the tests leaks in."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


async def failure_at(base_url: str) -> ProviderError:
    """How a chat deployment at `base_url`, asked once through the environment's proxy,
    fails."""
    provider = OpenAIChatProvider(base_url, None)
    try:
        return await failure(provider, make_request())
    finally:
        await provider.aclose()


def closed_port() -> int:
    return free_port()  # free a moment ago: nothing listens there


@pytest.mark.parametrize(
    ("no_proxy", "host", "bypassed"),
    [
        ("", "api.example.com", False),
        ("*", "api.example.com", True),
        ("example.com", "api.example.com", True),
        (".example.com", "api.example.com", True),
        ("example.com", "notexample.com", False),
        ("other.org, API.example.com", "api.example.com", True),
        ("api.example.com:8443", "api.example.com", True),
        ("127.0.0.1", "127.0.0.1", True),
        ("localhost", "127.0.0.1", False),  # names are not resolved, as curl does not
    ],
)
def test_no_proxy_decides_as_the_standard_library(
    monkeypatch: pytest.MonkeyPatch, no_proxy: str, host: str, bypassed: bool
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://u:p@proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    expected = None if bypassed else Proxy("proxy.internal", 3128, "u", "p")
    assert proxy_for("https", host, 8443) == expected


def test_each_scheme_has_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "plain:8080")  # no scheme: http, as curl takes it
    assert proxy_for("http", "up", 80) == Proxy("plain", 8080)
    assert proxy_for("https", "up", 443) is None
    monkeypatch.setenv("https_proxy", "http://lower:1")
    monkeypatch.setenv("HTTPS_PROXY", "http://upper:1")
    assert proxy_for("https", "up", 443) == Proxy("lower", 1)
    monkeypatch.setenv("https_proxy", "socks5://user:secret-pw@s:1080")
    with pytest.raises(ValueError, match="https_proxy is a socks5:// URL") as refused:
        proxy_for("https", "up", 443)
    assert "secret-pw" not in str(refused.value)


def test_https_upstream_through_a_connect_tunnel(
    run: Callable[[Awaitable[None]], None],  # noqa: F811
    proxy: ProxyProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TLS to the upstream inside the tunnel: verified (a CA the client does not trust is
    refused through the proxy too), its connection pooled, the proxy's credentials only in
    the CONNECT, never inside the tunnel."""
    authority = trustme.CA()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(tls)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(answer(b"through"))

    server = Server(handler, tls=tls)

    def through(context: ssl.SSLContext | None) -> HTTPClient:
        return HTTPClient(
            server.origin,
            headers={},
            connect_timeout_s=5,
            read_timeout_s=5,
            ssl_context=context,
            proxy=proxy_for("https", "localhost", server.port),
        )

    async def body() -> None:
        async with server:
            http = through(trusting)
            for _ in range(3):
                assert await fetch(http, "/v1/x") == b"through"
            await http.aclose()
            untrusting = through(None)
            with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
                await fetch(untrusting)
            await untrusting.aclose()
            # proxy.py passes the close on to the server later: let the server's side of the
            # failed handshake end before this loop does.
            await asyncio.sleep(0.3)

    run(body())
    # One tunnel for the three requests (the refused one never finished its handshake).
    assert server.connections == 1
    head = server.requests[0].split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert head[0] == "POST /v1/x HTTP/1.1"
    assert f"Host: localhost:{server.port}" in head
    assert not any(line.lower().startswith("proxy-") for line in head)


def test_http_upstream_through_the_proxy(
    run: Callable[[Awaitable[None]], None],  # noqa: F811
    proxy: ProxyProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Absolute-form requests to the proxy; the proxy's password, echoed by the upstream,
    is redacted from the error Relay raises."""
    monkeypatch.setenv("HTTP_PROXY", proxy.url())

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request = await server.read_request(reader)
            echoed = f"saw {PASSWORD} and {request.split(b' ')[1].decode()}".encode()
            writer.write(answer(echoed).replace(b"200 OK", b"500 Oops"))

    server = Server(handler)

    async def body() -> None:
        async with server:
            provider = OpenAIChatProvider(f"http://127.0.0.1:{server.port}/v1", None)
            try:
                for _ in range(2):
                    error = await failure(provider, make_request())
                    assert PASSWORD not in error.message
                    assert "[redacted]" in error.message
                    assert error.code == "upstream_error"
            finally:
                await provider.aclose()

    run(body())
    assert len(server.requests) == 2
    assert server.connections == 1  # the proxy's connection to it kept alive, as Relay's
    assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"proxy-authorization" not in server.requests[0].lower()
    # proxy.py treats only the first request of a kept-alive connection as a proxy does (adds
    # Via, drops Proxy-Authorization); it relays later ones as they come.
    assert VIA in server.requests[0]


def test_no_proxy_bypasses_the_proxy(
    run: Callable[[Awaitable[None]], None],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A loopback upstream listed in NO_PROXY is called directly (the proxy named in
    HTTP_PROXY does not exist)."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("NO_PROXY", "example.com,127.0.0.1")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer(b"direct"))

    async def body() -> None:
        async with server:
            http = HTTPClient(
                f"http://127.0.0.1:{server.port}",
                headers={},
                connect_timeout_s=2,
                read_timeout_s=2,
                proxy=proxy_for("http", "127.0.0.1", server.port),
            )
            assert await fetch(http) == b"direct"
            await http.aclose()

    server = Server(handler)
    run(body())


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_proxy_refusing_the_credentials_is_a_clear_error(
    run: Callable[[Awaitable[None]], None],  # noqa: F811
    proxy: ProxyProcess,
    monkeypatch: pytest.MonkeyPatch,
    scheme: str,
) -> None:
    """407 to a CONNECT or to a request: `proxy_refused`, naming the proxy without its
    credentials, not retried on the deployment (the next one is tried)."""
    monkeypatch.setenv(f"{scheme.upper()}_PROXY", proxy.url("wrong-password-77"))

    async def body() -> None:
        error = await failure_at(f"{scheme}://127.0.0.1:{closed_port()}/v1")
        assert (error.code, error.status, error.retryable) == ("proxy_refused", 502, False)
        assert f"the proxy http://127.0.0.1:{proxy.port} refused" in error.message
        assert "407" in error.message
        assert "user and password" in error.message
        assert "wrong-password-77" not in error.message
        assert USER not in error.message

    run(body())


def test_a_proxy_that_cannot_reach_the_upstream_is_retryable(
    run: Callable[[Awaitable[None]], None],  # noqa: F811
    proxy: ProxyProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """proxy.py answers a CONNECT to a port nobody listens on with 502: the upstream is
    unreachable, as without a proxy, and worth retrying."""
    monkeypatch.setenv("HTTPS_PROXY", proxy.url())

    async def body() -> None:
        error = await failure_at(f"https://127.0.0.1:{closed_port()}/v1")
        assert (error.code, error.retryable) == ("upstream_unreachable", True)
        assert f"the proxy http://127.0.0.1:{proxy.port} refused" in error.message
        assert "HTTP 502" in error.message
        assert PASSWORD not in error.message

    run(body())


def test_relay_serves_a_request_through_the_proxy(
    proxy: ProxyProcess,
    chat_upstream: ChatUpstream,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RELAY_TEST_PROXY_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("HTTP_PROXY", proxy.url())
    route = RouteConfig(
        model="via-proxy",
        base_url=chat_upstream.base_url,
        api_key_env="RELAY_TEST_PROXY_KEY",
        upstream_model="echo",
    )
    settings = Settings(database_url=database_url, routes=[route])
    # The test's own client talks to Relay directly, whatever the environment says.
    with relay_server(settings) as url, httpx.Client(base_url=url, trust_env=False) as client:
        for _ in range(2):
            answered = client.post(
                "/v1/responses", json={"model": "via-proxy", "input": "proxied hello"}
            )
            assert answered.status_code == 200, answered.text
            assert answered.json()["output"][0]["content"][0]["text"] == "proxied hello"
    assert chat_upstream.headers[-2].get("via", "").startswith("1.1 proxy.py")  # see above
