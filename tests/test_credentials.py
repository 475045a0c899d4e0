"""No credential Relay sends upstream comes back out of Relay, in any form: not in a client's
error, not in a stored failure, not in a stream's error event, not in a log line."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from chat_upstream import ChatUpstream
from live_server import relay_server
from relay_fixtures import checked_client, sse_events

from relay.config import RouteConfig, Settings
from relay.providers.credentials import FRAGMENT, REDACTED, Scrubber

KEY = "sk-test-Zq8mW3xR7nB2vK9pL4tY6cH1"
HEADER_SECRET = "hdr-5Jd9Qx2Lm7Wv4Rt8Np3K"
USER, PASSWORD = "proxy-user", "p@ss:w0rd/Zx9Qk%Vb"


def forms(secret: str) -> list[str]:
    return [secret, quote(secret, safe="")]


BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
SECRETS = [*forms(KEY), *forms(HEADER_SECRET), *forms(PASSWORD), BASIC, f"{USER}:{PASSWORD}"]


def assert_no_credential(text: str) -> None:
    """Neither a credential nor any FRAGMENT-long run of one appears in `text`."""
    for secret in SECRETS:
        for start in range(len(secret) - FRAGMENT + 1):
            fragment = secret[start : start + FRAGMENT]
            assert fragment not in text, f"{fragment!r} of a credential leaked: {text!r}"


def assert_logged_without_credentials(caplog: pytest.LogCaptureFixture, expected: str) -> None:
    """The failure was logged (with the upstream's words), and no log line holds a credential."""
    assert any(expected in record.getMessage() for record in caplog.records)
    for record in caplog.records:
        assert_no_credential(record.getMessage())


def test_every_form_and_fragment_is_scrubbed() -> None:
    scrub = Scrubber.for_upstream(
        api_key=KEY,
        username=USER,
        password=quote(PASSWORD, safe=""),
        headers={"X-K": HEADER_SECRET},
    )
    text = " | ".join(
        [
            f"Authorization: Bearer {KEY}",
            f"Authorization: Basic {BASIC}",
            BASIC[: len(BASIC) // 2],  # an echo cut short
            f"{KEY[:10]}...{KEY[-10:]}",  # a masked key that shows more than its ends
            quote(HEADER_SECRET),
            f'{{"password": "{PASSWORD}"}}',
            quote(PASSWORD, safe=""),
            BASIC.replace("/", "\\/"),  # JSON with escaped slashes
        ]
    )
    scrubbed = scrub(text)
    assert_no_credential(scrubbed)
    assert scrubbed.startswith(f"Authorization: Bearer {REDACTED}")
    assert scrubbed.count(REDACTED) >= 8


def test_ordinary_text_and_public_headers_survive() -> None:
    scrub = Scrubber.for_upstream(api_key=KEY, headers={"X-Title": "My production app"})
    text = "The model 'gpt-x' is overloaded in production; retry later."
    assert scrub(text) == text
    assert Scrubber([])(text) == text


def test_a_short_password_is_scrubbed_where_whole() -> None:
    scrub = Scrubber.for_upstream(username="u", password="hunt2")
    assert scrub("user u with password hunt2 denied") == f"user u with password {REDACTED} denied"


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, ChatUpstream]]:
    """Relay in front of an upstream that repeats every header it receives: routes with a
    bearer key and a secret custom header, and with a password in the base URL."""
    database = Path(tmp_path_factory.mktemp("leaky")) / "relay.db"
    with ChatUpstream() as upstream, pytest.MonkeyPatch.context() as env:
        env.setenv("LEAKY_UPSTREAM_KEY", KEY)
        with_password = upstream.base_url.replace(
            "http://", f"http://{USER}:{quote(PASSWORD, safe='')}@"
        )
        routes = []
        for suffix, upstream_model in (
            ("", "echo_credentials"),
            ("-mid", "echo_credentials_stream"),
        ):
            routes += [
                RouteConfig(
                    model=f"bearer{suffix}",
                    base_url=upstream.base_url,
                    api_key_env="LEAKY_UPSTREAM_KEY",
                    headers={"X-Api-Key": HEADER_SECRET, "X-Title": "Relay tests"},
                    upstream_model=upstream_model,
                ),
                RouteConfig(
                    model=f"basic{suffix}", base_url=with_password, upstream_model=upstream_model
                ),
            ]
        settings = Settings(database_url=f"sqlite:///{database}", routes=routes)
        with relay_server(settings) as url, checked_client(url) as client:
            yield client, upstream


@pytest.mark.parametrize("model", ["bearer", "basic"])
def test_an_upstream_echo_before_the_stream_leaks_nothing(
    leaky: tuple[httpx.Client, ChatUpstream], model: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, upstream = leaky
    caplog.set_level(logging.DEBUG)
    for stream in (False, True):
        answer = client.post(
            "/v1/responses", json={"model": model, "input": "hi", "stream": stream}
        )
        assert answer.status_code == 400
        message = answer.json()["error"]["message"]
        assert "Invalid request; you sent" in message  # the useful part is kept
        assert_no_credential(answer.text)
    # The upstream did receive the credentials: what it echoed held them.
    sent = upstream.headers[-1]["authorization"]
    assert sent in (f"Bearer {KEY}", f"Basic {BASIC}")
    assert_logged_without_credentials(caplog, "failed before the first byte")


@pytest.mark.parametrize("model", ["bearer-mid", "basic-mid"])
def test_an_upstream_echo_mid_stream_leaks_nothing(
    leaky: tuple[httpx.Client, ChatUpstream], model: str, caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = leaky
    caplog.set_level(logging.DEBUG)
    events = sse_events(client, {"model": model, "input": "hi"})
    failed = events[-1]["response"]
    assert failed["status"] == "failed"
    assert "Invalid request; you sent" in failed["error"]["message"]
    stored = client.get(f"/v1/responses/{failed['id']}")
    folded = client.post("/v1/responses", json={"model": model, "input": "hi"})
    assert folded.json()["status"] == "failed"
    for text in (str(events), stored.text, folded.text):
        assert_no_credential(text)
    assert_logged_without_credentials(caplog, "mid-stream")
