"""Relay's MCP client (relay.tools.mcp) against real MCP servers on loopback (tests/mcp_servers.py),
and its egress guard (relay.tools.egress): listing and calling over streamable HTTP (2026 and
older servers) and HTTP+SSE, errors in the openai SDK's shapes, deadlines, cancellation, the
output cap, the server's credentials delivered and never in an error, and the SSRF checks
(allow list, private addresses, DNS answers, redirects, TLS to a checked address)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import subprocess
import sys
import time
import traceback

import httpx2
import pytest
import trustme
from loopback_server import LoopbackApp
from mcp_servers import McpTestServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from relay.tools.egress import EgressGuard, EgressPolicy, EgressRefused, Resolver, resolve_host
from relay.tools.mcp import McpClient, McpError, McpLimits, McpServer

# Random, as real credentials are (the scrubber redacts runs of 8 characters of them).
TOKEN = "mcp-tok-Xq7Lw2Rb9Kd4Vn1Zp6"
API_KEY = "key-H3sJ8mQ5tW0cY7fA2"
SECRETS = (TOKEN, API_KEY)
LOOPBACK = ("127.0.0.0/8",)


def server_at(url: str) -> McpServer:
    return McpServer("tools", url, {"Authorization": f"Bearer {TOKEN}", "X-Api-Key": API_KEY})


def policy_for(*servers: McpTestServer, private: tuple[str, ...] = LOOPBACK) -> EgressPolicy:
    """Allows the servers' host and port, and loopback (where they all are)."""
    return EgressPolicy(tuple(f"{s.host}:{s.port}" for s in servers), private)


def answers(table: dict[str, list[str]]) -> Resolver:
    """A resolver that answers from a table."""

    async def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


def leaked(error: BaseException) -> list[str]:
    """The secrets an exception shows anywhere: message, repr, error dict, traceback."""
    text = str(error) + repr(error) + "".join(traceback.format_exception(error))
    text += json.dumps(getattr(error, "error", None))
    return [secret for secret in SECRETS if secret in text or secret[:12] in text]


@pytest.fixture
def client() -> McpClient:
    return McpClient(McpLimits(list_timeout_s=5, call_timeout_s=5))


@pytest.fixture
def streamable(request: pytest.FixtureRequest) -> McpTestServer:
    """A 2026 server over streamable HTTP."""
    server: McpTestServer = request.getfixturevalue("mcp_streamable")
    return server


@pytest.fixture
def legacy(request: pytest.FixtureRequest) -> McpTestServer:
    """An older server over streamable HTTP (the initialize handshake, a session)."""
    server: McpTestServer = request.getfixturevalue("mcp_legacy")
    return server


@pytest.fixture
def sse(request: pytest.FixtureRequest) -> McpTestServer:
    """A server over HTTP+SSE."""
    server: McpTestServer = request.getfixturevalue("mcp_sse")
    return server


@pytest.fixture(params=["streamable", "legacy", "sse"])
def each(request: pytest.FixtureRequest) -> McpTestServer:
    """Each of the three, in turn."""
    server: McpTestServer = request.getfixturevalue(f"mcp_{request.param}")
    return server


async def running(server: McpTestServer) -> None:
    """Wait until the server runs a `slow` call."""
    await asyncio.to_thread(server.state.wait_for, lambda: server.state.slow_started == 1)


async def stopped(server: McpTestServer) -> None:
    """Wait until the server's `slow` call was cancelled (and assert it never finished)."""
    await asyncio.to_thread(server.state.wait_for, lambda: server.state.slow_cancelled == 1)
    assert server.state.slow_finished == 0


# Listing and calling


async def test_lists_tools(client: McpClient, each: McpTestServer) -> None:
    server = each
    tools = await client.list_tools(server_at(server.url), policy_for(server))
    by_name = {tool["name"]: tool for tool in tools}
    assert sorted(by_name) == sorted(
        ["add", "echo", "fail", "reject", "slow", "big", "pixel", "structured"]
    )
    assert by_name["add"] == {
        "name": "add",
        "description": "Adds two integers.",
        "input_schema": by_name["add"]["input_schema"],
    }
    assert by_name["add"]["input_schema"]["required"] == ["a", "b"]
    assert by_name["echo"]["annotations"] == {"title": "Echo", "readOnlyHint": True}
    # The credentials arrived, on every request.
    assert set(server.state.header_values("authorization")) == {f"Bearer {TOKEN}"}
    assert set(server.state.header_values("x-api-key")) == {API_KEY}


async def test_calls_a_tool(client: McpClient, each: McpTestServer) -> None:
    server = each
    assert (
        await client.call_tool(server_at(server.url), policy_for(server), "add", {"a": 2, "b": 3})
        == "5"
    )
    assert set(server.state.header_values("authorization")) == {f"Bearer {TOKEN}"}


async def test_framing_headers_are_not_the_clients(
    client: McpClient, streamable: McpTestServer
) -> None:
    """A request's headers cannot name another virtual host or frame the request."""
    headers = {"Host": "admin.internal", "Content-Length": "1", "Transfer-Encoding": "chunked"}
    server = McpServer("tools", streamable.url, {**headers, "X-Team": "blue"})
    assert await client.call_tool(server, policy_for(streamable), "echo", {"text": "hi"}) == "hi"
    for request in streamable.state.requests:
        assert request.headers["host"] == f"127.0.0.1:{streamable.port}"
        assert "transfer-encoding" not in request.headers
        assert request.headers["x-team"] == "blue"


async def test_a_2026_server_takes_one_request_per_operation(
    client: McpClient, streamable: McpTestServer
) -> None:
    await client.call_tool(
        server_at(streamable.url), policy_for(streamable), "echo", {"text": "hi"}
    )
    # server/discover, then tools/call: no handshake, no session to end.
    assert [(r.method, r.path) for r in streamable.state.requests] == [("POST", "/mcp")] * 2


async def test_an_older_server_gets_the_handshake_and_its_session_ended(
    client: McpClient, legacy: McpTestServer
) -> None:
    assert (
        await client.call_tool(server_at(legacy.url), policy_for(legacy), "echo", {"text": "hi"})
        == "hi"
    )
    methods = [r.method for r in legacy.state.requests]
    assert methods[-1] == "DELETE"  # the session ends with the operation
    assert methods.count("POST") == 4  # discover (refused), initialize, initialized, tools/call


async def test_falls_back_to_sse_when_the_post_is_refused(
    client: McpClient, sse: McpTestServer
) -> None:
    url = sse.base_url + "/events"  # not .../sse: streamable HTTP first, answered 405
    assert await client.call_tool(server_at(url), policy_for(sse), "add", {"a": 1, "b": 1}) == "2"
    first = sse.state.requests[0]
    assert (first.method, first.path) == ("POST", "/events")
    assert ("GET", "/events") in [(r.method, r.path) for r in sse.state.requests]


async def test_outputs(client: McpClient, streamable: McpTestServer) -> None:
    server, policy = server_at(streamable.url), policy_for(streamable)
    # Non-text content as its JSON, text as it is, one per line.
    image, caption = (await client.call_tool(server, policy, "pixel", {})).split("\n")
    assert json.loads(image)["type"] == "image"
    assert json.loads(image)["mimeType"] == "image/png"
    assert caption == "a pixel"
    # Structured content where there is no text.
    assert json.loads(await client.call_tool(server, policy, "structured", {})) == {"answer": 42}


async def test_concurrent_calls(client: McpClient, streamable: McpTestServer) -> None:
    server, policy = server_at(streamable.url), policy_for(streamable)
    calls = [client.call_tool(server, policy, "add", {"a": n, "b": 1}) for n in range(8)]
    assert await asyncio.gather(*calls) == [str(n + 1) for n in range(8)]


# Errors


async def test_tool_errors(client: McpClient, each: McpTestServer) -> None:
    server = each
    mcp, policy = server_at(server.url), policy_for(server)
    with pytest.raises(McpError) as failed:
        await client.call_tool(mcp, policy, "fail", {"message": "the disk is full"})
    assert failed.value.error == {
        "type": "mcp_tool_execution_error",
        "content": [{"type": "text", "text": "Error executing tool fail: the disk is full"}],
    }
    assert "the disk is full" in str(failed.value)

    with pytest.raises(McpError) as unknown:
        await client.call_tool(mcp, policy, "nope", {})
    assert unknown.value.error["type"] == "mcp_tool_execution_error"
    assert "Unknown tool: nope" in unknown.value.error["content"][0]["text"]

    with pytest.raises(McpError) as rejected:
        await client.call_tool(mcp, policy, "reject", {"message": "no such region"})
    assert rejected.value.error == {
        "type": "mcp_protocol_error",
        "code": -32602,
        "message": "MCP server 'tools' answered tools/call with an error: no such region",
    }


async def test_http_errors(client: McpClient, streamable: McpTestServer) -> None:
    url = streamable.base_url + "/missing"  # 404 to the POST, then to the SSE fallback's GET
    with pytest.raises(McpError) as failed:
        await client.list_tools(server_at(url), policy_for(streamable))
    message = "MCP server 'tools' answered HTTP 404 Not Found"
    assert failed.value.error == {"type": "http_error", "code": 404, "message": message}
    assert str(failed.value) == message


async def test_a_server_that_does_not_answer(client: McpClient) -> None:
    with McpTestServer("streamable") as server:
        port = server.port
    # Nothing listens there now.
    with pytest.raises(McpError) as failed:
        await client.list_tools(server_at(f"http://127.0.0.1:{port}/mcp"), policy_for(server))
    assert failed.value.error == {
        "type": "mcp_protocol_error",
        "code": -32000,
        "message": "the connection to MCP server 'tools' failed (ConnectError)",
    }


async def test_a_name_that_does_not_resolve() -> None:
    async def nowhere(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(McpError) as failed:
        await McpClient(McpLimits(), resolve=nowhere).list_tools(
            server_at("https://mcp.test/mcp"), EgressPolicy(("mcp.test",))
        )
    assert failed.value.error["message"] == "the connection to MCP server 'tools' failed (gaierror)"


async def test_timeout(each: McpTestServer) -> None:
    server = each
    client = McpClient(McpLimits(call_timeout_s=0.5))
    started = time.monotonic()
    with pytest.raises(McpError) as failed:
        await client.call_tool(server_at(server.url), policy_for(server), "slow", {"seconds": 30})
    assert time.monotonic() - started < 1.5
    assert failed.value.error == {
        "type": "mcp_protocol_error",
        "code": -32001,
        "message": "MCP server 'tools' did not answer tools/call within 0.5 s",
    }
    await stopped(server)  # the server's call ended too


async def test_cancel_mid_call(client: McpClient, each: McpTestServer) -> None:
    server = each
    before = asyncio.all_tasks()
    call = asyncio.create_task(
        client.call_tool(server_at(server.url), policy_for(server), "slow", {"seconds": 30})
    )
    await running(server)
    call.cancel()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert time.monotonic() - started < 0.5
    assert asyncio.all_tasks() == before  # nothing left running
    await stopped(server)


async def test_cancel_with_a_server_that_stopped_answering(client: McpClient) -> None:
    """An older server's session ends with a DELETE as the SDK closes: once the operation is
    cancelled, that request gets a second, not the operation's deadline."""
    with McpTestServer("streamable", legacy=True, stall={"DELETE"}) as server:
        call = asyncio.create_task(
            client.call_tool(server_at(server.url), policy_for(server), "slow", {"seconds": 30})
        )
        await running(server)
        call.cancel()
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert 0.9 < time.monotonic() - started < 1.5
        assert server.state.requests[-1].method == "DELETE"


async def test_output_cap(streamable: McpTestServer) -> None:
    client = McpClient(McpLimits(max_output_bytes=1000))
    server, policy = server_at(streamable.url), policy_for(streamable)
    assert await client.call_tool(server, policy, "big", {"n": 1000}) == "x" * 1000
    cut = await client.call_tool(server, policy, "big", {"n": 5000})
    assert cut == "x" * 1000 + "\n[output cut by Relay at 1000 of 5000 bytes]"
    # Never half a character: the 1000th byte is the first half of an "é".
    accents = await client.call_tool(server, policy, "echo", {"text": "x" + "é" * 600})
    assert accents == "x" + "é" * 499 + "\n[output cut by Relay at 1000 of 1201 bytes]"


async def test_a_large_output_over_streamable_http(
    client: McpClient, streamable: McpTestServer
) -> None:
    """Larger than the SDK's default limit on one SSE event (1 MiB): still cut, not failed."""
    server, policy = server_at(streamable.url), policy_for(streamable)
    output = await client.call_tool(server, policy, "big", {"n": 1_500_000})
    assert output.endswith("[output cut by Relay at 1000000 of 1500000 bytes]")


async def test_a_large_output_over_sse(client: McpClient, sse: McpTestServer) -> None:
    """The SDK's SSE transport reads no event past 1 MiB (its limit cannot be changed there):
    such a result fails, at once."""
    with pytest.raises(McpError) as failed:
        await client.call_tool(server_at(sse.url), policy_for(sse), "big", {"n": 1_500_000})
    assert failed.value.error["message"] == "the connection to MCP server 'tools' failed (SSEError)"


async def test_credentials_are_in_no_error(
    client: McpClient, streamable: McpTestServer, legacy: McpTestServer, sse: McpTestServer
) -> None:
    """Not even where the server writes them back in what it answers."""
    server, policy = server_at(streamable.url), policy_for(streamable)
    assert TOKEN not in repr(server) and API_KEY not in repr(server)
    quick = McpClient(McpLimits(call_timeout_s=0.3))
    echoed = f"bad key: Bearer {TOKEN} and {API_KEY}"
    attempts = [
        client.call_tool(server, policy, "fail", {"message": echoed}),
        client.call_tool(server, policy, "reject", {"message": echoed}),
        client.call_tool(server_at(legacy.url), policy_for(legacy), "reject", {"message": echoed}),
        client.call_tool(server_at(sse.url), policy_for(sse), "fail", {"message": echoed}),
        client.list_tools(server_at(streamable.base_url + "/missing"), policy),
        quick.call_tool(server, policy, "slow", {"seconds": 5}),
        client.list_tools(server, EgressPolicy(("elsewhere.example",))),
        client.list_tools(server, policy_for(streamable, private=())),
    ]
    errors: list[BaseException] = []
    for attempt in attempts:
        with pytest.raises((McpError, EgressRefused)) as failed:
            await attempt
        errors.append(failed.value)
    assert [leaked(error) for error in errors] == [[]] * len(errors)
    assert str(errors[0]) == "Error executing tool fail: bad key: [redacted] and [redacted]"
    await stopped(streamable)


async def test_credentials_are_in_no_log_line(
    client: McpClient, legacy: McpTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server, policy = server_at(legacy.url), policy_for(legacy)
    await client.call_tool(server, policy, "echo", {"text": "hi"})
    with pytest.raises(McpError):
        await client.list_tools(server_at(legacy.base_url + "/missing"), policy)
    with pytest.raises(McpError):
        await McpClient(McpLimits(call_timeout_s=0.3)).call_tool(
            server, policy, "slow", {"seconds": 5}
        )
    await stopped(legacy)
    logged = caplog.text + "\n".join(record.getMessage() for record in caplog.records)
    assert [secret for secret in SECRETS if secret in logged] == []


# The egress guard


async def test_loopback_is_refused_by_default(client: McpClient, streamable: McpTestServer) -> None:
    policy = policy_for(streamable, private=())  # on the allow list, but loopback
    with pytest.raises(EgressRefused) as refused:
        await client.list_tools(server_at(streamable.url), policy)
    assert str(refused.value) == (
        f"Relay may not connect to http://127.0.0.1:{streamable.port}: "
        "it resolves to an address that is not public"
    )
    assert streamable.state.requests == []  # no connection was made


@pytest.mark.parametrize(
    ("host", "resolve"),
    [
        ("mcp.test", answers({"mcp.test": ["127.0.0.1"]})),
        ("mcp.test", answers({"mcp.test": ["::ffff:127.0.0.1"]})),  # IPv4-mapped
        ("localhost", resolve_host),  # the system's resolver
    ],
    ids=["127.0.0.1", "ipv4-mapped", "localhost"],
)
async def test_loopback_in_any_spelling_is_refused(
    host: str, resolve: Resolver, streamable: McpTestServer
) -> None:
    client = McpClient(McpLimits(), resolve=resolve)
    url = f"http://{host}:{streamable.port}/mcp"
    with pytest.raises(EgressRefused, match="not public"):
        await client.list_tools(server_at(url), EgressPolicy((f"{host}:{streamable.port}",)))
    assert streamable.state.requests == []


@pytest.mark.parametrize(
    "address",
    [
        "0.0.0.0",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "::ffff:10.0.0.1",
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "2002:a00:1::",  # 6to4 of 10.0.0.1
        "fc00::1",
        "fe80::1",
        "ff02::1",
    ],
)
async def test_private_addresses_are_refused(address: str) -> None:
    guard = EgressGuard(EgressPolicy(("mcp.test",)), resolve=answers({"mcp.test": [address]}))
    with pytest.raises(EgressRefused, match="not public"):
        await guard.check("https://mcp.test/mcp")


async def test_public_addresses_pass_the_check() -> None:
    table = {"mcp.test": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]}
    guard = EgressGuard(EgressPolicy(("mcp.test",)), resolve=answers(table))
    await guard.check("https://mcp.test/mcp")


async def test_one_private_address_among_several_is_refused(streamable: McpTestServer) -> None:
    resolve = answers({"mcp.test": ["127.0.0.1", "10.0.0.1"]})
    client = McpClient(McpLimits(), resolve=resolve)
    policy = EgressPolicy((f"mcp.test:{streamable.port}",), LOOPBACK)
    with pytest.raises(EgressRefused, match="not public"):
        await client.list_tools(server_at(f"http://mcp.test:{streamable.port}/mcp"), policy)
    assert streamable.state.requests == []


async def test_an_allowed_name_is_reached_at_its_checked_address(legacy: McpTestServer) -> None:
    # Rebinding: the name's next answer would be private; it is never asked again.
    answers_given = iter([["127.0.0.1"]] + [["10.0.0.1"]] * 10)

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers_given)

    client = McpClient(McpLimits(), resolve=rebinding)
    policy = EgressPolicy((f"mcp.test:{legacy.port}",), LOOPBACK)
    url = f"http://mcp.test:{legacy.port}/mcp"
    assert await client.call_tool(server_at(url), policy, "echo", {"text": "hi"}) == "hi"
    assert len(legacy.state.requests) >= 5  # discover, initialize, ..., DELETE
    assert {r.headers["host"] for r in legacy.state.requests} == {f"mcp.test:{legacy.port}"}


async def test_the_next_address_when_one_does_not_connect(streamable: McpTestServer) -> None:
    # Nothing listens on 127.0.0.3 (the server is on 127.0.0.1): refused, then the next one.
    client = McpClient(McpLimits(), resolve=answers({"mcp.test": ["127.0.0.3", "127.0.0.1"]}))
    policy = EgressPolicy((f"mcp.test:{streamable.port}",), LOOPBACK)
    url = f"http://mcp.test:{streamable.port}/mcp"
    assert await client.call_tool(server_at(url), policy, "echo", {"text": "hi"}) == "hi"


async def test_a_server_not_on_the_allow_list_is_refused(
    client: McpClient, streamable: McpTestServer
) -> None:
    policy = EgressPolicy(("mcp.example.com", f"127.0.0.1:{streamable.port + 1}"), LOOPBACK)
    for url in (streamable.url, f"ftp://127.0.0.1:{streamable.port}/mcp", "not a url"):
        with pytest.raises(EgressRefused, match=r"not on the allow list|not valid"):
            await client.list_tools(server_at(url), policy)
    assert streamable.state.requests == []


async def test_a_redirect_is_checked_like_the_first_request(streamable: McpTestServer) -> None:
    target = streamable.url
    with McpTestServer("streamable", host="127.0.0.2", redirects={"/go": target}) as front:
        go = front.base_url + "/go"
        # Only 127.0.0.2 is opened: the redirect's 127.0.0.1 is loopback, refused.
        both = (f"127.0.0.2:{front.port}", f"127.0.0.1:{streamable.port}")
        async with EgressGuard(EgressPolicy(both, ("127.0.0.2/32",))).client(
            timeout=httpx2.Timeout(5)
        ) as http:
            with pytest.raises(EgressRefused, match="not public"):
                await http.get(go, follow_redirects=True)
        # Both opened, but 127.0.0.1 is not on the allow list.
        only_front = (f"127.0.0.2:{front.port}",)
        async with EgressGuard(EgressPolicy(only_front, LOOPBACK)).client(
            timeout=httpx2.Timeout(5)
        ) as http:
            with pytest.raises(EgressRefused, match="not on the allow list"):
                await http.get(go, follow_redirects=True)
        # Through the MCP client (the SDK follows no redirect off the server's origin).
        with pytest.raises(McpError) as failed:
            await McpClient(McpLimits()).list_tools(
                server_at(go), EgressPolicy(both, ("127.0.0.2/32",))
            )
        assert failed.value.error["type"] == "mcp_protocol_error"
        assert f"Redirect to {target} not followed" in str(failed.value)
        assert {r.path for r in front.state.requests} == {"/go"}
    assert streamable.state.requests == []


async def test_a_prefix_covers_every_request_of_the_operation(
    client: McpClient, streamable: McpTestServer, sse: McpTestServer
) -> None:
    # A redirect within the origin, which the SDK follows, off the allowed prefix.
    with McpTestServer("streamable", redirects={"/v1/mcp": "/mcp"}) as server:
        prefix = EgressPolicy((f"{server.base_url}/v1/",), LOOPBACK)
        with pytest.raises(EgressRefused, match="not on the allow list"):
            await client.list_tools(server_at(server.base_url + "/v1/mcp"), prefix)
        assert [r.path for r in server.state.requests] == ["/v1/mcp"]
    # An SSE server's message endpoint (/messages/) outside the prefix: the SDK sends its POSTs
    # from a task of its own, which only logs what they raise; the guard remembers.
    prefix = EgressPolicy((f"{sse.base_url}/sse",), LOOPBACK)
    with pytest.raises(EgressRefused, match="not on the allow list"):
        await client.list_tools(server_at(sse.url), prefix)
    assert {r.path for r in sse.state.requests} == {"/sse"}


async def test_tls_to_a_checked_address_verifies_the_name() -> None:
    """The request goes to the address, the certificate is checked against the name."""
    authority = trustme.CA()
    certificate = authority.issue_cert("mcp.test")

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.headers["host"])

    app = Starlette(routes=[Route("/", hello)])
    with (
        certificate.private_key_and_cert_chain_pem.tempfile() as pem,
        LoopbackApp(app, ssl_certfile=pem, ssl_keyfile=pem, lifespan="off") as server,
    ):
        tls = ssl.create_default_context()
        authority.configure_trust(tls)
        names = {"mcp.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
        policy = EgressPolicy((f"mcp.test:{server.port}", f"other.test:{server.port}"), LOOPBACK)
        guard = EgressGuard(policy, resolve=answers(names), ssl_context=tls)
        async with guard.client(timeout=httpx2.Timeout(5)) as http:
            answer = await http.get(f"https://mcp.test:{server.port}/")
            assert answer.text == f"mcp.test:{server.port}"
            # The Host header is the URL's, whatever the caller set.
            answer = await http.get(f"https://mcp.test:{server.port}/", headers={"Host": "x"})
            assert answer.text == f"mcp.test:{server.port}"
            with pytest.raises(httpx2.ConnectError, match="certificate"):
                await http.get(f"https://other.test:{server.port}/")


def test_allow_list_patterns() -> None:
    policy = EgressPolicy(
        ("https://mcp.example.com/v1", "*.tools.example", "mcp.example.org:8443", "[::1]:9000")
    )
    allowed = {
        "https://mcp.example.com/v1": True,
        "https://mcp.example.com/v1/": True,
        "https://MCP.example.com:443/v1/mcp?x=1": True,
        "https://mcp.example.com./v1/mcp": True,
        "https://mcp.example.com/v1beta": False,
        "https://mcp.example.com/": False,
        "http://mcp.example.com/v1": False,  # a prefix's scheme
        "https://mcp.example.com:8443/v1": False,
        "https://mcp.example.com.evil.test/v1": False,
        "https://a.tools.example/mcp": True,
        "http://a.b.tools.example/mcp": True,
        "https://tools.example/mcp": False,
        "https://eviltools.example/mcp": False,
        "https://a.tools.example:8443/mcp": False,  # no port: the default one
        "https://mcp.example.org:8443/": True,
        "https://mcp.example.org/": False,
        "http://[::1]:9000/mcp": True,
        "ftp://mcp.example.org:8443/": False,
        "file:///etc/passwd": False,
        "not a url": False,
    }
    assert {url: policy.permits(url) for url in allowed} == allowed
    assert not EgressPolicy().permits("https://mcp.example.com/")
    for bad in ("", "*", "ftp://x.example/", "https://x.example/?q=1", "x.example/path", "a b"):
        with pytest.raises(ValueError, match="not a URL prefix or host pattern"):
            EgressPolicy((bad,))
    with pytest.raises(ValueError):
        EgressPolicy(private_networks=("10.0.0.0/33",))


def test_importing_the_client_loads_neither_the_sdk_nor_httpx2() -> None:
    code = "import sys, relay.tools.mcp; print(sorted({'mcp', 'httpx2'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_aclose(client: McpClient, streamable: McpTestServer) -> None:
    await client.list_tools(server_at(streamable.url), policy_for(streamable))
    await client.aclose()
