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
from relay.storage.sql import SqlStore


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    database = Path(tmp_path_factory.mktemp("tuned")) / "relay.db"
    settings = Settings(
        database_url=f"sqlite:///{database}",
        routes=fake_routes(),
        keepalive_s=0.05,
        echo_json_schema=False,
        max_body_bytes=4096,
        cors_origins=["https://tester.example"],
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


def test_oversized_bodies_get_413(tuned: httpx.Client) -> None:
    answer = tuned.post("/v1/responses", json={"model": "fake-text", "input": "x" * 5000})
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no content-length: the limit holds while reading
        yield b'{"model": "fake-text", "input": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    streamed = tuned.post(
        "/v1/responses", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413


def test_cors_preflight_for_configured_origins(tuned: httpx.Client) -> None:
    preflight = tuned.options(
        "/v1/responses",
        headers={
            "origin": "https://tester.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://tester.example"
    other = tuned.options(
        "/v1/responses",
        headers={"origin": "https://elsewhere.example", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in other.headers


def test_a_bug_answers_500_in_the_envelope(
    tuned: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: object) -> None:
        raise RuntimeError("internal detail that must not leak")

    monkeypatch.setattr(SqlStore, "get_response", broken)
    answer = tuned.get("/v1/responses/resp_anything", headers={"x-request-id": "req_bug"})
    assert answer.status_code == 500
    assert answer.headers["x-request-id"] == "req_bug"
    assert answer.headers["x-should-retry"] == "false"
    assert answer.json()["error"]["type"] == "server_error"
    assert "internal detail" not in answer.text and "Traceback" not in answer.text


def test_hosted_tools_are_left_out_and_named_or_refused(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/relay.db", routes=fake_routes(), hosted_tools="omit"
    )
    function = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
    body = {
        "model": "fake-tool_call",
        "input": "x",
        "tools": [{"type": "web_search"}, function, {"type": "file_search"}],
    }
    with relay_server(settings) as url, checked_client(url) as client:
        answer = client.post("/v1/responses", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-relay-omitted-tools"] == "web_search,file_search"
        response = answer.json()
        assert [tool["name"] for tool in response["tools"]] == ["lookup"]
        # Nothing pretends a hosted tool ran: the model could call only what it was offered.
        assert [item["type"] for item in response["output"]] == ["function_call"]
        with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as stream:
            assert stream.headers["x-relay-omitted-tools"] == "web_search,file_search"
            stream.read()
        plain = client.post("/v1/responses", json={**body, "tools": [function]})
        assert "x-relay-omitted-tools" not in plain.headers
    refusing = settings.model_copy(update={"hosted_tools": "refuse"})
    with relay_server(refusing) as url, checked_client(url) as client:
        refused = client.post("/v1/responses", json=body)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("tools[0].type", "unsupported_tool_type")
