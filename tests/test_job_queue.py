"""Background runs handed out through the job queue (PostgreSQL): an API-only `relay serve`
(`background_worker = false`) takes them, a `relay worker` runs them; a kill -9 of the worker
ends its run failed through the API instance; a run nobody has taken yet cancels at once."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from db_fixtures import PgServer
from live_server import ServeProcess, relay_serve

pytestmark = pytest.mark.postgres
LIVE = ("queued", "in_progress")


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def relay_worker(env: dict[str, str]) -> Iterator[Worker]:
    relay = Path(sys.executable).with_name("relay")
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "worker.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(relay), "worker"], env={**os.environ, **env}, stdout=out, stderr=out
            )
        worker = Worker(process, log)
        try:
            deadline = time.monotonic() + 30
            while "ready" not in worker.output():
                assert process.poll() is None, worker.output()
                assert time.monotonic() < deadline, worker.output()
                time.sleep(0.05)
            yield worker
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                process.wait(timeout=30)


@dataclass
class Setup:
    api: ServeProcess
    env: dict[str, str]


@pytest.fixture(scope="module")
def setup(pg_server: PgServer) -> Iterator[Setup]:
    database = pg_server.create_database()
    routes = [{"model": "slow", "provider": "fake", "upstream_model": "slow"}]
    env = {
        "RELAY_DATABASE_URL": pg_server.url(database),
        "RELAY_ROUTES": orjson.dumps(routes).decode(),
        # A slow upkeep loop: cancels and followers on another instance are woken by signals
        # (LISTEN/NOTIFY), not by its polls.
        "RELAY_RUN_POLL_S": "2",
        "RELAY_RUN_LEASE_S": "6",
    }
    try:
        with relay_serve({**env, "RELAY_BACKGROUND_WORKER": "false"}) as api:
            yield Setup(api, env)
        assert "Traceback" not in api.output, api.output
    finally:
        pg_server.drop_database(database)


def _create(url: str, **extra: Any) -> dict[str, Any]:
    body = {"model": "slow", "input": "x", "background": True, **extra}
    answer = httpx.post(f"{url}/v1/responses", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    created: dict[str, Any] = answer.json()
    return created


def _settled(url: str, response_id: str, timeout_s: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = httpx.get(f"{url}/v1/responses/{response_id}").json()
        if body["status"] not in LIVE:
            return body
        assert time.monotonic() < deadline, body["status"]
        time.sleep(0.1)


def _wait_running(url: str, response_id: str) -> None:
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/v1/responses/{response_id}").json()["status"] != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_worker_runs_what_the_api_instance_received(setup: Setup) -> None:
    with relay_worker(setup.env) as worker:
        created = _create(setup.api.url)
        done = _settled(setup.api.url, created["id"])
        assert done["status"] == "completed"
        assert done["output_text"] == "one two three four five six seven eight nine ten"
        assert created["id"] in worker.output()  # it ran there, not on the API instance
        # Streamed through the API instance, which follows the worker's event log.
        body = {"model": "slow", "input": "x", "background": True, "stream": True}
        with httpx.stream("POST", f"{setup.api.url}/v1/responses", json=body, timeout=30) as s:
            kinds = [line[7:] for line in s.iter_lines() if line.startswith("event: ")]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert kinds.count("response.output_text.delta") == 10


def test_a_killed_worker_and_a_run_nobody_took(setup: Setup) -> None:
    with relay_worker(setup.env) as worker:
        created = _create(setup.api.url)
        _wait_running(setup.api.url, created["id"])
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
    failed = _settled(setup.api.url, created["id"], timeout_s=15)
    assert failed["status"] == "failed" and "interrupted" in failed["error"]["message"]
    # No worker now: a new run waits in the queue, and a cancel ends it at once.
    waiting = _create(setup.api.url)
    time.sleep(0.3)
    assert httpx.get(f"{setup.api.url}/v1/responses/{waiting['id']}").json()["status"] == "queued"
    started = time.monotonic()
    cancelled = httpx.post(f"{setup.api.url}/v1/responses/{waiting['id']}/cancel", timeout=15)
    assert cancelled.json()["status"] == "cancelled" and time.monotonic() - started < 2
    # A worker that starts later skips it.
    with relay_worker(setup.env):
        time.sleep(1)
        after = httpx.get(f"{setup.api.url}/v1/responses/{waiting['id']}").json()
    assert after["status"] == "cancelled"
    # Ended before it ran, it keeps the input it was asked with.
    asked = httpx.get(f"{setup.api.url}/v1/responses/{waiting['id']}/input_items").json()
    assert [item["type"] for item in asked["data"]] == ["message"]


def test_signals_carry_cancels_and_events_between_instances(setup: Setup) -> None:
    """With the upkeep loop at 2 s, a cancel through the API instance stops the worker's run
    within a fraction of that, and a follower through the API instance gets each delta as
    the worker writes it, not in 2 s steps."""
    with relay_worker(setup.env):
        body = {"model": "slow", "input": "x", "background": True, "stream": True}
        arrivals = []
        with httpx.stream("POST", f"{setup.api.url}/v1/responses", json=body, timeout=30) as s:
            for line in s.iter_lines():
                if line == "event: response.output_text.delta":
                    arrivals.append(time.monotonic())
        gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
        assert len(arrivals) == 10 and max(gaps) < 1.0, gaps  # the deltas are 0.2 s apart
        created = _create(setup.api.url)
        _wait_running(setup.api.url, created["id"])
        started = time.monotonic()
        answer = httpx.post(f"{setup.api.url}/v1/responses/{created['id']}/cancel", timeout=15)
        assert answer.json()["status"] == "cancelled"
        assert time.monotonic() - started < 1.0
