"""Relay servers for tests: real uvicorn on loopback, fake-provider routes, SQLite or PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import orjson
import pytest
from conformance import assert_valid_item, assert_valid_response, check_stream
from live_server import relay_server
from pydantic import SecretStr

from relay.config import ApiKeyConfig, RouteConfig, Settings

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
    "unmetered",
]


def fake_routes() -> list[RouteConfig]:
    routes = [
        RouteConfig(model=f"fake-{script}", provider="fake", upstream_model=script)
        for script in FAKE_SCRIPTS
    ]
    routes.append(
        RouteConfig(
            model="fake-forwards-plugins",
            provider="fake",
            upstream_model="error_before",
            forward_fields=["plugins"],
            fallbacks=["fake-text"],
        )
    )
    routes.append(
        RouteConfig(
            model="fake-flaky",
            provider="fake",
            upstream_model="error_before",
            fallbacks=["fake-text"],
        )
    )
    return routes


RESPONSE_PATH = re.compile(r"/(api/)?v1/responses(/resp_[^/]+)?")


def check_answer(answer: httpx.Response) -> None:
    """Every JSON answer a test receives: a valid response object, item list or error envelope."""
    if not answer.headers.get("content-type", "").startswith("application/json"):
        return  # streams are checked event by event in sse_events
    answer.read()
    body = answer.json()
    path = answer.request.url.path
    if answer.status_code >= 400:
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
    elif answer.request.method != "DELETE" and RESPONSE_PATH.fullmatch(path) and "id" in body:
        assert_valid_response(body)
    elif path.endswith("/input_items"):
        for item in body["data"]:
            assert_valid_item(item)


def checked_client(base_url: str, timeout: float = 30) -> httpx.Client:
    """An httpx client that validates every answer with check_answer."""
    return httpx.Client(
        base_url=base_url, timeout=timeout, event_hooks={"response": [check_answer]}
    )


def sdk_client(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    """The official client, its answers validated on the way in, with retries off."""
    return openai.OpenAI(
        base_url=f"{base_url}/v1",
        api_key=api_key,
        max_retries=0,
        http_client=checked_client(base_url),
    )


@contextmanager
def relay_on_sqlite(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    routes: Iterable[RouteConfig | dict[str, Any]],
    **settings: Any,
) -> Iterator[str]:
    """A running Relay on a new SQLite database (in a temporary folder named `name`) with
    `routes` (RouteConfig objects or their dicts) and any other `settings`; yields its URL."""
    database = tmp_path_factory.mktemp(name) / "relay.db"
    configs = [RouteConfig.model_validate(route) for route in routes]
    with relay_server(
        Settings(database_url=f"sqlite:///{database}", routes=configs, **settings)
    ) as url:
        yield url


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('relay')}/relay.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(scope="session")
def relay_url(database_url: str) -> Iterator[str]:
    """An open Relay (no API keys) with the fake routes."""
    with relay_server(Settings(database_url=database_url, routes=fake_routes())) as url:
        yield url


@pytest.fixture(scope="session")
def keyed_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Relay with the fake routes and two keys: sk-alice (tenant alice), sk-bob (bob)."""
    keys = [
        ApiKeyConfig(key=SecretStr("sk-alice"), tenant="alice"),
        ApiKeyConfig(key=SecretStr("sk-bob"), tenant="bob"),
    ]
    with relay_on_sqlite(tmp_path_factory, "keyed", fake_routes(), api_keys=keys) as url:
        yield url


@pytest.fixture(scope="session")
def client(relay_url: str) -> Iterator[openai.OpenAI]:
    with sdk_client(relay_url) as session:
        yield session


@pytest.fixture(scope="session")
def http(relay_url: str) -> Iterator[httpx.Client]:
    with checked_client(relay_url) as session:
        yield session


def sse_events(http: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    """POST a streaming request and parse the SSE exactly, checking the framing as we go and
    the events with check_stream."""
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
    check_stream(events)
    return events


def logged_responses(records: Iterable[Any], status: str | None = None) -> list[dict[str, Any]]:
    """The fields of the log lines that tell of a settled response (a request's access line,
    or a response's own line), of the given status."""
    return [
        record.fields
        for record in records
        if getattr(record, "fields", {}).get("response_id")
        and status in (None, record.fields["response_status"])
    ]
