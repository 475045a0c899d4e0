"""Routing among a model's deployments: weights, the request's `provider` preferences,
retries with backoff and retry-after, cooldown of a failing deployment, and which deployment
answered (the x-relay-deployment header), against a real relay on loopback."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from chat_upstream import UPSTREAM_KEY, ChatUpstream
from pydantic import ValidationError
from relay_fixtures import checked_client, logged_responses, relay_on_sqlite

from relay.config import RouteConfig, load_settings
from relay.providers.health import Health

KEY_ENV = "RELAY_TEST_ROUTING_KEY"
DEPLOYMENT = "x-relay-deployment"


def fake(name: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "provider": "fake", "upstream_model": "text", **more}


def chat(upstream: ChatUpstream, name: str, script: str, **more: Any) -> dict[str, Any]:
    return upstream.deployment(name, script, KEY_ENV, **more)


def routes(upstream: ChatUpstream) -> list[RouteConfig]:
    price = {"cheap": (0.1, 0.2), "mid": (1.0, 2.0), "dear": (5.0, 15.0)}

    def priced(name: str) -> dict[str, Any]:
        prompt, completion = price[name]
        return fake(name, price={"input": prompt, "output": completion})

    spec: list[dict[str, Any]] = [
        {"model": "weighted", "deployments": [fake("big", weight=3), fake("small", weight=1)]},
        {"model": "priced", "deployments": [priced("dear"), priced("cheap"), priced("mid")]},
        {
            "model": "attributes",
            "deployments": [
                fake("plain"),
                fake("private", data_collection="deny", zdr=True, quantization="fp8"),
            ],
        },
        {
            # The first choice fails before the first byte (a 503, retried once): the
            # second answers.
            "model": "failover",
            "deployments": [
                chat(upstream, "broken", "http_503", weight=1000, retries=1, retry_backoff_s=0.01),
                fake("spare", weight=0.001),
            ],
        },
        {
            "model": "strict",
            "deployments": [
                chat(upstream, "fragile", "http_503", weight=1000, retries=0),
                fake("backup", weight=0.001),
            ],
        },
        {
            # A deployment that times out: cooled down after 2 failures.
            "model": "cooling",
            "deployments": [
                chat(upstream, "sluggish", "slow_headers", weight=1000, timeout_s=0.4, retries=0),
                fake("steady", weight=0.001),
            ],
        },
        {
            "model": "retry-after",
            "deployments": [chat(upstream, "polite", "retry_after_once", retry_max_wait_s=2)],
        },
        {
            "model": "retry-after-long",
            "deployments": [
                chat(upstream, "impatient", "http_429", retry_max_wait_s=2, weight=1000),
                fake("other", weight=0.001),
            ],
        },
        {
            "model": "backoff",
            "deployments": [chat(upstream, "down", "http_503", retries=2, retry_backoff_s=0.05)],
        },
        {
            "model": "bad-key",
            "deployments": [
                chat(upstream, "locked", "http_401", weight=1000),
                fake("open", weight=0.001),
            ],
        },
        {
            "model": "openrouter",
            "deployments": [chat(upstream, "aggregator", "echo", forward_fields=["provider"])],
        },
        {
            "model": "kinds",
            "deployments": [chat(upstream, "echoing", "echo"), fake("scripted")],
        },
        {
            # A chat upstream that answers after a second: its throughput is measured (a
            # stream over in under 5 ms is not, whichever deployment it is), and low.
            "model": "speeds",
            "deployments": [chat(upstream, "waiting", "slow_headers"), fake("instant")],
        },
    ]
    return [RouteConfig.model_validate(route) for route in spec]


@pytest.fixture(scope="module")
def routing_upstream() -> Iterator[ChatUpstream]:
    with ChatUpstream(api_key=UPSTREAM_KEY) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def routing_url(
    routing_upstream: ChatUpstream,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Iterator[str]:
    monkeypatch_module.setenv(KEY_ENV, UPSTREAM_KEY)
    with relay_on_sqlite(
        tmp_path_factory, "routing", routes(routing_upstream), cooldown_failures=2, cooldown_s=60
    ) as url:
        yield url


@pytest.fixture
def client(routing_url: str) -> Iterator[httpx.Client]:
    with checked_client(routing_url) as session:
        yield session


def ask(client: httpx.Client, model: str, **body: Any) -> httpx.Response:
    return client.post(
        "/v1/responses", json={"model": model, "input": "hello there", "store": False, **body}
    )


def answered_by(client: httpx.Client, model: str, **body: Any) -> str:
    answer = ask(client, model, **body)
    assert answer.status_code == 200, answer.text
    return answer.headers[DEPLOYMENT]


def test_weights_are_honoured_over_a_thousand_requests(client: httpx.Client) -> None:
    counts = collections.Counter(answered_by(client, "weighted") for _ in range(1000))
    # 3:1 -> 750 expected; 5 standard deviations (sqrt(1000 * 0.75 * 0.25) = 13.7) either side.
    assert 680 <= counts["big"] <= 820, counts
    assert counts["big"] + counts["small"] == 1000


def test_only_ignore_and_order(client: httpx.Client) -> None:
    for _ in range(20):
        assert answered_by(client, "weighted", provider={"only": ["small"]}) == "small"
        assert answered_by(client, "weighted", provider={"ignore": ["big"]}) == "small"
        assert answered_by(client, "weighted", provider={"order": ["small", "big"]}) == "small"
    # The provider kind names every deployment of that kind.
    assert answered_by(client, "kinds", provider={"only": ["openai_chat"]}) == "echoing"
    assert answered_by(client, "kinds", provider={"ignore": ["openai_chat"]}) == "scripted"


def test_preferences_go_verbatim_to_a_deployment_that_forwards_them(
    client: httpx.Client, routing_upstream: ChatUpstream
) -> None:
    prefs = {"only": ["groq"], "sort": "throughput", "quantizations": ["fp8"]}
    assert answered_by(client, "openrouter", provider=prefs) == "aggregator"
    assert routing_upstream.last["provider"] == prefs


def test_sort_by_price_and_max_price(client: httpx.Client) -> None:
    assert answered_by(client, "priced", provider={"sort": "price"}) == "cheap"
    assert answered_by(client, "priced", provider={"sort": {"by": "price"}}) == "cheap"
    bound = {"max_price": {"prompt": 2, "completion": 3}, "order": ["dear", "mid"]}
    assert answered_by(client, "priced", provider=bound) == "mid"
    none_left = ask(client, "priced", provider={"max_price": {"prompt": 0.01}})
    assert none_left.status_code == 400
    assert none_left.json()["error"]["param"] == "provider.max_price"


def test_sort_by_latency_prefers_the_faster_deployment(client: httpx.Client) -> None:
    # Both deployments measured: the fake answers in microseconds, the chat upstream over
    # HTTP in a millisecond or more.
    for _ in range(5):
        answered_by(client, "kinds", provider={"order": ["echoing"]})
        answered_by(client, "kinds", provider={"order": ["scripted"]})
    assert answered_by(client, "kinds", provider={"sort": "latency"}) == "scripted"


def test_attribute_filters(client: httpx.Client) -> None:
    for prefs in (
        {"data_collection": "deny"},
        {"zdr": True},
        {"quantizations": ["fp8", "int4"]},
    ):
        assert answered_by(client, "attributes", provider=prefs) == "private"


def test_allow_fallbacks_false_keeps_to_the_order(client: httpx.Client) -> None:
    answer = ask(client, "strict", provider={"order": ["fragile"], "allow_fallbacks": False})
    assert answer.status_code == 503
    assert answered_by(client, "strict", provider={"order": ["fragile"]}) == "backup"


@pytest.mark.parametrize(
    ("prefs", "param"),
    [
        ({"colour": "blue"}, "provider.colour"),
        ({"sort": "cheapest"}, "provider.sort"),
        ({"only": ["nowhere"]}, "provider.only"),
        ({"ignore": ["big", "small"]}, "provider.ignore"),
        ({"enforce_distillable_text": True}, "provider.enforce_distillable_text"),
        ({"max_price": {"prompt": -1}}, "provider.max_price.prompt"),
    ],
)
def test_preferences_refused_with_the_field_named(
    client: httpx.Client, prefs: dict[str, Any], param: str
) -> None:
    answer = ask(client, "weighted", provider=prefs)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_failover_to_the_next_deployment_after_retries(
    client: httpx.Client, routing_upstream: ChatUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    routing_upstream.reset()
    with caplog.at_level(logging.INFO, logger="relay"):
        assert answered_by(client, "failover", provider={"order": ["broken"]}) == "spare"
    # One try and one retry on the broken deployment, then the spare.
    assert [body["model"] for body in routing_upstream.requests] == ["http_503", "http_503"]
    [line] = logged_responses(caplog.records)
    assert line["deployment"] == "spare" and line["response_status"] == "completed"


def test_backoff_between_retries(client: httpx.Client, routing_upstream: ChatUpstream) -> None:
    routing_upstream.reset()
    started = time.monotonic()
    answer = ask(client, "backoff")
    elapsed = time.monotonic() - started
    assert answer.status_code == 503
    assert len(routing_upstream.requests) == 3  # the first try and two retries
    # Backoff 0.05 s then 0.1 s, each jittered over its upper half: at least 0.075 s.
    assert elapsed >= 0.075


def test_retry_after_is_honoured(client: httpx.Client, routing_upstream: ChatUpstream) -> None:
    routing_upstream.reset()
    started = time.monotonic()
    answer = ask(client, "retry-after", input="please wait for me")
    elapsed = time.monotonic() - started
    assert answer.status_code == 200, answer.text
    assert answer.json()["output_text"] == "please wait for me"
    assert len(routing_upstream.requests) == 2
    assert elapsed >= 1.0  # the upstream said Retry-After: 1


def test_a_retry_after_longer_than_the_deployment_allows_moves_on(
    client: httpx.Client, routing_upstream: ChatUpstream
) -> None:
    routing_upstream.reset()
    started = time.monotonic()
    assert answered_by(client, "retry-after-long", provider={"order": ["impatient"]}) == "other"
    assert time.monotonic() - started < 2  # did not wait the 7 s asked for
    assert len(routing_upstream.requests) == 1


def test_a_failing_deployment_is_cooled_down(client: httpx.Client) -> None:
    """The sluggish deployment times out (0.4 s); after cooldown_failures (2) requests pay
    that timeout, the rest go straight to the steady one."""
    timings = []
    for _ in range(6):
        started = time.monotonic()
        assert answered_by(client, "cooling") == "steady"
        timings.append(time.monotonic() - started)
    assert all(timing >= 0.4 for timing in timings[:2]), timings
    assert all(timing < 0.2 for timing in timings[2:]), timings


def test_the_example_config_is_valid() -> None:
    settings = load_settings(Path(__file__).resolve().parent.parent / "relay.example.toml")
    smart = next(route for route in settings.routes if route.model == "smart")
    assert [d.label for d in smart.deployments] == ["claude", "openai"]
    assert {d.provider for d in smart.deployments} == {"anthropic", "openai_responses"}


@pytest.mark.parametrize(
    ("route", "complaint"),
    [
        # Each provider kind's config is validated on its own: a field of another kind is a
        # typo, not a default.
        (
            {
                "model": "m",
                "provider": "openai_chat",
                "base_url": "http://x/v1",
                "thinking_budgets": {},
            },
            "thinking_budgets",
        ),
        ({"model": "m", "provider": "anthropic", "count_tokens": "vllm"}, "count_tokens"),
        ({"model": "m", "provider": "openai_responses"}, "base_url"),
        ({"model": "m", "provider": "bedrock"}, "bedrock"),
        ({"model": "m", "deployments": [fake("a"), fake("a")]}, "distinct names"),
        ({"model": "m", "deployments": []}, "at least 1"),
        ({"model": "m", "deployments": [fake("bad name")]}, "pattern"),
    ],
)
def test_route_configs_are_checked(route: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValidationError, match=complaint):
        RouteConfig.model_validate(route)


def test_health_cools_down_then_lets_one_probe_through() -> None:
    health = Health(cooldown_failures=2, cooldown_s=0.05)
    health.failed()
    assert health.usable()
    health.failed()
    assert health.cooling()
    time.sleep(0.06)
    assert health.usable()
    health.attempt()  # the probe: the others keep away until it settles
    assert health.cooling()
    health.failed()  # a failed probe cools it down again at once
    assert health.cooling()
    time.sleep(0.06)
    health.attempt()
    health.succeeded(0.01)
    assert health.usable() and health.failures == 0
    assert health.latency_s == 0.01


def test_an_order_that_names_nothing_without_fallbacks_is_refused(client: httpx.Client) -> None:
    answer = ask(client, "weighted", provider={"order": ["nowhere"], "allow_fallbacks": False})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "provider.order"


def test_a_deployment_whose_key_is_refused_gives_way(
    client: httpx.Client, routing_upstream: ChatUpstream
) -> None:
    routing_upstream.reset()
    assert answered_by(client, "bad-key", provider={"order": ["locked"]}) == "open"
    assert len(routing_upstream.requests) == 1  # an auth failure is not retried


def test_sort_by_throughput_uses_what_was_measured(client: httpx.Client) -> None:
    answered_by(client, "speeds", provider={"order": ["waiting"]})
    answered_by(client, "speeds", provider={"order": ["instant"]})
    # The fake yields its words at once; the chat upstream's come a second late.
    assert answered_by(client, "speeds", provider={"sort": "throughput"}) == "instant"
