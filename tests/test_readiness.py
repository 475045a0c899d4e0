"""`GET /readyz`: 200 when this instance can serve; 503 naming the part that fails (the
database, its schema's revision, Redis when configured, an embedded model), and 200 again
once it is back."""

from __future__ import annotations

import shutil
import signal
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from db_fixtures import PgCluster
from live_server import relay_server
from redis_fixtures import Throwaway
from relay_fixtures import fake_routes

from relay.config import RouteConfig, Settings
from relay.storage.revision import head_revision


def ready(url: str) -> tuple[int, dict[str, Any]]:
    answer = httpx.get(f"{url}/readyz", timeout=10)
    body: dict[str, Any] = answer.json()
    return answer.status_code, body


def until(url: str, status: int, within_s: float) -> dict[str, Any]:
    """The readiness answer once it has `status` (polled), failing after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        code, body = ready(url)
        if code == status:
            return body
        assert time.monotonic() < deadline, (code, body)
        time.sleep(0.2)


@pytest.mark.postgres
def test_a_database_that_stops_and_comes_back(pg_cluster: PgCluster) -> None:
    database = pg_cluster.server.url(pg_cluster.server.create_database())
    with relay_server(Settings(database_url=database, routes=fake_routes())) as url:
        assert ready(url) == (
            200,
            {"status": "ready", "checks": {"database": "ok", "migrations": "ok", "redis": "ok"}},
        )
        pg_cluster.halt()
        try:
            body = until(url, 503, within_s=5)
            assert body["status"] == "not_ready"
            assert body["checks"]["database"] != "ok"
            assert body["checks"]["redis"] == "ok"
            assert httpx.get(f"{url}/healthz").status_code == 200  # it lives
        finally:
            pg_cluster.start()
        assert until(url, 200, within_s=15)["status"] == "ready"


def test_a_schema_at_another_revision_is_not_ready(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    with relay_server(Settings(database_url=f"sqlite:///{path}", routes=fake_routes())) as url:
        assert ready(url)[0] == 200
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE alembic_version SET version_num = '0001'")
        code, body = ready(url)
    assert code == 503
    assert body["checks"]["migrations"] == f"schema at 0001, this code needs {head_revision()}"
    assert body["checks"]["database"] == "ok"


def test_redis_that_does_not_answer_is_named(tmp_path: Path, redis_url: str) -> None:
    with socket.socket() as hole:  # accepts connections, never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        silent = f"redis://127.0.0.1:{hole.getsockname()[1]}/0"
        for redis, status in ((redis_url, 200), (silent, 503)):
            settings = Settings(
                database_url=f"sqlite:///{tmp_path / f'{status}.db'}",
                routes=fake_routes(),
                redis_url=redis,
            )
            with relay_server(settings) as url:
                code, body = ready(url)
            assert code == status, body
            assert (body["checks"]["redis"] == "ok") is (status == 200)


def test_an_embedded_model_that_cannot_load_is_named(tmp_path: Path) -> None:
    """A model loaded at start-up loads while the server listens: /readyz names it until it
    has loaded; one that failed (a file that is no GGUF) stays named until a request loads
    it, once the file is fixed."""
    from relay.providers.llama_local import bundled_model_path

    model = tmp_path / "model.gguf"
    model.write_bytes(b"not a model")
    route = RouteConfig(model="local", provider="llama_cpp", model_path=str(model))
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'relay.db'}", routes=[route])
    with relay_server(settings) as url:
        body = until(url, 503, within_s=30)
        assert body["checks"]["model local"].startswith("failed to load"), body
        assert body["checks"]["database"] == "ok"
        assert httpx.get(f"{url}/healthz").status_code == 200  # alive, not ready
        shutil.copyfile(bundled_model_path(), model)
        answer = httpx.post(
            f"{url}/v1/responses",
            json={"model": "local", "input": "hi", "max_output_tokens": 16},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert until(url, 200, within_s=5)["checks"]["model local"] == "ok"


def test_redis_that_stops_answering_and_comes_back(tmp_path: Path) -> None:
    """A Redis that stops answering under a running instance (its process paused: the port
    still takes connections) turns /readyz to 503 naming Redis, and back to 200 once it
    answers again."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("REDIS TEST SKIPPED: no redis-server on PATH to start a throwaway one")
    server = Throwaway(binary)
    try:
        settings = Settings(
            database_url=f"sqlite:///{tmp_path / 'relay.db'}",
            routes=fake_routes(),
            redis_url=server.url,
        )
        with relay_server(settings) as url:
            assert until(url, 200, within_s=5)["checks"]["redis"] == "ok"
            server.process.send_signal(signal.SIGSTOP)
            try:
                body = until(url, 503, within_s=10)
                assert body["checks"]["redis"] != "ok" and body["checks"]["database"] == "ok"
            finally:
                server.process.send_signal(signal.SIGCONT)
            assert until(url, 200, within_s=10)["checks"]["redis"] == "ok"
    finally:
        server.stop()
