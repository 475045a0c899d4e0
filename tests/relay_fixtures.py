"""Relay servers for tests: real uvicorn on loopback, fake-provider routes, SQLite or PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from live_server import relay_server

from relay.config import RouteConfig, Settings

FAKE_SCRIPTS = [
    "text",
    "tool_call",
    "parallel_tool_calls",
    "reasoning",
    "error_before",
    "error_after",
    "slow",
    "length",
    "json",
]


def fake_routes() -> list[RouteConfig]:
    routes = [
        RouteConfig(model=f"fake-{script}", provider="fake", upstream_model=script)
        for script in FAKE_SCRIPTS
    ]
    routes.append(
        RouteConfig(
            model="fake-flaky",
            provider="fake",
            upstream_model="error_before",
            fallbacks=["fake-text"],
        )
    )
    return routes


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('relay')}/relay.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(scope="session")
def relay_url(database_url: str) -> Iterator[str]:
    """An open Relay (no API keys) with the fake routes."""
    with relay_server(Settings(database_url=database_url, routes=fake_routes())) as url:
        yield url


@pytest.fixture(scope="session")
def client(relay_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{relay_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def http(relay_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=relay_url, timeout=30) as session:
        yield session


def sse_events(http: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a streaming request and parse the SSE exactly, checking the framing as we go."""
    events: list[dict[str, Any]] = []
    with http.stream("POST", "/v1/responses", json={**body, "stream": True}) as answer:
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(answer.iter_bytes())
    assert b"\r" not in raw, "SSE must use LF line endings"
    blocks = raw.decode().split("\n\n")
    assert blocks[-1] == "", "stream must end with a blank line"
    assert blocks[-2] == "data: [DONE]", "stream must end with data: [DONE]"
    for block in blocks[:-2]:
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines:
            continue  # a keep-alive comment
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: ")
        event = orjson.loads(lines[1][len("data: ") :])
        assert lines[0][len("event: ") :] == event["type"], "event name must equal the JSON type"
        events.append(event)
    return events
