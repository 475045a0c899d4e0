"""A PostgreSQL outage in the middle of background runs and streams (a throwaway server of the
module's own, stopped and started again): requests while it is down are 503s with retry-after
(a WebSocket turn's error says 503), and every run ends, with its real output, once it is back;
a process stopped meanwhile leaves its runs to the sweep."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from db_fixtures import PgCluster
from live_server import relay_serve, relay_server
from relay_fixtures import fake_routes
from websockets.sync.client import connect

from relay.config import Settings
from relay.providers.fake import SLOW_WORDS

pytestmark = pytest.mark.postgres
SLOW_TEXT = "".join(f"{word} " for word in SLOW_WORDS).strip()


@pytest.fixture(scope="module")
def url(pg_cluster: PgCluster) -> Iterator[str]:
    database = pg_cluster.server.url(pg_cluster.server.create_database())
    settings = Settings(database_url=database, routes=fake_routes(), run_poll_s=0.2, keepalive_s=1)
    with relay_server(settings) as base_url:
        yield base_url


def _events(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


class _Reader(threading.Thread):
    """Reads a whole stream in the background; `created` is set at its first event."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.created = threading.Event()
        self.text = ""

    def run(self) -> None:
        with (
            httpx.Client(base_url=self.url, timeout=60) as http,
            http.stream("POST", "/v1/responses", json=self.body) as answer,
        ):
            for chunk in answer.iter_text():
                self.text += chunk
                if "response.created" in self.text:
                    self.created.set()

    def events(self) -> list[dict[str, Any]]:
        self.join(timeout=60)
        assert not self.is_alive(), "the stream never ended"
        return _events(self.text)


def _unavailable(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"]
    assert set(answer.json()["error"]) == {"message", "type", "param", "code"}


def test_an_outage_mid_run_ends_every_run_once_the_database_is_back(
    url: str, pg_cluster: PgCluster
) -> None:
    slow = {"model": "fake-slow", "input": "hi"}
    with httpx.Client(base_url=url, timeout=30) as http:
        _outage_mid_run(http, url, pg_cluster, slow)


def _outage_mid_run(
    http: httpx.Client, url: str, pg_cluster: PgCluster, slow: dict[str, Any]
) -> None:
    background = [
        http.post("/v1/responses", json={**slow, "background": True}).json()["id"] for _ in range(3)
    ]
    streams = [
        _Reader(url, {**slow, "stream": True}),
        _Reader(url, {**slow, "stream": True, "background": True}),
    ]
    for reader in streams:
        reader.start()
    for reader in streams:
        assert reader.created.wait(10)
    time.sleep(0.3)
    pg_cluster.halt()
    try:
        for body in (
            {**slow, "background": True},
            {**slow, "stream": True},
            {"model": "fake-text", "input": "hi"},
        ):
            _unavailable(http.post("/v1/responses", json=body))
        _unavailable(http.get(f"/v1/responses/{background[0]}"))
        with connect(url.replace("http", "ws", 1) + "/v1/responses") as socket:
            socket.send(orjson.dumps({"type": "response.create", **slow}).decode())
            refused = orjson.loads(socket.recv(timeout=10))
        assert refused["type"] == "error" and refused["status"] == 503, refused
        time.sleep(2.5)  # every run has generated its last word meanwhile
    finally:
        pg_cluster.start()
    for reader in streams:
        events = reader.events()
        assert events[-1]["type"] == "response.completed", events[-3:]
        assert events[-1]["response"]["output_text"] == SLOW_TEXT
        background.append(events[0]["response"]["id"])
    # Runs created once it is back go through the job queue again.
    background.append(http.post("/v1/responses", json={**slow, "background": True}).json()["id"])
    deadline = time.monotonic() + 20
    for response_id in background:
        while (found := http.get(f"/v1/responses/{response_id}")).status_code != 200 or (
            found.json()["status"] in ("queued", "in_progress")
        ):
            assert time.monotonic() < deadline, found.text
            time.sleep(0.2)
        assert found.json()["status"] == "completed", found.json()
        assert found.json()["output_text"] == SLOW_TEXT


def test_a_process_stopping_during_an_outage_leaves_its_runs_to_the_sweep(
    pg_cluster: PgCluster,
) -> None:
    """A run whose end cannot be stored does not hold up a shutdown: the process gives it up
    (its lease lapses) and, once the database is back, the sweep ends it as failed."""
    env = {
        "RELAY_DATABASE_URL": pg_cluster.server.url(pg_cluster.server.create_database()),
        "RELAY_ROUTES": '[{"model": "slow", "provider": "fake", "upstream_model": "slow"}]',
        "RELAY_RUN_LEASE_S": "1",
        "RELAY_RUN_POLL_S": "0.2",
    }
    with relay_serve(env) as first:
        body = {"model": "slow", "input": "x", "background": True}
        created = httpx.post(f"{first.url}/v1/responses", json=body).json()
        time.sleep(0.5)
        pg_cluster.halt()
        try:
            time.sleep(2)  # it has ended, and waits to be stored
            started = time.monotonic()
            first.stop()
            assert time.monotonic() - started < 15, first.output
        finally:
            pg_cluster.start()
    assert first.process.returncode == 0, first.output
    with relay_serve(env) as second, httpx.Client(base_url=second.url) as http:
        deadline = time.monotonic() + 10
        while (found := http.get(f"/v1/responses/{created['id']}").json())["status"] in (
            "queued",
            "in_progress",
        ):
            assert time.monotonic() < deadline, found
            time.sleep(0.2)
    assert found["status"] == "failed" and "interrupted" in found["error"]["message"]
