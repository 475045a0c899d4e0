"""WebSocket mode: turns on one socket, the socket's own store:false chain, errors that leave
the socket open, the connection limit, authentication and origins. Every event is checked
against the contract, as on the SSE path."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from conformance import check_stream, validator
from live_server import ServeProcess, relay_serve, relay_server
from pydantic import SecretStr
from relay_fixtures import fake_routes
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from relay.config import ApiKeyConfig, Settings

DEFAULT_QUEUED = Settings.model_fields["websocket_max_queued_turns"].default

TERMINAL = {"response.completed", "response.incomplete", "response.failed"}


def socket_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/v1/responses"


@pytest.fixture
def ws(relay_url: str) -> Iterator[ClientConnection]:
    with connect(socket_url(relay_url)) as socket:
        yield socket


def turn(socket: ClientConnection, **body: Any) -> list[dict[str, Any]]:
    """Send one response.create; the events until the terminal one, or the one error."""
    socket.send(orjson.dumps({"type": "response.create", **body}).decode())
    events: list[dict[str, Any]] = []
    while True:
        event = orjson.loads(socket.recv(timeout=30))
        events.append(event)
        if event["type"] == "error" and "status" in event:
            errors = list(validator("WebSocketErrorEvent").iter_errors(event))
            assert not errors, errors
            assert len(events) == 1, "an error envelope ends a turn before it streams"
            return events
        if event["type"] in TERMINAL:
            check_stream(events)
            return events


def completed(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert events[-1]["type"] == "response.completed", events[-1]
    response: dict[str, Any] = events[-1]["response"]
    return response


def error_of(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert events[-1]["type"] == "error", events[-1]
    error: dict[str, Any] = events[-1]["error"]
    return error


def test_turns_and_a_store_false_chain_on_one_socket(ws: ClientConnection) -> None:
    first = completed(turn(ws, model="fake-text", input="alpha beta", store=False))
    assert first["output_text"] == "You said: alpha beta"
    second = completed(
        turn(ws, model="fake-text", input="gamma", store=False, previous_response_id=first["id"])
    )
    # The fake provider counts the words of the context: the first turn's input and output
    # came from the socket's memory (the response was never stored).
    context = "alpha beta" + " You said: alpha beta" + " gamma"
    assert second["usage"]["input_tokens"] == len(context.split())
    third = completed(turn(ws, model="fake-text", input="delta", previous_response_id=second["id"]))
    # ... and so did the second's, though it continued a stored one: "You said: gamma delta".
    assert third["usage"]["input_tokens"] == second["usage"]["input_tokens"] + 3 + 1


def test_a_stored_turn_that_continues_an_unstored_one_keeps_its_context(
    ws: ClientConnection, relay_url: str
) -> None:
    first = completed(turn(ws, model="fake-text", input="alpha beta", store=False))
    second = completed(turn(ws, model="fake-text", input="gamma", previous_response_id=first["id"]))
    # Storage alone must rebuild the second's context, though the first was never stored: the
    # chain is kept among the second's input items.
    items = httpx.get(f"{relay_url}/v1/responses/{second['id']}/input_items?order=asc").json()
    assert len(items["data"]) == 3
    third = httpx.post(
        f"{relay_url}/v1/responses",
        json={"model": "fake-text", "input": "delta", "previous_response_id": second["id"]},
    ).json()
    context = "alpha beta" + " You said: alpha beta" + " gamma" + " You said: gamma" + " delta"
    assert third["usage"]["input_tokens"] == len(context.split())


def test_a_store_false_response_is_unknown_on_another_socket(relay_url: str) -> None:
    with connect(socket_url(relay_url)) as one:
        first = completed(turn(one, model="fake-text", input="x", store=False))
    with connect(socket_url(relay_url)) as other:
        events = turn(other, model="fake-text", input="y", previous_response_id=first["id"])
        assert events[0]["status"] == 400
        assert error_of(events)["code"] == "previous_response_not_found"
        assert error_of(events)["param"] == "previous_response_id"
        # The socket stays open for the next turn.
        completed(turn(other, model="fake-text", input="fresh start", store=False))


def test_a_stored_response_continues_on_any_socket(relay_url: str) -> None:
    with connect(socket_url(relay_url)) as one:
        first = completed(turn(one, model="fake-text", input="kept"))
    with connect(socket_url(relay_url)) as other:
        completed(turn(other, model="fake-text", input="on", previous_response_id=first["id"]))
    stored = httpx.get(f"{relay_url}/v1/responses/{first['id']}")
    assert stored.status_code == 200


def test_a_failed_continuation_evicts_what_it_continued(ws: ClientConnection) -> None:
    first = completed(turn(ws, model="fake-text", input="x", store=False))
    orphan = [{"type": "function_call_output", "call_id": "call_nowhere", "output": "42"}]
    failed = turn(
        ws, model="fake-text", input=orphan, store=False, previous_response_id=first["id"]
    )
    assert failed[0]["status"] == 400 and error_of(failed)["param"] == "input[0].call_id"
    again = turn(ws, model="fake-text", input="y", store=False, previous_response_id=first["id"])
    assert error_of(again)["code"] == "previous_response_not_found"


def test_a_turn_that_fails_mid_stream_evicts_too(ws: ClientConnection) -> None:
    first = completed(turn(ws, model="fake-text", input="x", store=False))
    failed = turn(
        ws, model="fake-error_after", input="y", store=False, previous_response_id=first["id"]
    )
    assert failed[-1]["type"] == "response.failed"
    again = turn(ws, model="fake-text", input="z", store=False, previous_response_id=first["id"])
    assert error_of(again)["code"] == "previous_response_not_found"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (b"not json", "invalid_json"),
        (b'{"type": "response.cancel"}', "unknown_event_type"),
        (b'{"type": "response.create", "input": "no model"}', "missing_required_parameter"),
        (b'{"type": "response.create", "model": "fake-text", "input": "x", "stream": false}', None),
        (
            b'{"type": "response.create", "model": "fake-text", "input": "x", "background": true}',
            None,
        ),
        (b'{"type": "response.create", "model": "nope", "input": "x"}', "model_not_found"),
    ],
)
def test_an_error_leaves_the_socket_open(
    ws: ClientConnection, message: bytes, code: str | None
) -> None:
    ws.send(message.decode())
    event = orjson.loads(ws.recv(timeout=10))
    assert event["type"] == "error" and event["status"] in (400, 404), event
    assert not list(validator("WebSocketErrorEvent").iter_errors(event))
    if code is not None:
        assert event["error"]["code"] == code
    completed(turn(ws, model="fake-text", input="still here", store=False))


def test_a_warm_up_generates_nothing_and_can_be_continued(ws: ClientConnection) -> None:
    warm = completed(
        turn(
            ws,
            model="fake-text",
            input="context words",
            instructions="Be brief.",
            generate=False,
            store=False,
        )
    )
    assert warm["output"] == [] and warm["usage"]["output_tokens"] == 0
    answer = completed(
        turn(ws, model="fake-text", input="now", store=False, previous_response_id=warm["id"])
    )
    assert answer["output_text"] == "You said: now"
    assert answer["usage"]["input_tokens"] == len(["context", "words", "now"])


# The SDK opens its socket in a way websockets 17.1+ deprecates: its warning, not ours.
@pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager")
def test_the_official_client_over_websocket(relay_url: str) -> None:
    client = openai.OpenAI(base_url=f"{relay_url}/v1", api_key="unused", max_retries=0)
    with client.responses.connect() as connection:
        answers = []
        previous = None
        for text in ("one", "two"):
            connection.response.create(
                model="fake-text", input=text, store=False, previous_response_id=previous
            )
            for event in connection:
                if event.type == "response.completed":
                    answers.append(event.response.output_text)
                    previous = event.response.id
                    break
                assert event.type != "error", event
    assert answers == ["You said: one", "You said: two"]


def test_a_client_that_leaves_mid_turn_cancels_it(relay_url: str) -> None:
    with connect(socket_url(relay_url)) as socket:
        socket.send(
            orjson.dumps({"type": "response.create", "model": "fake-slow", "input": "x"}).decode()
        )
        created = orjson.loads(socket.recv(timeout=10))
        assert created["type"] == "response.created"
    response_id = created["response"]["id"]
    for _ in range(100):
        stored = httpx.get(f"{relay_url}/v1/responses/{response_id}")
        if stored.status_code == 200:
            break
        time.sleep(0.05)
    assert stored.json()["status"] == "cancelled"


@pytest.fixture(scope="module")
def guarded_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path_factory.mktemp('ws')}/relay.db",
        routes=fake_routes(),
        api_keys=[ApiKeyConfig(key=SecretStr("sk-ws-key"), tenant="acme")],
        cors_origins=["https://app.example"],
        websocket_max_age_s=1.0,
    )
    with relay_server(settings) as url:
        yield url


def test_the_upgrade_needs_a_key_and_an_allowed_origin(guarded_url: str) -> None:
    url = socket_url(guarded_url)
    with pytest.raises(InvalidStatus) as missing:
        connect(url)
    assert missing.value.response.status_code == 401
    assert orjson.loads(missing.value.response.body)["error"]["code"] == "authentication_required"
    key = {"Authorization": "Bearer sk-ws-key"}
    with pytest.raises(InvalidStatus) as foreign:
        connect(url, additional_headers={**key, "Origin": "https://evil.example"})
    assert foreign.value.response.status_code == 403
    with connect(url, additional_headers={**key, "Origin": "https://app.example"}) as socket:
        completed(turn(socket, model="fake-text", input="x", store=False))


def test_a_socket_takes_turns_until_its_age_limit(guarded_url: str) -> None:
    headers = {"Authorization": "Bearer sk-ws-key"}
    with connect(socket_url(guarded_url), additional_headers=headers) as socket:
        completed(turn(socket, model="fake-text", input="x", store=False))
        time.sleep(1.2)
        events = turn(socket, model="fake-text", input="y", store=False)
        assert error_of(events)["code"] == "websocket_connection_limit_reached"
        with pytest.raises(ConnectionClosed):
            socket.recv(timeout=5)


def test_websocket_mode_serves_under_api_v1_too(relay_url: str, tmp_path: Path) -> None:
    with connect(relay_url.replace("http://", "ws://") + "/api/v1/responses") as socket:
        completed(turn(socket, model="fake-text", input="x", store=False))


MAX_BODY = 2_000_000
MB = 1_000_000


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """`relay serve` as a user starts it (uvicorn takes its WebSocket limits from there),
    with room for 2 MB messages."""
    routes = [
        {"model": f"fake-{script}", "provider": "fake", "upstream_model": script}
        for script in ("text", "slow")
    ]
    env = {
        "RELAY_DATABASE_URL": f"sqlite:///{tmp_path_factory.mktemp('ws-serve')}/relay.db",
        "RELAY_ROUTES": orjson.dumps(routes).decode(),
        "RELAY_MAX_BODY_BYTES": str(MAX_BODY),
    }
    with relay_serve(env) as served:
        yield served
    assert "Traceback" not in served.output, served.output


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    kilobytes = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
    return int(kilobytes) * 1024


def test_a_message_over_max_body_bytes_closes_the_socket(serve_process: ServeProcess) -> None:
    with connect(socket_url(serve_process.url)) as socket:
        big = {"type": "response.create", "model": "fake-text", "input": "x" * MAX_BODY}
        socket.send(orjson.dumps(big).decode())
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009  # message too big
    assert str(MAX_BODY) in closed.value.rcvd.reason


def test_turns_queued_behind_a_slow_one_are_bounded(serve_process: ServeProcess) -> None:
    """150 turns of 1 MB sent behind a slow one: a few wait, the others are refused at once
    with an error event, and the server's memory stays bounded; the socket stays usable."""
    pid = serve_process.process.pid
    turns = 150
    big = orjson.dumps(
        {
            "type": "response.create",
            "model": "fake-text",
            "input": "y" * MB,
            "store": False,
            "generate": False,
        }
    ).decode()
    with connect(socket_url(serve_process.url), max_size=None) as socket:
        completed(turn(socket, model="fake-text", input="warm up", store=False))
        before = peak_rss(pid)
        slow = {"type": "response.create", "model": "fake-slow", "input": "x", "store": False}
        socket.send(orjson.dumps(slow).decode())
        for _ in range(turns):
            socket.send(big)
        finished, refused = 0, []
        while finished + len(refused) < turns + 1:
            event = orjson.loads(socket.recv(timeout=60))
            if event["type"] == "error":
                refused.append(event)
            elif event["type"] in TERMINAL:
                assert event["type"] == "response.completed", event
                finished += 1
        grown = peak_rss(pid) - before
        completed(turn(socket, model="fake-text", input="still here", store=False))
    assert refused and finished >= 1 + DEFAULT_QUEUED
    for event in refused:
        assert event["status"] == 429, event
        assert event["error"]["code"] == "websocket_queue_full"
        assert not list(validator("WebSocketErrorEvent").iter_errors(event))
    assert grown < 40 * MB, f"the server grew by {grown / MB:.0f} MB"
