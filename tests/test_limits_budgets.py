"""Rate limits (429 and the headers OpenAI clients read), budgets (402) and the usage ledger,
on one Relay with in-process limits. (Across two instances: test_two_instances.py.)"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from relay_fixtures import sdk_client, sse_events
from team import PRICE, AdminClient, ask, client, team_relay

from relay.access.limits import Admission, RateLimiter, Scope
from relay.errors import RateLimited
from relay.models.policy import Policy


def test_requests_per_minute_per_key(team_url: str, admin: AdminClient) -> None:
    _, value = admin.key(admin.project(), policy={"rpm": 3})
    with client(team_url, value) as http:
        answers = [ask(http) for _ in range(4)]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 429]
    assert [answer.headers["x-ratelimit-remaining-requests"] for answer in answers] == [
        "2",
        "1",
        "0",
        "0",
    ]
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")


def test_the_project_limit_binds_all_its_keys(team_url: str, admin: AdminClient) -> None:
    project = admin.project(policy={"rpm": 2})
    keys = [admin.key(project)[1] for _ in range(2)]
    codes = []
    for value in [*keys, *keys]:
        with client(team_url, value) as http:
            codes.append(ask(http).status_code)
    assert codes == [200, 200, 429, 429]


def test_tokens_per_minute_count_real_usage(team_url: str, admin: AdminClient) -> None:
    # The fake answer to "hello" costs 1 input + 3 output tokens: two fill a window of 8.
    _, value = admin.key(admin.project(), policy={"tpm": 8})
    with client(team_url, value) as http:
        first = ask(http)
        assert first.headers["x-ratelimit-limit-tokens"] == "8"
        assert first.headers["x-ratelimit-remaining-tokens"] == "8"
        second = ask(http)
        assert second.headers["x-ratelimit-remaining-tokens"] == "4"
        time.sleep(0.1)  # the second's tokens are added as it settles
        refused = ask(http)
    assert refused.status_code == 429, refused.text
    assert "tokens per minute" in refused.json()["error"]["message"]


def test_concurrent_requests(team_url: str, admin: AdminClient) -> None:
    _, value = admin.key(admin.project(), policy={"max_concurrent": 1})
    with client(team_url, value) as http, client(team_url, value) as other:
        with http.stream(
            "POST", "/v1/responses", json={"model": "fake-slow", "input": "x", "stream": True}
        ) as slow:
            assert slow.status_code == 200
            refused = ask(other)
            assert refused.status_code == 429
            assert "at once" in refused.json()["error"]["message"]
            slow.read()
        time.sleep(0.1)
        assert ask(other).status_code == 200
        # A refused or failed start frees its slot too.
        assert ask(other, model="fake-error_before").status_code >= 400
        assert ask(other).status_code == 200


@pytest.fixture(scope="module", params=["memory", "redis"])
def limited_url(
    request: pytest.FixtureRequest, team_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A team Relay counting its limits in memory (team_url), or in Redis."""
    if request.param == "memory":
        yield team_url
        return
    database = tmp_path_factory.mktemp("redis-team") / "relay.db"
    redis_url = request.getfixturevalue("redis_url")
    # These tests count exactly: a Redis call that outlasts the default 50 ms (a loaded
    # machine) would let the request pass unlimited, as designed (tested on its own), and
    # miscount here.
    with team_relay(f"sqlite:///{database}", redis_url=redis_url, redis_timeout_s=2.0) as url:
        yield url


def test_requests_refused_at_once_use_up_no_window(limited_url: str) -> None:
    """Refusals for concurrency count against nothing: once the slot is free, the whole
    rpm window is still there, and the headers said so all along."""
    # The rpm window slides by whole minutes (the previous minute's count weighted by what is
    # left of it): a test that crossed a minute's end would see one request more allowed.
    into_minute = time.time() % 60
    if into_minute > 50:
        time.sleep(60.5 - into_minute)
    with AdminClient(limited_url) as admin:
        _, value = admin.key(admin.project(), policy={"rpm": 10, "max_concurrent": 1})
    with client(limited_url, value) as http, client(limited_url, value) as other:
        with http.stream(
            "POST", "/v1/responses", json={"model": "fake-slow", "input": "x", "stream": True}
        ) as slow:
            assert slow.headers["x-ratelimit-remaining-requests"] == "9"
            refused = [ask(other) for _ in range(20)]
            slow.read()
        time.sleep(0.2)  # the slow one settles after its last event
        assert {answer.status_code for answer in refused} == {429}
        assert all("at once" in answer.json()["error"]["message"] for answer in refused)
        assert {answer.headers["x-ratelimit-remaining-requests"] for answer in refused} == {"9"}
        answers = [ask(other) for _ in range(10)]
    assert [answer.status_code for answer in answers] == [200] * 9 + [429]
    remaining = [answer.headers["x-ratelimit-remaining-requests"] for answer in answers]
    assert remaining == [str(left) for left in range(8, -1, -1)] + ["0"]
    assert "10 requests per minute" in answers[-1].json()["error"]["message"]


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    limiter = RateLimiter(redis_url)
    yield limiter
    await limiter.aclose()


def scope(kind: str, **policy: int) -> Scope:
    return Scope(kind, secrets.token_hex(6), Policy(**policy))


async def settle(limiter: RateLimiter, admission: Admission, tokens: int) -> None:
    """Settle `admission` and wait until it is (at once in memory)."""
    waiting = limiter.settle(admission, tokens)
    if waiting is not None:
        await waiting


async def refused(limiter: RateLimiter, scopes: list[Scope], tokens: int = 1) -> RateLimited:
    with pytest.raises(RateLimited) as raised:
        await limiter.admit(scopes, tokens)
    return raised.value


async def test_a_refusal_by_one_scope_counts_in_no_other(limiter: RateLimiter) -> None:
    key, project = scope("key", rpm=5), scope("project", max_concurrent=1)
    held = await limiter.admit([key, project], 1)
    assert held.headers["x-ratelimit-remaining-requests"] == "4"
    for _ in range(3):  # the project's slot is taken: the key's window must not move
        refusal = await refused(limiter, [key, project])
        assert "at once" in refusal.message
        assert refusal.headers["x-ratelimit-remaining-requests"] == "4"
    await settle(limiter, held, 0)
    admitted = await limiter.admit([key, project], 1)
    assert admitted.headers["x-ratelimit-remaining-requests"] == "3"
    await settle(limiter, admitted, 0)


async def test_a_tokens_refusal_counts_no_request(limiter: RateLimiter) -> None:
    key, project = scope("key", rpm=3, max_concurrent=5), scope("project", tpm=10)
    first = await limiter.admit([key, project], 4)
    await settle(limiter, first, 8)  # 2 tokens left
    for _ in range(4):
        refusal = await refused(limiter, [key, project], tokens=4)
        assert "10 tokens per minute" in refusal.message
        assert refusal.headers["x-ratelimit-remaining-requests"] == "2"
        assert refusal.headers["x-ratelimit-remaining-tokens"] == "2"
    # The key's window is as the first request left it: two more fit.
    held = [await limiter.admit([key], 1) for _ in range(2)]
    assert held[-1].headers["x-ratelimit-remaining-requests"] == "0"
    for admission in held:
        await settle(limiter, admission, 0)


async def test_requests_over_the_window_hold_no_slot(limiter: RateLimiter) -> None:
    key = scope("key", rpm=1, max_concurrent=1)
    first = await limiter.admit([key], 1)
    await settle(limiter, first, 0)
    for _ in range(3):
        refusal = await refused(limiter, [key])
        assert "1 requests per minute" in refusal.message
        assert refusal.headers["x-ratelimit-remaining-requests"] == "0"
    other = scope("key", max_concurrent=1)
    # Admission with both: the key's window refuses; the other's slot stays free.
    await refused(limiter, [key, other])
    admitted: Admission = await limiter.admit([other], 1)
    await settle(limiter, admitted, 0)


def test_the_openai_sdk_sees_a_rate_limit_error(team_url: str, admin: AdminClient) -> None:
    _, value = admin.key(admin.project(), policy={"rpm": 1})
    with sdk_client(team_url, value) as sdk:
        sdk.responses.create(model="fake-text", input="one")
        with pytest.raises(openai.RateLimitError) as raised:
            sdk.responses.create(model="fake-text", input="two")
    assert raised.value.code == "rate_limit_exceeded"
    assert raised.value.response.headers["retry-after"]


def test_a_daily_budget_is_checked_before_the_upstream(team_url: str, admin: AdminClient) -> None:
    # "priced": 1 input token at $1,000/M + 3 output tokens at $2,000/M = $0.007 an answer.
    project = admin.project(policy={"daily_budget_usd": 0.02})
    key_id, value = admin.key(project)
    with client(team_url, value) as http:
        codes = [ask(http, model="priced").status_code for _ in range(4)]
        # Unpriced routes cost nothing, yet the budget is spent: they are refused too.
        spent = ask(http)
    assert codes == [200, 200, 200, 402]
    assert spent.status_code == 402
    error = spent.json()["error"]
    assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
    assert f"project '{project}'" in error["message"]
    assert "daily budget of $0.02" in error["message"]
    assert "wait for the next UTC day" in error["message"]
    usage = admin.call("GET", "/usage", group_by="key,model", key_id=key_id)["data"]
    assert usage == [
        {
            "key": key_id,
            "model": "priced",
            "requests": 3,
            "input_tokens": 3,
            "cached_tokens": 0,
            "output_tokens": 9,
            "cost_usd": 0.021,
            "estimated_requests": 0,
        }
    ]
    # Raising the budget lets it through again.
    admin.call("POST", f"/projects/{project}", {"policy": {"daily_budget_usd": 1}})
    time.sleep(0.3)
    with client(team_url, value) as http:
        assert ask(http, model="priced").status_code == 200


def test_a_key_credit_and_a_stream_that_crosses_it(team_url: str, admin: AdminClient) -> None:
    """A response that starts within the budget runs to its end and is charged in full; the
    budget is then over, and the next request is refused. (A stream is never cut: its
    client would be left with half an answer it paid for.)"""
    _, value = admin.key(admin.project(), policy={"credit_usd": 0.001})
    with client(team_url, value) as http:
        events = sse_events(http, {"model": "priced-slow", "input": "x"})
        assert events[-1]["type"] == "response.completed"
        cost = events[-1]["response"]["usage"]["output_tokens"] * 2000 / 1e6
        assert cost > 0.001  # it crossed the credit
        time.sleep(0.1)
        refused = ask(http, model="priced")
    assert refused.status_code == 402
    message = refused.json()["error"]["message"]
    assert "credit of $0.00" in message
    assert "raise it to top up" in message and "wait" not in message  # a credit never renews


def test_usage_is_recorded_for_every_outcome(team_url: str, admin: AdminClient) -> None:
    project = admin.project()
    _, value = admin.key(project)
    with client(team_url, value) as http:
        assert ask(http, model="priced").status_code == 200
        assert ask(http, model="fake-error_after").status_code == 200  # a failed response
        assert ask(http, model="fake-flaky").status_code == 200  # served by its fallback
        done = threading.Event()

        def leave_early() -> None:
            with http.stream("POST", "/v1/responses", json={"model": "fake-slow", "input": "x"}):
                done.set()

        leaver = threading.Thread(target=leave_early)
        leaver.start()
        leaver.join()
    time.sleep(0.5)
    rows = admin.call("GET", "/usage", group_by="model,route", project_id=project)["data"]
    summary = {(row["model"], row["route"]): row["requests"] for row in rows}
    assert summary == {
        ("priced", "priced"): 1,
        ("fake-error_after", "fake-error_after"): 1,
        ("fake-flaky", "fake-text"): 1,
        ("fake-slow", "fake-slow"): 1,
    }
    by_project = admin.call("GET", "/usage", group_by="project", project_id=project)["data"]
    assert by_project[0]["requests"] == 4 and by_project[0]["cost_usd"] == 0.007


def project_usage(admin: AdminClient, project: str, requests: int = 1) -> dict[str, Any]:
    """The project's usage row, once its `requests` responses are in the ledger."""
    deadline = time.monotonic() + 5
    while True:
        rows = admin.call("GET", "/usage", group_by="project", project_id=project)["data"]
        if (rows and rows[0]["requests"] >= requests) or time.monotonic() > deadline:
            assert rows and rows[0]["requests"] == requests, rows
            row: dict[str, Any] = rows[0]
            return row
        time.sleep(0.05)


def cost_usd(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * PRICE.input + output_tokens * PRICE.output) / 1e6


def test_a_client_that_leaves_early_pays_for_what_it_was_sent(
    team_url: str, admin: AdminClient
) -> None:
    """A stream cut by its client after two deltas is charged for its input and the words
    generated, counted by Relay (the upstream's usage never came), and stored with them."""
    project = admin.project()
    _, value = admin.key(project)
    body = {"model": "priced-slow", "input": "x", "stream": True}
    with client(team_url, value) as http:
        with http.stream("POST", "/v1/responses", json=body) as answer:
            deltas, response_id = 0, ""
            for line in answer.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = orjson.loads(line[6:])
                response_id = response_id or event["response"]["id"]
                deltas += event["type"] == "response.output_text.delta"
                if deltas == 2:
                    break
        row = project_usage(admin, project)
        stored = http.get(f"/v1/responses/{response_id}").json()
    assert stored["status"] == "cancelled"
    assert 2 <= stored["usage"]["output_tokens"] <= 3  # a word may have come as it left
    assert stored["usage"]["input_tokens"] == 1
    output = stored["usage"]["output_tokens"]
    assert (row["input_tokens"], row["output_tokens"]) == (1, output)
    assert row["cost_usd"] == pytest.approx(cost_usd(1, output))
    assert row["estimated_requests"] == 1


def test_a_cancelled_background_run_pays_for_what_it_generated(
    team_url: str, admin: AdminClient
) -> None:
    project = admin.project()
    _, value = admin.key(project)
    body = {"model": "priced-slow", "input": "x", "stream": True, "background": True}
    with client(team_url, value) as http:
        with http.stream("POST", "/v1/responses", json=body) as answer:
            deltas, response_id = 0, ""
            for line in answer.iter_lines():
                if line.startswith("data: "):
                    event = orjson.loads(line[6:])
                    response_id = response_id or event["response"]["id"]
                    deltas += event["type"] == "response.output_text.delta"
                    if deltas == 3:
                        break
        cancelled = http.post(f"/v1/responses/{response_id}/cancel").json()
        row = project_usage(admin, project)
    assert cancelled["status"] == "cancelled"
    output = cancelled["usage"]["output_tokens"]
    assert 3 <= output < 10
    assert (row["input_tokens"], row["output_tokens"]) == (1, output)
    assert row["cost_usd"] == pytest.approx(cost_usd(1, output)) and row["cost_usd"] > 0


def test_an_upstream_that_reports_no_usage_is_counted(team_url: str, admin: AdminClient) -> None:
    """Usage 0/0 would make every answer free and limits blind: Relay counts it instead
    (the fake's measure: words), and the ledger says the row was counted."""
    project = admin.project()
    _, value = admin.key(project)
    with client(team_url, value) as http:
        answer = ask(http, model="priced-unmetered").json()
        metered = ask(http, model="priced").json()
        row = project_usage(admin, project, requests=2)
    assert answer["output_text"] == metered["output_text"] == "You said: hello"
    assert answer["usage"] == metered["usage"]  # counted exactly as the upstream would have
    assert answer["usage"]["output_tokens"] == 3 and answer["usage"]["total_tokens"] == 4
    assert row["estimated_requests"] == 1
    assert row["cost_usd"] == pytest.approx(2 * cost_usd(1, 3))


def test_usage_and_cost_by_deployment(team_url: str, admin: AdminClient) -> None:
    project = admin.project()
    _, value = admin.key(project)
    with client(team_url, value) as http:
        for name in ("dear", "cheap", "cheap"):
            answer = ask(http, model="priced-pair", provider={"only": [name]})
            assert answer.headers["x-relay-deployment"] == name
    time.sleep(0.5)
    rows = admin.call("GET", "/usage", group_by="route,deployment", project_id=project)["data"]
    summary = {row["deployment"]: (row["requests"], row["cost_usd"]) for row in rows}
    assert summary.keys() == {"dear", "cheap"}
    assert summary["dear"][0] == 1 and summary["dear"][1] > 0
    assert summary["cheap"] == (2, 0.0)  # priced by the deployment that answered


def test_each_websocket_turn_is_a_request(team_url: str, admin: AdminClient) -> None:
    from websockets.sync.client import connect

    _, value = admin.key(admin.project(), policy={"rpm": 1})
    socket_url = team_url.replace("http://", "ws://") + "/v1/responses"
    turn = orjson.dumps({"type": "response.create", "model": "fake-text", "input": "hi"}).decode()
    with connect(socket_url, additional_headers={"authorization": f"Bearer {value}"}) as ws:
        ws.send(turn)
        while orjson.loads(ws.recv())["type"] != "response.completed":
            pass
        ws.send(turn)
        refused = orjson.loads(ws.recv())
    assert refused["type"] == "error" and refused["status"] == 429
    assert refused["error"]["code"] == "rate_limit_exceeded"


def test_a_redis_that_never_answers_lets_requests_pass_at_once(tmp_path: Path) -> None:
    """A Redis that accepts connections and never answers (the kernel completes the
    handshake, nobody reads): every keyed request passes unlimited, after at most one short
    wait, as the README promises; nothing waits for Redis's retries."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(128)
        redis_url = f"redis://127.0.0.1:{hole.getsockname()[1]}/0"
        with (
            team_relay(f"sqlite:///{tmp_path / 'relay.db'}", redis_url=redis_url) as url,
            AdminClient(url) as admin,
        ):
            _, value = admin.key(admin.project(policy={"rpm": 3, "max_concurrent": 1}))
            with client(url, value) as http:
                started = time.monotonic()
                codes = [ask(http).status_code for _ in range(10)]
                elapsed = time.monotonic() - started
    assert codes == [200] * 10
    assert elapsed < 1.5, elapsed
