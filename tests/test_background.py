"""Background responses, cancel and stream resumption, with the official openai client, on
SQLite and PostgreSQL; and what a stored stream leaves behind when its server dies."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conformance import check_stream
from live_server import relay_serve, relay_server
from relay_fixtures import fake_routes, sdk_client

from relay.config import Settings


@pytest.fixture(scope="module")
def url(database_url: str) -> Iterator[str]:
    settings = Settings(database_url=database_url, routes=fake_routes(), run_poll_s=0.2)
    with relay_server(settings) as base_url:
        yield base_url


@pytest.fixture
def sdk(url: str) -> Iterator[openai.OpenAI]:
    with sdk_client(url) as client:
        yield client


def _wait(sdk: openai.OpenAI, response_id: str, timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        response = sdk.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress") or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


def test_a_background_response_is_polled_to_its_end(sdk: openai.OpenAI) -> None:
    created = sdk.responses.create(model="fake-slow", input="hi", background=True)
    assert created.status == "queued" and created.background is True
    done = _wait(sdk, created.id)
    assert done.status == "completed" and done.background is True
    assert done.output_text == "one two three four five six seven eight nine ten"
    assert done.id == created.id and done.created_at == created.created_at


def test_background_needs_store(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.responses.create(model="fake-text", input="hi", background=True, store=False)
    assert raised.value.param == "background"


def test_a_stream_is_resumed_from_where_it_dropped(sdk: openai.OpenAI) -> None:
    stream = sdk.responses.create(model="fake-slow", input="hi", background=True, stream=True)
    first = []
    for event in stream:
        first.append(event.to_dict())
        if event.sequence_number == 6:
            break
    stream.close()  # the client leaves; the run goes on
    assert first[0]["type"] == "response.created"
    assert first[0]["response"]["status"] == "queued"
    response_id = first[0]["response"]["id"]
    rest = [
        event.to_dict()
        for event in sdk.responses.retrieve(response_id, stream=True, starting_after=6)
    ]
    assert [event["sequence_number"] for event in rest] == list(range(7, 7 + len(rest)))
    assert rest[-1]["type"] == "response.completed"
    check_stream(first + rest)
    # After the end, the whole log replays, from any point.
    again = list(sdk.responses.retrieve(response_id, stream=True, starting_after=-1))
    assert [event.to_dict() for event in again] == first + rest
    assert _wait(sdk, response_id).output_text.endswith("ten")


def test_cancel(sdk: openai.OpenAI, url: str) -> None:
    created = sdk.responses.create(model="fake-slow", input="hi", background=True)
    time.sleep(0.5)
    cancelled = sdk.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    assert cancelled.output_text.startswith("one")  # what it had said is kept
    assert sdk.responses.cancel(created.id).model_dump() == cancelled.model_dump()
    time.sleep(0.3)
    assert sdk.responses.retrieve(created.id).status == "cancelled"
    done = sdk.responses.create(model="fake-text", input="hi", background=True)
    finished = _wait(sdk, done.id)
    assert sdk.responses.cancel(done.id).model_dump() == finished.model_dump()
    foreground = sdk.responses.create(model="fake-text", input="hi")
    with pytest.raises(openai.BadRequestError):
        sdk.responses.cancel(foreground.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.cancel("resp_" + "0" * 48)
    with pytest.raises(openai.BadRequestError):
        list(sdk.responses.retrieve(foreground.id, stream=True))


def test_an_upstream_failure_fails_the_background_response(sdk: openai.OpenAI, url: str) -> None:
    created = sdk.responses.create(model="fake-error_before", input="hi", background=True)
    failed = _wait(sdk, created.id)
    assert failed.status == "failed" and failed.error is not None
    # (The SDK raises on an error event; the raw stream shows the sequence.)
    answer = httpx.get(f"{url}/v1/responses/{created.id}", params={"stream": "true"})
    kinds = [line[7:] for line in answer.text.splitlines() if line.startswith("event: ")]
    assert kinds == ["response.created", "error", "response.failed"]


def test_a_stored_stream_is_visible_while_it_runs(url: str) -> None:
    body = {"model": "fake-slow", "input": "hi", "stream": True}
    with httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/responses", json=body) as stream:
            lines = stream.iter_lines()
            created = next(line for line in lines if line.startswith("data:"))
            response_id = httpx.Response(200, content=created[5:]).json()["response"]["id"]
            time.sleep(0.2)
            during = http.get(f"/v1/responses/{response_id}").json()
            assert during["status"] == "in_progress"
            for _ in lines:
                pass
        assert http.get(f"/v1/responses/{response_id}").json()["status"] == "completed"


def test_runs_cut_by_a_crash_end_failed_never_404(tmp_path: Path) -> None:
    """kill -9 with a background run and a stored stream in flight: after a restart, both
    ids answer, failed, with a clear error; the background stream's log ends with it."""
    env = {
        "RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/relay.db",
        "RELAY_ROUTES": '[{"model": "slow", "provider": "fake", "upstream_model": "slow"}]',
        "RELAY_RUN_LEASE_S": "1",
        "RELAY_RUN_POLL_S": "0.2",
    }
    with relay_serve(env) as first:
        http = httpx.Client(base_url=first.url, timeout=30)
        background = http.post(
            "/v1/responses", json={"model": "slow", "input": "x", "background": True}
        ).json()
        with http.stream(
            "POST", "/v1/responses", json={"model": "slow", "input": "x", "stream": True}
        ) as stream:
            lines = stream.iter_lines()  # kept: dropping it would close the connection
            created = next(line for line in lines if line.startswith("data:"))
            streamed = httpx.Response(200, content=created[5:]).json()["response"]["id"]
            time.sleep(0.3)
            os.kill(first.process.pid, signal.SIGKILL)
        http.close()
    with relay_serve(env) as second, sdk_client(second.url) as sdk:
        deadline = time.monotonic() + 10
        for response_id in (background["id"], streamed):
            while (found := sdk.responses.retrieve(response_id)).status in (
                "queued",
                "in_progress",
            ):
                assert time.monotonic() < deadline, "still in_progress"
                time.sleep(0.2)
            assert found.status == "failed"
            assert found.error is not None and "interrupted" in found.error.message
        log = httpx.get(f"{second.url}/v1/responses/{background['id']}?stream=true").text
        kinds = [line[7:] for line in log.splitlines() if line.startswith("event: ")]
        assert kinds[0] == "response.created" and kinds[-2:] == ["error", "response.failed"]


def test_a_stored_stream_is_recorded_before_its_id_is_sent(tmp_path: Path) -> None:
    """Write first, then send: killed right after response.created (the record's write held
    up until then by another writer's lock), the id answers, failed, never 404."""
    env = {
        "RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/relay.db",
        "RELAY_ROUTES": '[{"model": "slow", "provider": "fake", "upstream_model": "slow"}]',
        "RELAY_RUN_LEASE_S": "1",
        "RELAY_RUN_POLL_S": "0.2",
    }
    body = {"model": "slow", "input": "x", "stream": True}
    with relay_serve(env) as first, httpx.Client(base_url=first.url, timeout=30) as http:
        lock = os.open(f"{tmp_path}/relay.db.write-lock", os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_EX)  # Relay's writers queue behind it
        release = threading.Timer(0.5, fcntl.flock, (lock, fcntl.LOCK_UN))
        release.start()
        with http.stream("POST", "/v1/responses", json=body) as stream:
            created = next(line for line in stream.iter_lines() if line.startswith("data:"))
            os.kill(first.process.pid, signal.SIGKILL)
        release.join()
        os.close(lock)
    response_id = httpx.Response(200, content=created[5:]).json()["response"]["id"]
    with relay_serve(env) as second, sdk_client(second.url) as sdk:
        assert _wait(sdk, response_id).status == "failed"


def test_a_lease_must_be_renewed_in_time() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="a third of run_lease_s"):
        Settings(run_lease_s=2, run_poll_s=1)
    Settings(run_lease_s=3, run_poll_s=1)


def test_an_idempotent_background_stream_is_one_run(url: str) -> None:
    """The client leaves its background stream and retries with the same Idempotency-Key:
    the retry follows the same run from its first event, it does not start another."""
    body = {"model": "fake-slow", "input": "x", "background": True, "stream": True}
    headers = {"idempotency-key": "bg-stream-1"}
    with httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/responses", json=body, headers=headers) as first:
            lines = first.iter_lines()
            created = next(line for line in lines if line.startswith("data:"))
        response_id = httpx.Response(200, content=created[5:]).json()["response"]["id"]
        with http.stream("POST", "/v1/responses", json=body, headers=headers) as again:
            assert again.headers["idempotent-replayed"] == "true"
            text = "".join(again.iter_text())
        assert response_id in text and "event: response.completed" in text
        bad = http.get(
            f"/v1/responses/{response_id}",
            params={"stream": "true", "starting_after": "99999999999"},
        )
        assert bad.status_code == 400
