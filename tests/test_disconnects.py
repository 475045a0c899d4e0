"""Clients that leave early: mid-upload, or before a JSON answer is ready. Neither is an error
of the server's, and the work done for them stops."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from chat_upstream import SLOW_WORDS, ChatUpstream
from live_server import relay_serve, relay_server
from relay_fixtures import checked_client, logged_responses
from starlette.requests import ClientDisconnect

from relay.api.disconnect import WATCH_AFTER_S, CancelOnDisconnect
from relay.config import RouteConfig, Settings

FAKE_ROUTES = orjson.dumps(
    [
        {"model": "fake-text", "provider": "fake", "upstream_model": "text"},
        {"model": "fake-slow", "provider": "fake", "upstream_model": "slow"},
    ]
).decode()


def test_an_aborted_upload_ends_quietly(tmp_path: Path) -> None:
    env = {
        "RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/relay.db",
        "RELAY_ROUTES": FAKE_ROUTES,
        "RELAY_LOG_LEVEL": "info",
    }
    with relay_serve(env) as relay:
        port = int(relay.url.rsplit(":", 1)[1])
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(
                    b"POST /v1/responses HTTP/1.1\r\nHost: relay\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                    + b'{"model": "fake-text", "input": "'
                    + b"x" * 460
                )
                time.sleep(0.01)
        answer = httpx.post(
            f"{relay.url}/v1/responses", json={"model": "fake-text", "input": "still here"}
        )
        assert answer.status_code == 200
        time.sleep(0.2)
    output = relay.output
    assert "Traceback" not in output and "ERROR" not in output, output
    assert "Exception" not in output, output


def test_an_abandoned_json_request_stops_its_upstream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with ChatUpstream() as upstream:
        settings = Settings(
            database_url=f"sqlite:///{tmp_path}/relay.db",
            routes=[
                RouteConfig(model="slow", base_url=upstream.base_url, upstream_model="slow_stream")
            ],
        )
        with relay_server(settings) as url, checked_client(url) as client:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    f"{url}/v1/responses", json={"model": "slow", "input": "hi"}, timeout=0.5
                )
            deadline = time.monotonic() + 10
            while not upstream.slow_streams and time.monotonic() < deadline:
                time.sleep(0.05)
            # The upstream request was cut soon after the client left, not run to its end.
            [ending] = upstream.slow_streams
            words = re.fullmatch(r"cut after (\d+) words", ending)
            assert words is not None, ending
            assert int(words.group(1)) < SLOW_WORDS // 2
            # And the response was stored as cancelled, with what was generated so far (its
            # line is written once it is stored, which may come after the upstream saw the cut).
            while not logged_responses(caplog.records, "cancelled") and time.monotonic() < deadline:
                time.sleep(0.05)
            [line] = logged_responses(caplog.records, "cancelled")
            response_id = line["response_id"]
            stored = client.get(f"/v1/responses/{response_id}").json()
            assert stored["status"] == "cancelled"
            assert stored["output"][0]["status"] == "incomplete"
            assert stored["output_text"].startswith("word word")


def test_an_abandoned_json_request_on_the_fake_provider_is_cancelled(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    settings = Settings(
        database_url=f"sqlite:///{tmp_path}/relay.db",
        routes=[RouteConfig(model="fake-slow", provider="fake", upstream_model="slow")],
    )
    with relay_server(settings) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{url}/v1/responses", json={"model": "fake-slow", "input": "hi"}, timeout=0.5
            )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if logged_responses(caplog.records, "cancelled"):
                break
            time.sleep(0.05)
        assert logged_responses(caplog.records, "cancelled")


def receive_disconnect_after(seconds: float) -> Any:
    async def receive() -> dict[str, str]:
        await asyncio.sleep(seconds)
        return {"type": "http.disconnect"}

    return receive


async def test_a_departure_cancels_the_work_and_ends_in_client_disconnect() -> None:
    seen: list[str] = []
    with pytest.raises(ClientDisconnect), CancelOnDisconnect(receive_disconnect_after(0.05)):
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
    assert seen == ["cancelled"]
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the cancel was taken back


async def test_work_done_before_the_departure_is_not_disturbed() -> None:
    with CancelOnDisconnect(receive_disconnect_after(WATCH_AFTER_S / 2)):
        await asyncio.sleep(WATCH_AFTER_S / 4)
    await asyncio.sleep(WATCH_AFTER_S * 2)  # no cancel arrives later either


async def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    async def work() -> None:
        with CancelOnDisconnect(receive_disconnect_after(60)):
            await asyncio.sleep(5)

    task = asyncio.ensure_future(work())
    await asyncio.sleep(WATCH_AFTER_S * 2)  # watching by now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
