"""The production benchmark's instruments (bench/datastores.py, bench/balancer.py), on real
servers: the round-trip counters count exactly what a client sends, and the load balancer
alternates between its backends and passes a stream through as it comes."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from loopback_server import LoopbackApp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from bench import datastores
from bench.balancer import start_balancer
from bench.peers import free_port

pytestmark = pytest.mark.skipif(
    datastores.pg_bin() is None or shutil.which("redis-server") is None
    or shutil.which("nginx") is None,
    reason="needs PostgreSQL's binaries, redis-server and nginx installed",
)  # fmt: skip


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[datastores.Datastores]:
    started = datastores.start_datastores("harness", tmp_path_factory.mktemp("stores"))
    try:
        yield started
    finally:
        started.stop()


def test_statements_and_transactions_are_counted_on_the_database_alone(
    stores: datastores.Datastores,
) -> None:
    postgres = stores.postgres
    before = (postgres.statements(), postgres.settled_transactions())

    async def client() -> int:
        connection = await asyncpg.connect(postgres.plain_url)
        try:
            async with connection.transaction():  # BEGIN, 3 statements, COMMIT
                for number in range(3):
                    await connection.fetchval("SELECT $1::int", number)
            await connection.fetchval("SELECT 1")  # outside the transaction
            return await asyncio.to_thread(postgres.connections)
        finally:
            await connection.close()

    connected = asyncio.run(client())
    after = (postgres.statements(), postgres.settled_transactions())
    assert connected == 1
    assert before[0] is not None and after[0] is not None
    assert after[0] - before[0] == 6
    # The explicit one, and SELECT 1's two: its prepare (Parse, Describe, Sync) and its run
    # each end in a Sync outside a transaction block, which PostgreSQL commits on its own.
    assert after[1] - before[1] == 3
    assert postgres.connections() == 0


def test_redis_commands_count_what_scripts_run_and_the_scripts_apart(
    stores: datastores.Datastores,
) -> None:
    redis = stores.redis
    other = redis.client().__class__(host=datastores.HOST, port=redis.port)
    try:
        before = redis.commands()
        other.set("a", 1)
        other.get("a")
        other.eval("redis.call('incr', KEYS[1]); return redis.call('get', KEYS[1])", 1, "a")
        after = redis.commands()
        assert redis.clients() >= 1
    finally:
        other.close()
    # SET, GET, EVAL and the two commands the script ran; the connection's HELLO/CLIENT
    # SETINFO handshake is counted too, so at least that many
    assert after[1] - before[1] == 1
    assert after[0] - before[0] >= 5


def _backend(name: str, release: threading.Event) -> Starlette:
    async def who(_: Request) -> PlainTextResponse:
        return PlainTextResponse(name)

    async def stream(_: Request) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first\n"
            await asyncio.to_thread(release.wait, 10)  # once the client has the first part
            yield b"rest\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    return Starlette(routes=[Route("/healthz", who), Route("/stream", stream)])


def test_the_balancer_alternates_backends_and_does_not_buffer_streams(tmp_path: Path) -> None:
    release = threading.Event()
    tmp_path.chmod(0o755)  # nginx's worker runs as another user
    with LoopbackApp(_backend("a", release)) as a, LoopbackApp(_backend("b", release)) as b:
        port = free_port()
        balancer = start_balancer(tmp_path, port, [a.port, b.port])
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
                names = [http.get("/healthz").text for _ in range(6)]
                with http.stream("GET", "/stream") as answer:
                    lines = answer.iter_lines()
                    assert next(lines) == "first"
                    release.set()
                    assert next(lines) == "rest"
        finally:
            balancer.stop()
    assert sorted(names) == ["a", "a", "a", "b", "b", "b"]
    assert all(x != y for x, y in itertools.pairwise(names))
