"""Idempotency-Key on POST /v1/responses, on one Relay (across two: test_two_instances.py), and
after a crash."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from chat_upstream import UPSTREAM_KEY, ChatUpstream
from live_server import relay_serve
from relay_fixtures import sse_events
from team import AdminClient, client, team_relay, team_routes

from relay.config import RouteConfig

KEY_ENV = "RELAY_TEST_IDEMPOTENCY_UPSTREAM_KEY"


@pytest.fixture(scope="module")
def url(
    database_url: str, chat_upstream: ChatUpstream, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[str]:
    monkeypatch_module.setenv(KEY_ENV, UPSTREAM_KEY)
    routes = [
        *team_routes(),
        RouteConfig(
            model="upstream-echo",
            base_url=chat_upstream.base_url,
            api_key_env=KEY_ENV,
            upstream_model="echo",
        ),
        RouteConfig(
            model="upstream-stall",
            base_url=chat_upstream.base_url,
            api_key_env=KEY_ENV,
            upstream_model="stall",
        ),
    ]
    with team_relay(database_url, routes=routes) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def key(url: str) -> str:
    with AdminClient(url) as admin:
        return admin.key(admin.project())[1]


def _post(http: httpx.Client, body: dict[str, object], key: str) -> httpx.Response:
    return http.post("/v1/responses", json=body, headers={"idempotency-key": key})


def test_a_repeat_replays_the_answer_without_the_upstream(
    url: str, key: str, chat_upstream: ChatUpstream
) -> None:
    chat_upstream.reset()
    body = {"model": "upstream-echo", "input": "only once", "store": False}
    with client(url, key) as http:
        first = _post(http, body, "order-1")
        again = _post(http, body, "order-1")
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.json() == first.json()
    assert len(chat_upstream.requests) == 1


def test_another_body_with_the_same_key_is_409(url: str, key: str) -> None:
    with client(url, key) as http:
        assert _post(http, {"model": "fake-text", "input": "a"}, "order-2").status_code == 200
        reused = _post(http, {"model": "fake-text", "input": "b"}, "order-2")
    assert reused.status_code == 409
    assert reused.json()["error"]["code"] == "idempotency_key_reused"


def test_a_stream_replays_its_events(url: str, key: str, chat_upstream: ChatUpstream) -> None:
    chat_upstream.reset()
    body = {"model": "upstream-echo", "input": "stream me"}
    with client(url, key) as http:
        http.headers["idempotency-key"] = "stream-1"
        first = sse_events(http, body)
        again = sse_events(http, body)
    assert again == first
    assert first[-1]["type"] == "response.completed"
    assert len(chat_upstream.requests) == 1


def test_keys_belong_to_a_project(url: str, key: str) -> None:
    with AdminClient(url) as admin:
        other = admin.key(admin.project())[1]
    body = {"model": "fake-text", "input": "same key, two projects"}
    with client(url, key) as mine, client(url, other) as theirs:
        first = _post(mine, body, "shared-name")
        second = _post(theirs, body, "shared-name")
    assert "idempotent-replayed" not in second.headers
    assert first.json()["id"] != second.json()["id"]


def test_a_failure_before_the_response_releases_the_key(url: str, key: str) -> None:
    with client(url, key) as http:
        failed = _post(http, {"model": "fake-error_before", "input": "x"}, "retry-me")
        assert failed.status_code >= 500
        again = _post(http, {"model": "fake-error_before", "input": "x"}, "retry-me")
        assert "idempotent-replayed" not in again.headers
        bad = _post(http, {"model": "fake-text"}, "")
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "invalid_idempotency_key"


async def test_ten_at_once_make_one_upstream_call(
    url: str, key: str, chat_upstream: ChatUpstream
) -> None:
    chat_upstream.reset()
    body = {"model": "upstream-stall", "input": "once", "stream": False}
    headers = {"authorization": f"Bearer {key}", "idempotency-key": "burst-1"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
        answers = await asyncio.gather(*(http.post("/v1/responses", json=body) for _ in range(10)))
        codes = sorted(answer.status_code for answer in answers)
        assert codes == [200] + [409] * 9, codes
        for answer in answers:
            if answer.status_code == 409:
                assert answer.json()["error"]["code"] == "idempotency_key_in_progress"
                assert answer.headers["retry-after"] == "1"
        winner = next(answer for answer in answers if answer.status_code == 200).json()
        replay = await http.post("/v1/responses", json=body)
    assert replay.json()["id"] == winner["id"]
    assert len(chat_upstream.requests) == 1


def _killed(http: httpx.Client, body: dict[str, object], key: str) -> None:
    """A request whose server is killed while it runs."""
    with contextlib.suppress(httpx.TransportError):
        _post(http, body, key)


def test_a_claim_lives_and_dies_with_its_process(tmp_path: Path) -> None:
    """A claim's lease is renewed with its process's runs: a request that outlasts the lease
    still holds its key; killed with SIGKILL, its claims lapse with its runs, and retries
    run again (they used to get 409 for 15 minutes)."""
    env = {
        "RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/relay.db",
        "RELAY_ROUTES": '[{"model": "slow", "provider": "fake", "upstream_model": "slow"}]',
        "RELAY_RUN_LEASE_S": "1",
        "RELAY_RUN_POLL_S": "0.2",
    }
    answer = {"model": "slow", "input": "x"}
    stream = {**answer, "stream": True}
    with relay_serve(env) as first, httpx.Client(base_url=first.url, timeout=30) as http:
        running = threading.Thread(target=_killed, args=(http, answer, "json-1"), daemon=True)
        running.start()
        time.sleep(1.5)  # past the lease: renewed, still held
        assert _post(http, answer, "json-1").status_code == 409
        with http.stream(
            "POST", "/v1/responses", json=stream, headers={"idempotency-key": "stream-1"}
        ) as streamed:
            next(line for line in streamed.iter_lines() if line.startswith("data:"))
            os.kill(first.process.pid, signal.SIGKILL)
    with relay_serve(env) as second, httpx.Client(base_url=second.url, timeout=30) as http:
        deadline = time.monotonic() + 5
        for body, key in ((answer, "json-1"), (stream, "stream-1")):
            while (again := _post(http, body, key)).status_code == 409:
                assert time.monotonic() < deadline, again.text
                time.sleep(0.2)
            assert again.status_code == 200 and "idempotent-replayed" not in again.headers
            assert "completed" in again.text
