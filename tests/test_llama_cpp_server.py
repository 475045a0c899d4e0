"""Relay in front of a real third-party chat server: llama-cpp-python's OpenAI-compatible
server (`python -m llama_cpp.server`) on the bundled GGUF model.

That server sends no usage in its streams (even with `stream_options.include_usage`), and
while it generates one answer it ends the streams of the others after the role chunk with
`[DONE]`: no finish_reason, no text. Relay must neither answer those as empty successes nor
charge nothing for real answers.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import pytest
from conformance import assert_valid_response
from live_server import free_port
from team import PRICE, AdminClient, client, team_relay
from test_limits_budgets import project_usage

from relay.config import RouteConfig
from relay.providers.llama_local import bundled_model_path

pytest.importorskip(
    "llama_cpp.server.app", reason="llama-cpp-python's server extra is not installed"
)
MODEL = "llama-server"
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server on a free loopback port; its base URL once it answers."""
    port = free_port()
    log = (tmp_path_factory.mktemp("llama-server") / "server.log").open("wb")
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_model_path())]
    command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "llama_cpp.server exited at start"
            try:
                if httpx.get(f"{base_url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "llama_cpp.server did not start in 60 s"
            time.sleep(0.2)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def relay_url(llama_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    route = RouteConfig(
        model=MODEL,
        base_url=llama_server,
        upstream_model="smollm2",
        price=PRICE,
        retries=2,
        retry_backoff_s=0.3,
    )
    database = tmp_path_factory.mktemp("relay") / "relay.db"
    with team_relay(f"sqlite:///{database}", routes=[route]) as url:
        yield url


def ask(http: httpx.Client, stream: bool) -> dict[str, Any]:
    """One short answer: the response (folded from the stream when streaming), or the HTTP
    error's body with its status."""
    body = {"model": MODEL, "input": "Say hello.", "max_output_tokens": 16, "stream": stream}
    if not stream:
        answer = http.post("/v1/responses", json=body, timeout=60)
        return answer.json() | {"http_status": answer.status_code}
    with http.stream("POST", "/v1/responses", json=body, timeout=60) as answer:
        if answer.status_code != 200:
            answer.read()
            return {"http_status": answer.status_code, **answer.json()}
        final: dict[str, Any] = {}
        for line in answer.iter_lines():
            if line.startswith("data: {"):
                event = orjson.loads(line[6:])
                if event["type"] in TERMINAL:
                    final = event["response"]
        return final | {"http_status": 200}


def test_answers_are_counted_and_never_empty_successes(
    relay_url: str, admin_key_client: AdminClient
) -> None:
    project = admin_key_client.project()
    _, value = admin_key_client.key(project)
    with client(relay_url, value) as http, ThreadPoolExecutor(6) as pool:
        alone = ask(http, stream=True)  # nothing to interrupt it: a whole answer
        outcomes = list(pool.map(lambda number: ask(http, stream=number % 2 == 0), range(18)))
    outcomes.append(alone)
    assert alone["status"] in ("completed", "incomplete"), alone
    statuses = [outcome.pop("http_status") for outcome in outcomes]
    assert set(statuses) <= {200, 502}, outcomes
    answered = [o for o, status in zip(outcomes, statuses, strict=True) if status == 200]
    refused = [o for o, status in zip(outcomes, statuses, strict=True) if status == 502]
    for outcome in answered:
        assert_valid_response(outcome)
        if outcome["status"] in ("completed", "incomplete"):
            assert outcome["output_text"], outcome  # never an empty success
            usage = outcome["usage"]
            assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0, usage
        else:  # cut short mid-answer: another request interrupted it
            assert outcome["error"]["code"] == "upstream_truncated", outcome
    for outcome in refused:  # nothing came, after the retries
        assert outcome["error"]["code"] == "upstream_truncated", outcome
    succeeded = [o for o in answered if o["status"] in ("completed", "incomplete")]
    assert succeeded, outcomes
    row = project_usage(admin_key_client, project, requests=len(answered))
    assert row["estimated_requests"] == len(answered)
    assert row["output_tokens"] >= sum(o["usage"]["output_tokens"] for o in succeeded) > 0
    assert row["cost_usd"] > 0


@pytest.fixture
def admin_key_client(relay_url: str) -> Iterator[AdminClient]:
    with AdminClient(relay_url) as admin:
        yield admin
