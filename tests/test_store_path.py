"""What a stored response costs the database on PostgreSQL, through a real server: every
statement and transaction its request causes, counted on the server's own engine. The usage
ledger's batch (a transaction every 0.1 s for all the responses settled meanwhile:
relay.access.usage) is not the response's own, and is left out."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from live_server import running
from relay_fixtures import fake_routes
from sqlalchemy import Engine

from bench.store_path import RoundTrips, count_round_trips
from relay.api.app import create_app
from relay.config import Settings

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def served(postgres_url: str) -> Iterator[httpx.Client]:
    """A client of a Relay on PostgreSQL (no keys), whose server runs in this process: its
    statements are counted on every engine (Engine, the class), and no other is at work."""
    app = create_app(Settings(database_url=postgres_url, routes=fake_routes()))
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def own(trips: RoundTrips) -> int:
    """The round trips of the response's own writes: its statements (not the usage ledger's),
    none of them in an explicit transaction (which would add a BEGIN and a COMMIT)."""
    assert not [text for text in trips.in_transactions if "usage_ledger" not in text], trips
    return len([text for text in trips.statements if "usage_ledger" not in text])


def test_a_stored_json_response_is_one_round_trip(served: httpx.Client) -> None:
    body = {"model": "fake-text", "input": "hello", "store": True}
    assert served.post("/v1/responses", json=body).status_code == 200  # warm: pool, statements
    with count_round_trips(Engine) as trips:
        answer = served.post("/v1/responses", json=body)
    assert answer.status_code == 200, answer.text
    # Before: BEGIN, the response row, its items, COMMIT.
    assert own(trips) == 1
    assert served.get(f"/v1/responses/{answer.json()['id']}").json() == answer.json()


def test_a_stored_stream_is_three_round_trips(served: httpx.Client) -> None:
    body = {"model": "fake-text", "input": "hello", "store": True, "stream": True}
    with count_round_trips(Engine) as trips:
        with served.stream("POST", "/v1/responses", json=body) as answer:
            events = [
                orjson.loads(line.removeprefix("data: "))
                for line in answer.iter_lines()
                if line.startswith("data: {")
            ]
        # Its run record goes just after its answer ends.
        deadline = time.monotonic() + 10
        while own(trips) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # anything more would show now
    # Before: its response and run record as it starts, its final save and the record's
    # removal were 13 round trips in three transactions.
    assert own(trips) == 3
    assert events[-1]["type"] == "response.completed"
    completed = events[-1]["response"]
    assert served.get(f"/v1/responses/{completed['id']}").json() == completed
