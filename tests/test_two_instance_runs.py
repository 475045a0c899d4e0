"""Background responses across two `relay serve` processes sharing one PostgreSQL database, as
a deployment behind a load balancer runs them: a run started on one instance is polled,
resumed and cancelled through the other, and the runs of an instance killed with SIGKILL end
as failed, found through the other, within the lease.

One pair of instances (A, B) and one loopback upstream serve the module; the crash test starts
an instance of its own beside B, on the same database, and kills that one.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from chat_upstream import ChatUpstream
from conformance import TERMINAL, assert_valid_event, assert_valid_response, check_stream
from db_fixtures import PgServer
from live_server import ServeProcess, relay_serve
from relay_fixtures import sdk_client

pytestmark = pytest.mark.postgres

LEASE_S = 2
POLL_S = 0.2
LIVE = ("queued", "in_progress")
SLOW_TEXT = "one two three four five six seven eight nine ten"
# How long an instance that did not start a run may take to show what the other did.
SETTLE_S = 5.0


@dataclass
class Pair:
    a: ServeProcess
    b: ServeProcess
    upstream: ChatUpstream
    env: dict[str, str]


@pytest.fixture(scope="module")
def pair(pg_server: PgServer) -> Iterator[Pair]:
    database = pg_server.create_database()
    try:
        with ChatUpstream() as upstream:
            routes = [
                # 10 words, one every 0.2 s: about 2 s.
                {"model": "slow", "provider": "fake", "upstream_model": "slow"},
                {"model": "text", "provider": "fake", "upstream_model": "text"},
                # 200 words, one every 50 ms: about 10 s, for runs that must outlast a test step.
                {
                    "model": "slow_stream",
                    "provider": "openai_chat",
                    "base_url": upstream.base_url,
                    "upstream_model": "slow_stream",
                },
            ]
            env = {
                "RELAY_DATABASE_URL": pg_server.url(database),
                "RELAY_ROUTES": orjson.dumps(routes).decode(),
                "RELAY_RUN_POLL_S": str(POLL_S),
                "RELAY_RUN_LEASE_S": str(LEASE_S),
            }
            # One after the other: the first applies the migrations to the fresh database.
            with relay_serve(env) as a, relay_serve(env) as b:
                yield Pair(a, b, upstream, env)
        for served in (a, b):
            assert "Traceback" not in served.output, served.output
    finally:
        pg_server.drop_database(database)


# Helpers -----------------------------------------------------------------------------------------


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Call `check` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def retrieve(url: str, response_id: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/responses/{response_id}", timeout=10)


def settled(url: str, response_id: str, timeout_s: float) -> dict[str, Any]:
    """The response through `url` once it is neither queued nor in_progress."""

    def check() -> dict[str, Any] | None:
        answer = retrieve(url, response_id)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return None if body["status"] in LIVE else body

    found: dict[str, Any] = wait_for(check, timeout_s, f"{response_id} to end")
    assert_valid_response(found)
    return found


def read_events(
    lines: Iterator[str],
    timeout_s: float,
    until: Callable[[dict[str, Any]], bool] | None = None,
) -> list[dict[str, Any]]:
    """The events of an SSE stream's lines, to its end (or through the first event `until`
    accepts), within `timeout_s`: a stream that does not end fails the test, never hangs it."""
    deadline = time.monotonic() + timeout_s
    events: list[dict[str, Any]] = []
    for line in lines:
        assert time.monotonic() < deadline, f"the stream did not end: {events[-3:]}"
        if line.startswith("data: ") and line != "data: [DONE]":
            event: dict[str, Any] = orjson.loads(line.removeprefix("data: "))
            events.append(event)
            if until is not None and until(event):
                return events
    assert until is None, "the stream ended early"
    return events


def replay(url: str, response_id: str, starting_after: int = -1) -> list[dict[str, Any]]:
    with (
        httpx.Client(timeout=10) as http,
        http.stream(
            "GET",
            f"{url}/v1/responses/{response_id}",
            params={"stream": "true", "starting_after": starting_after},
        ) as answer,
    ):
        assert answer.status_code == 200, answer.read()
        return read_events(answer.iter_lines(), timeout_s=15)


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def numbered(events: list[dict[str, Any]], start: int = 0) -> bool:
    return [event["sequence_number"] for event in events] == list(range(start, start + len(events)))


# Tests -------------------------------------------------------------------------------------------


def test_a_run_started_on_one_instance_is_polled_through_the_other(pair: Pair) -> None:
    with sdk_client(pair.a.url) as sdk_a, sdk_client(pair.b.url) as sdk_b:
        created = sdk_a.responses.create(model="slow", input="poll me", background=True)
        assert created.status == "queued" and created.background is True

        seen = []
        deadline = time.monotonic() + 10
        while True:
            polled = sdk_b.responses.retrieve(created.id)
            assert polled.id == created.id and polled.created_at == created.created_at
            if not seen or seen[-1] != polled.status:
                seen.append(polled.status)
            if polled.status not in LIVE:
                break
            assert time.monotonic() < deadline, f"still {polled.status}"
            time.sleep(0.1)
        # B watched it run (a 2 s run is polled while it runs), in order, to its end.
        assert seen in (["queued", "in_progress", "completed"], ["in_progress", "completed"])
        assert polled.status == "completed" and polled.output_text == SLOW_TEXT

        final = sdk_a.responses.retrieve(created.id)
        assert final.to_dict() == polled.to_dict()
        assert final.background is True and final.error is None
        items_a = sdk_a.responses.input_items.list(created.id).to_dict()
        items_b = sdk_b.responses.input_items.list(created.id).to_dict()
        assert items_a == items_b and len(items_b["data"]) == 1


def test_a_stream_left_on_one_instance_is_resumed_through_the_other(pair: Pair) -> None:
    with sdk_client(pair.a.url) as sdk_a, sdk_client(pair.b.url) as sdk_b:
        stream = sdk_a.responses.create(
            model="slow", input="resume me", background=True, stream=True
        )
        first = []
        for event in stream:
            first.append(event.to_dict())
            if event.type == "response.output_text.delta":
                break
        stream.close()  # the client leaves A; the run goes on there
        after = first[-1]["sequence_number"]
        assert after >= 3 and numbered(first)
        assert first[0]["type"] == "response.created"
        assert first[0]["response"]["status"] == "queued"
        response_id = first[0]["response"]["id"]

        # Still running on A: B follows A's event log as it is written, not after the fact.
        assert sdk_b.responses.retrieve(response_id).status in LIVE
        rest = [
            event.to_dict()
            for event in sdk_b.responses.retrieve(response_id, stream=True, starting_after=after)
        ]
        assert rest, "nothing after the point the client left"
        assert numbered(rest, after + 1), kinds(rest)
        assert rest[-1]["type"] == "response.completed"
        assert sum(event["type"] in TERMINAL for event in rest) == 1
        folded = check_stream(first + rest)
        assert folded["status"] == "completed"
        assert rest[-1]["response"]["output"][0]["content"][0]["text"] == SLOW_TEXT

        # Once it ended, either instance replays the whole log, the same, from any point.
        assert replay(pair.b.url, response_id) == first + rest
        assert replay(pair.a.url, response_id) == first + rest
        assert replay(pair.b.url, response_id, starting_after=after) == rest
        stored = sdk_b.responses.retrieve(response_id).to_dict()
        assert stored == rest[-1]["response"]
        assert sdk_a.responses.retrieve(response_id).to_dict() == stored


def test_a_run_on_one_instance_is_cancelled_through_the_other(pair: Pair) -> None:
    cut = len(pair.upstream.slow_streams)
    with (
        sdk_client(pair.a.url) as sdk_a,
        sdk_client(pair.b.url) as sdk_b,
        httpx.Client(timeout=10) as http,
    ):
        created = sdk_a.responses.create(model="slow_stream", input="stop me", background=True)
        # A follower on B (reading A's event log), left open across the cancel.
        with http.stream(
            "GET", f"{pair.b.url}/v1/responses/{created.id}", params={"stream": "true"}
        ) as following:
            assert following.status_code == 200, following.read()
            lines = following.iter_lines()
            seen = read_events(
                lines, timeout_s=10, until=lambda e: e["type"] == "response.output_text.delta"
            )
            assert seen[0]["type"] == "response.created"

            asked = time.monotonic()
            cancelled = sdk_b.responses.cancel(created.id)
            took = time.monotonic() - asked
            assert cancelled.status == "cancelled", cancelled.status
            assert took < 3, f"the cancel took {took:.1f} s"
            # What it had said is kept; it stopped well before its 200 words.
            words = cancelled.output_text.split()
            assert words and set(words) == {"word"} and len(words) < 150, len(words)

            # The follower on B stops rather than hanging.
            seen += read_events(lines, timeout_s=5)
        # A cancelled run's log ends without a terminal event: its run record goes, and the
        # follow stops there.
        assert numbered(seen), kinds(seen)
        assert not TERMINAL & set(kinds(seen)), kinds(seen)

    # A stopped the run, and with it the upstream's stream.
    wait_for(lambda: len(pair.upstream.slow_streams) > cut, 5, "the upstream stream to end")
    assert pair.upstream.slow_streams[cut].startswith("cut after"), pair.upstream.slow_streams

    expected = cancelled.to_dict()
    with sdk_client(pair.a.url) as sdk_a, sdk_client(pair.b.url) as sdk_b:
        assert sdk_a.responses.retrieve(created.id).to_dict() == expected
        assert sdk_b.responses.retrieve(created.id).to_dict() == expected
        # Cancelling again, through either instance, answers the same object.
        assert sdk_a.responses.cancel(created.id).to_dict() == expected
        assert sdk_b.responses.cancel(created.id).to_dict() == expected

    # The log, replayed through either instance after the cancel, ends too: the same events.
    assert replay(pair.b.url, created.id) == seen
    assert replay(pair.a.url, created.id) == seen


def test_the_runs_of_a_killed_instance_end_failed_through_the_other(pair: Pair) -> None:
    """kill -9 of an instance with a background run and a stored stream in flight: through
    the other instance both ids answer, and end failed ("interrupted") within the lease;
    a follower of the background run's log sees it end with error and response.failed."""
    b = pair.b.url
    # Its background runs stay in its own process (not the shared job queue), so that the
    # kill takes this run with it: test_job_queue.py kills a worker that took one.
    with (
        relay_serve({**pair.env, "RELAY_BACKGROUND_QUEUE": "process"}) as doomed,
        httpx.Client(base_url=doomed.url, timeout=10) as http,
        httpx.Client(timeout=10) as http_b,
    ):
        background = http.post(
            "/v1/responses",
            json={"model": "slow_stream", "input": "cut me short", "background": True},
        )
        assert background.status_code == 200, background.text
        background_id = background.json()["id"]

        body = {"model": "slow_stream", "input": "cut me too", "stream": True}
        with (
            http.stream("POST", "/v1/responses", json=body) as stream,
            http_b.stream(
                "GET", f"{b}/v1/responses/{background_id}", params={"stream": "true"}
            ) as following,
        ):
            assert stream.status_code == 200 and following.status_code == 200
            streamed_lines = stream.iter_lines()  # kept: dropping it would close the connection
            created = read_events(
                streamed_lines, timeout_s=10, until=lambda e: e["type"] == "response.created"
            )
            streamed_id = created[0]["response"]["id"]
            follower = following.iter_lines()
            seen = read_events(
                follower, timeout_s=10, until=lambda e: e["type"] == "response.output_text.delta"
            )

            # Both in flight, and both visible through B.
            for response_id in (background_id, streamed_id):
                wait_for(
                    lambda rid=response_id: retrieve(b, rid).json().get("status") == "in_progress",
                    SETTLE_S,
                    f"{response_id} to show in_progress through B",
                )

            os.kill(doomed.process.pid, signal.SIGKILL)
            killed = time.monotonic()
            doomed.process.wait(timeout=10)

            found = {
                response_id: settled(b, response_id, timeout_s=LEASE_S + 5)
                for response_id in (background_id, streamed_id)
            }
            took = time.monotonic() - killed
            # The follower on B sees the log closed by the sweep.
            seen += read_events(follower, timeout_s=5)

    for response_id, response in found.items():
        assert response["id"] == response_id
        assert response["status"] == "failed", response["status"]
        assert response["error"] is not None
        assert "interrupted" in response["error"]["message"], response["error"]
    assert took <= LEASE_S + 4, f"swept after {took:.1f} s"
    assert found[background_id]["background"] is True
    assert found[streamed_id]["background"] is False

    assert kinds(seen)[0] == "response.created"
    assert kinds(seen)[-2:] == ["error", "response.failed"], kinds(seen)
    assert numbered(seen), kinds(seen)
    for event in seen:
        assert_valid_event(event)
    assert "interrupted" in seen[-2]["message"]
    assert seen[-1]["response"] == found[background_id]

    # Replayed afterwards through B: the same log, to the same end.
    assert replay(b, background_id) == seen
    # And the stored stream keeps no log to replay (it was not a background response).
    refused = httpx.get(f"{b}/v1/responses/{streamed_id}", params={"stream": "true"}, timeout=10)
    assert refused.status_code == 400, refused.text
