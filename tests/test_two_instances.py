"""Two `relay serve` processes sharing one PostgreSQL database and one Redis, as a deployment
behind a load balancer runs them: rate limits, concurrency, budgets, Idempotency-Key and key
revocation hold across both, whichever instance a request reaches.

One pair of instances (and one loopback upstream, which counts the calls that reach it) serves
the whole module; each test makes projects and keys of its own.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import chat_upstream
import httpx
import orjson
import pytest
from chat_upstream import ChatUpstream
from console_client import ConsoleClient, signed_in
from cryptography.fernet import Fernet
from db_fixtures import PgServer
from live_server import ServeProcess, refused_in_one_line, relay, relay_serve
from team import clear_of_a_minute_end

pytestmark = pytest.mark.postgres

ADMIN_KEY = f"adm-{secrets.token_hex(16)}"
# $1000 per million tokens: a thousandth of a dollar a token, so a few words cost something.
PRICE = {"input": 1000, "output": 1000}
USD_PER_TOKEN = 0.001
# How long the other instance may take to see a change (the ledger's write, a key's cache).
SETTLE_S = 2.0
RESET = re.compile(r"\d+ms|\d+s|\d+m\d+s")


@dataclass
class Pair:
    a: ServeProcess
    b: ServeProcess
    upstream: ChatUpstream

    @property
    def urls(self) -> tuple[str, str]:
        return self.a.url, self.b.url


@pytest.fixture(scope="module")
def pair(pg_server: PgServer, redis_url: str) -> Iterator[Pair]:
    database = pg_server.create_database()
    try:
        with ChatUpstream() as upstream:
            routes = [
                {
                    "model": "echo",
                    "provider": "openai_chat",
                    "base_url": upstream.base_url,
                    "upstream_model": "echo",
                    "price": PRICE,
                },
                {
                    "model": "slow_stream",
                    "provider": "openai_chat",
                    "base_url": upstream.base_url,
                    "upstream_model": "slow_stream",
                },
                {
                    "model": "slow_headers",
                    "provider": "openai_chat",
                    "base_url": upstream.base_url,
                    "upstream_model": "slow_headers",
                },
            ]
            env = {
                "RELAY_DATABASE_URL": pg_server.url(database),
                "RELAY_REDIS_URL": redis_url,
                "RELAY_ADMIN_KEYS": orjson.dumps([{"key": ADMIN_KEY, "name": "ops"}]).decode(),
                "RELAY_ROUTES": orjson.dumps(routes).decode(),
                "RELAY_KEY_CACHE_S": "0.5",
            }
            # One after the other: the first applies the migrations to the fresh database.
            with relay_serve(env) as a, relay_serve(env) as b:
                yield Pair(a, b, upstream)
        for served in (a, b):
            assert "Traceback" not in served.output, served.output
    finally:
        pg_server.drop_database(database)


# Helpers -----------------------------------------------------------------------------------------


def admin(url: str, method: str, path: str, body: Any = None) -> Any:
    answer = httpx.request(
        method,
        f"{url}/admin/v1{path}",
        json=body,
        headers={"X-Admin-Key": ADMIN_KEY},
        timeout=30,
    )
    assert answer.is_success, answer.text
    return answer.json()


def new_project(url: str, **policy: Any) -> str:
    project = admin(url, "POST", "/projects", {"name": "two instances", "policy": policy})
    assert project["policy"] == policy
    project_id: str = project["id"]
    return project_id


def new_key(url: str, project: str, **policy: Any) -> tuple[str, str]:
    """A key for `project`: its value and its id."""
    key = admin(url, "POST", "/keys", {"project_id": project, "name": "test", "policy": policy})
    return key["value"], key["id"]


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


def respond(url: str, key: str, text: str = "hello there", **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/responses",
        json={"model": "echo", "input": text},
        headers=auth(key, **headers),
        timeout=30,
    )


def error_code(answer: httpx.Response) -> str:
    code: str = answer.json()["error"]["code"]
    return code


def sse_events(body: bytes) -> list[dict[str, Any]]:
    events = []
    for block in body.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(orjson.loads(line.removeprefix("data: ")))
    return events


def assert_rate_limited(answer: httpx.Response) -> None:
    assert answer.status_code == 429, answer.text
    assert error_code(answer) == "rate_limit_exceeded"
    assert int(answer.headers["retry-after"]) >= 1


# Rate limits ---------------------------------------------------------------------------------


def test_a_project_rpm_limit_counts_the_requests_of_both_instances(pair: Pair) -> None:
    rpm = 6
    project = new_project(pair.a.url, rpm=rpm)
    key, _ = new_key(pair.b.url, project)
    calls = len(pair.upstream.requests)

    remaining = []
    for index in range(rpm):
        answer = respond(pair.urls[index % 2], key)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-ratelimit-limit-requests"] == str(rpm)
        remaining.append(int(answer.headers["x-ratelimit-remaining-requests"]))
    # One window: each instance saw the other's requests counted.
    assert remaining == list(range(rpm - 1, -1, -1))

    for url in pair.urls:
        refused = respond(url, key)
        assert_rate_limited(refused)
        assert refused.headers["x-ratelimit-limit-requests"] == str(rpm)
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert RESET.fullmatch(refused.headers["x-ratelimit-reset-requests"])
        assert int(refused.headers["retry-after"]) <= 60
    assert len(pair.upstream.requests) == calls + rpm


def test_max_concurrent_holds_across_instances(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    # A slow stream of 30 words, one every 50 ms: open for about 1.5 s.
    monkeypatch.setattr(chat_upstream, "SLOW_WORDS", 30)
    project = new_project(pair.a.url)
    key, _ = new_key(pair.a.url, project, max_concurrent=1)
    body = {"model": "slow_stream", "input": "hold the slot", "stream": True}

    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{pair.a.url}/v1/responses", json=body, headers=auth(key)) as held,
    ):
        assert held.status_code == 200
        lines = held.iter_lines()
        for line in lines:  # the upstream is streaming: the slot is surely held now
            if line.startswith("data: ") and "response.output_text.delta" in line:
                break
        refused = respond(pair.b.url, key)
        assert_rate_limited(refused)
        assert "at once" in refused.json()["error"]["message"]  # not the rpm window
        rest = "\n".join(lines)
    assert '"type":"response.completed"' in rest.replace(" ", "")
    assert pair.upstream.slow_streams[-1] == "finished"

    # The stream ended (and with it its lease): B takes the slot.
    answer = respond(pair.b.url, key)
    assert answer.status_code == 200, answer.text


# Budgets -------------------------------------------------------------------------------------


def test_a_credit_spent_on_one_instance_is_refused_on_the_other(pair: Pair) -> None:
    project = new_project(pair.a.url, credit_usd=0.01)
    key, key_id = new_key(pair.a.url, project)
    calls = len(pair.upstream.requests)

    # Each answer costs (3 words in + 3 out) x $0.001 = $0.006: the second passes (spent
    # $0.006 < $0.01), the third is refused.
    spent = []
    for _ in range(2):
        answer = respond(pair.a.url, key, "one two three")
        assert answer.status_code == 200, answer.text
        spent.append(answer.json()["usage"])
    refused = respond(pair.a.url, key, "one two three")
    assert refused.status_code == 402, refused.text
    assert error_code(refused) == "insufficient_quota"
    assert len(pair.upstream.requests) == calls + 2

    input_tokens = sum(usage["input_tokens"] for usage in spent)
    output_tokens = sum(usage["output_tokens"] for usage in spent)
    assert input_tokens > 0 and output_tokens > 0
    expected = {
        "project": project,
        "key": key_id,
        "model": "echo",
        "requests": 2,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
    }

    # Once A's ledger is written, B reads the same usage and refuses the same project.
    deadline = time.monotonic() + SETTLE_S
    while True:
        report = admin(
            pair.b.url, "GET", f"/usage?group_by=project,key,model&project_id={project}"
        )["data"]
        if report or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(report) == 1, report
    row = report[0]
    assert {name: row[name] for name in expected} == expected
    assert row["cost_usd"] == pytest.approx((input_tokens + output_tokens) * USD_PER_TOKEN)
    assert row["cost_usd"] >= 0.01

    refused = respond(pair.b.url, key, "one two three")
    assert refused.status_code == 402, refused.text
    assert error_code(refused) == "insufficient_quota"
    assert refused.json()["error"]["type"] == "insufficient_quota"
    assert len(pair.upstream.requests) == calls + 2

    # A top-up through B: B serves the project again at once, A once its cache lapses.
    admin(pair.b.url, "POST", f"/projects/{project}", {"policy": {"credit_usd": 1.0}})
    assert respond(pair.b.url, key, "one two three").status_code == 200
    deadline = time.monotonic() + SETTLE_S
    while True:
        answer = respond(pair.a.url, key, "one two three")
        if answer.status_code != 402 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert answer.status_code == 200, answer.text
    assert len(pair.upstream.requests) == calls + 4


def test_a_credit_holds_when_sequential_requests_alternate_instances(pair: Pair) -> None:
    """Each answer's spend is written before the answer ends, so the next request, on the
    other instance, is admitted against it: a credit good for 5 answers admits 5."""
    project = new_project(pair.a.url, credit_usd=0.03)  # 5 answers of $0.006
    key, _ = new_key(pair.a.url, project)
    codes = [
        respond(pair.urls[number % 2], key, "one two three").status_code for number in range(10)
    ]
    assert codes == [200] * 5 + [402] * 5


def test_a_credit_is_reached_exactly_when_it_was_first_checked_against_views(pair: Pair) -> None:
    """At a steady pace a credit good for 60 answers is far from its cap at first (each
    instance admits against its view of the spend, without reading the database), then near
    it (read before each admission): it still admits exactly 60."""
    project = new_project(pair.a.url, credit_usd=0.36)  # 60 answers of $0.006
    key, _ = new_key(pair.a.url, project)
    codes = []
    for number in range(64):
        codes.append(respond(pair.urls[number % 2], key, "one two three").status_code)
        time.sleep(0.1)  # about $0.05 a second: far while over 0.22 of the credit is left
    assert codes == [200] * 60 + [402] * 4


# Idempotency-Key -----------------------------------------------------------------------------


async def test_concurrent_retries_across_instances_call_the_upstream_once(pair: Pair) -> None:
    project = new_project(pair.a.url)
    key, _ = new_key(pair.a.url, project)
    # The upstream answers after 1 s: the retries arrive while the first still runs.
    raw = orjson.dumps({"model": "slow_headers", "input": "only once, please"})
    idempotency_key = f"idem-{secrets.token_hex(8)}"
    headers = auth(key, **{"Idempotency-Key": idempotency_key, "Content-Type": "application/json"})
    calls = len(pair.upstream.requests)

    async with httpx.AsyncClient(timeout=30) as client:

        async def post(url: str, content: bytes = raw) -> tuple[str, httpx.Response]:
            return url, await client.post(f"{url}/v1/responses", content=content, headers=headers)

        answers = await asyncio.gather(*(post(pair.urls[index % 2]) for index in range(10)))

        originals = [
            (url, answer)
            for url, answer in answers
            if answer.status_code == 200 and "idempotent-replayed" not in answer.headers
        ]
        assert len(originals) == 1, [(answer.status_code, answer.text) for _, answer in answers]
        origin, original = originals[0]
        response_id = original.json()["id"]
        in_progress = 0
        for _, answer in answers:
            if answer is original:
                continue
            if answer.status_code == 200:
                assert answer.headers["idempotent-replayed"] == "true"
                assert answer.content == original.content
            else:
                assert answer.status_code == 409, answer.text
                assert error_code(answer) == "idempotency_key_in_progress"
                assert answer.headers["retry-after"] == "1"
                in_progress += 1
        assert in_progress >= 1  # the first was still waiting on its upstream
        assert len(pair.upstream.requests) == calls + 1

        # A retry after the fact, through the other instance: the same answer, replayed.
        other = pair.b.url if origin == pair.a.url else pair.a.url
        _, replay = await post(other)
        assert replay.status_code == 200, replay.text
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.json()["id"] == response_id
        assert replay.content == original.content

        # The same key with another body, on either instance: refused, not replayed.
        changed = orjson.dumps({"model": "slow_headers", "input": "something else"})
        for url in pair.urls:
            _, reused = await post(url, changed)
            assert reused.status_code == 409, reused.text
            assert error_code(reused) == "idempotency_key_reused"
    assert len(pair.upstream.requests) == calls + 1


def test_a_stream_is_replayed_by_the_other_instance(pair: Pair) -> None:
    project = new_project(pair.a.url)
    key, _ = new_key(pair.a.url, project)
    raw = orjson.dumps({"model": "echo", "input": "stream me once", "stream": True})
    headers = auth(
        key,
        **{"Idempotency-Key": f"idem-{secrets.token_hex(8)}", "Content-Type": "application/json"},
    )
    calls = len(pair.upstream.requests)

    first = httpx.post(f"{pair.a.url}/v1/responses", content=raw, headers=headers, timeout=30)
    assert first.status_code == 200, first.text
    assert first.headers["content-type"].startswith("text/event-stream")
    assert "idempotent-replayed" not in first.headers
    events = sse_events(first.content)
    assert events[-1]["type"] == "response.completed"
    response_id = events[-1]["response"]["id"]

    replay = httpx.post(f"{pair.b.url}/v1/responses", content=raw, headers=headers, timeout=30)
    assert replay.status_code == 200, replay.text
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["content-type"].startswith("text/event-stream")
    assert sse_events(replay.content) == events
    assert replay.content == first.content
    assert sse_events(replay.content)[-1]["response"]["id"] == response_id
    assert replay.content.endswith(b"data: [DONE]\n\n")
    assert len(pair.upstream.requests) == calls + 1


# Revocation ----------------------------------------------------------------------------------


def test_a_key_revoked_on_one_instance_stops_working_on_the_other(pair: Pair) -> None:
    project = new_project(pair.a.url)
    key, key_id = new_key(pair.a.url, project)
    assert respond(pair.b.url, key).status_code == 200  # B has read (and cached) the key

    revoked = admin(pair.a.url, "DELETE", f"/keys/{key_id}")
    assert revoked["status"] == "revoked"
    since = time.monotonic()
    refused = respond(pair.a.url, key)  # the instance that revoked it knows at once
    assert refused.status_code == 401, refused.text
    assert error_code(refused) == "api_key_revoked"

    while True:
        answer = respond(pair.b.url, key)
        if answer.status_code != 200 or time.monotonic() - since > SETTLE_S:
            break
        time.sleep(0.05)
    assert answer.status_code == 401, answer.text
    assert error_code(answer) == "api_key_revoked"
    assert time.monotonic() - since <= SETTLE_S + 0.5


def test_failed_console_sign_ins_are_counted_across_instances(pair: Pair) -> None:
    """The console's limit on failed sign-ins per address (5 a minute) is one count in Redis:
    failures on either instance add up, and both then refuse the address, right key or not.
    Each failure is logged by the instance that saw it, without the key it was sent."""
    clear_of_a_minute_end()
    address = "127.0.0.4"  # this test's own: no other test signs in from it
    wrong = [f"sk-relay-{secrets.token_urlsafe(33)}/+=" for _ in range(5)]
    consoles = [ConsoleClient(url, local_address=address) for url in pair.urls]
    try:
        for attempt, key in enumerate(wrong):
            answer = consoles[attempt % 2].sign_in(key)  # A, B, A, B, A
            assert answer.status_code == 401, answer.text
        for console in consoles:
            refused = console.sign_in(ADMIN_KEY)
            assert refused.status_code == 429, refused.text
            assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert consoles[0].http.cookies.get("relay_console") is None
    finally:
        for console in consoles:
            console.close()
    # Another address is not held back.
    signed_in(pair.b.url, ADMIN_KEY, local_address="127.0.0.5").close()
    logs = {served.url: served.log_so_far() for served in (pair.a, pair.b)}
    for url, failures in ((pair.a.url, 3), (pair.b.url, 2)):
        refused_lines = re.findall(rf"console sign-in from {address} refused: (\w+)", logs[url])
        assert refused_lines.count("invalid_api_key") == failures, logs[url]
        assert "too_many_failures" not in refused_lines  # said in words, below
        assert f"console sign-in from {address} refused: too many failures" in logs[url]
    for key in wrong:
        encodings = (key, quote(key), quote_plus(key), base64.b64encode(key.encode()).decode())
        for encoded in (*encodings, key.encode().hex()):
            assert not any(encoded in log for log in logs.values())


def test_instances_that_would_seal_with_other_keys_do_not_start(
    pg_server: PgServer, tmp_path: Path
) -> None:
    """Without sealing_keys each instance generates a key into its data_dir. Behind a load
    balancer, instances with different keys refuse each other's compaction items (random
    400s): the one that starts on a database knowing another key refuses to, in one line."""
    database = pg_server.create_database()
    try:
        shared = {
            "RELAY_DATABASE_URL": pg_server.url(database),
            "RELAY_ROUTES": '[{"model": "m", "provider": "fake"}]',
        }
        first = {**shared, "RELAY_DATA_DIR": str(tmp_path / "first")}
        other = {**shared, "RELAY_DATA_DIR": str(tmp_path / "other")}
        with relay_serve(first), relay_serve(first):  # one data_dir, one key: both serve
            done = relay("serve", "--port", "0", env=other)
        line = refused_in_one_line(done, "another instance on this database seals with a key")
        assert f"{tmp_path / 'other'}/sealing.key" in line and "RELAY_SEALING_KEYS" in line
        # Configured keys are the operator's choice: they take over, and an instance left
        # without them is told to set them.
        key = Fernet.generate_key().decode()
        with relay_serve({**other, "RELAY_SEALING_KEYS": orjson.dumps([key]).decode()}):
            pass
        done = relay("serve", "--port", "0", env=first)
        line = refused_in_one_line(done, "seal with configured sealing_keys")
        assert key not in done.stderr
    finally:
        pg_server.drop_database(database)
