"""Settings that change what a client sees: keep-alive comments, the json_schema echo."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conformance import check_stream, validator
from live_server import relay_server
from relay_fixtures import checked_client, fake_routes, sse_events

from relay.config import Settings


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    database = Path(tmp_path_factory.mktemp("tuned")) / "relay.db"
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{database}",
        routes=fake_routes(),
        keepalive_s=0.05,
        echo_json_schema=False,
    )
    with relay_server(settings) as url, checked_client(url) as client:
        yield client


def test_keepalive_comments_fill_silences(tuned: httpx.Client) -> None:
    with tuned.stream(
        "POST", "/v1/responses", json={"model": "fake-slow", "input": "x", "stream": True}
    ) as answer:
        raw = answer.read().decode()
    assert raw.count(": keep-alive\n\n") >= 3  # ten words 0.2 s apart, keep-alive every 0.05 s
    events = sse_events(tuned, {"model": "fake-text", "input": "still valid"})
    assert check_stream(events)["output_text"] == "You said: still valid"


def test_contract_shaped_json_schema_echo(tuned: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    body = tuned.post(
        "/v1/responses",
        json={
            "model": "fake-json",
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "answer", "schema": schema}},
        },
    ).json()
    assert body["text"]["format"] == {
        "type": "json_schema",
        "name": "answer",
        "description": None,
        "schema": None,
        "strict": False,
    }
    assert not list(validator("ResponseResource").iter_errors(body))
