"""Prometheus metrics from a real `relay serve --workers 2`, after a scripted mix of requests:
every counter and histogram checked against what was sent and answered, parsed with
prometheus_client's own parser, from the API port (an admin key) and from metrics_port (the
supervisor's sum of both workers)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from live_server import free_port, relay_serve
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from relay.errors import StartupError
from relay.observe.metrics import Metrics
from relay.observe.tally import Tallies

ADMIN, LIMITED, BROKE, PLAIN = "admin-key-m", "limited-key-m", "broke-key-m", "plain-key-m"
PRICE = {"input": 1.0, "output": 2.0}  # US dollars a million tokens
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("metrics")
    metrics_port = free_port()
    routes = [
        {
            "model": "priced",
            "provider": "fake",
            "name": "priced-1",
            "upstream_model": "text",
            "price": PRICE,
        },
        {"model": "breaks", "provider": "fake", "upstream_model": "error_after"},
        {
            "model": "unreachable",
            "base_url": f"http://127.0.0.1:{free_port()}/v1",
            "upstream_model": "m",
            "name": "nowhere",
            "retries": 0,
        },
    ]
    keys = [
        {"key_env": "M_PLAIN", "tenant": "p-plain"},
        {"key_env": "M_LIMITED", "tenant": "p-limited", "policy": {"rpm": 1}},
        {"key_env": "M_BROKE", "tenant": "p-broke", "policy": {"credit_usd": 0}},
    ]
    env = {
        "RELAY_DATABASE_URL": f"sqlite:///{folder}/relay.db",
        "RELAY_ROUTES": orjson.dumps(routes).decode(),
        "RELAY_API_KEYS": orjson.dumps(keys).decode(),
        "RELAY_ADMIN_KEYS": orjson.dumps([{"key_env": "M_ADMIN", "name": "ops"}]).decode(),
        "RELAY_METRICS_PORT": str(metrics_port),
        "RELAY_METRICS_LABELS": '["project"]',
        "RELAY_LOG_FORMAT": "json",
        "M_PLAIN": PLAIN,
        "M_LIMITED": LIMITED,
        "M_BROKE": BROKE,
        "M_ADMIN": ADMIN,
    }
    with relay_serve(env, "--workers", "2") as relay:
        yield relay, metrics_port


def test_the_metrics_count_what_was_served(served: Any) -> None:
    relay, metrics_port = served
    base = relay.url
    plain = {"authorization": f"Bearer {PLAIN}"}
    answers: list[dict[str, Any]] = []
    sent: list[str] = []  # the request ids, one per request

    def name(request: httpx.Request) -> None:
        sent.append(f"mix-{len(sent)}")
        request.headers["x-request-id"] = sent[-1]

    with httpx.Client(base_url=base, timeout=30, event_hooks={"request": [name]}) as http:
        # Completed (3), streamed (2), background (1): every one by the priced route.
        for _ in range(3):
            answer = http.post(
                "/v1/responses", headers=plain, json={"model": "priced", "input": "a b c"}
            )
            assert answer.status_code == 200
            answers.append(answer.json())
        for _ in range(2):
            with http.stream(
                "POST", "/v1/responses", headers=plain,
                json={"model": "priced", "input": "d e", "stream": True},
            ) as stream:  # fmt: skip
                for line in stream.iter_lines():
                    if line.startswith("data: {") and '"response.completed"' in line:
                        answers.append(orjson.loads(line[6:])["response"])
        queued = http.post(
            "/v1/responses", headers=plain,
            json={"model": "priced", "input": "f", "background": True},
        ).json()  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done = http.get(f"/v1/responses/{queued['id']}", headers=plain).json()
            if done["status"] == "completed":
                answers.append(done)
                break
            time.sleep(0.05)
        # A WebSocket with one turn.
        socket_url = base.replace("http://", "ws://") + "/v1/responses"
        sent.append("mix-socket")
        with connect(socket_url, additional_headers={**plain, "x-request-id": sent[-1]}) as socket:
            socket.send(orjson.dumps({"type": "response.create", "model": "priced", "input": "g"}))
            while True:
                event = orjson.loads(socket.recv(timeout=10))
                if event["type"] == "response.completed":
                    answers.append(event["response"])
                    break
        # A stream that fails after its first output; an upstream that cannot be reached.
        failed = http.post("/v1/responses", headers=plain, json={"model": "breaks", "input": "x"})
        assert failed.json()["status"] == "failed"
        unreachable = http.post(
            "/v1/responses", headers=plain, json={"model": "unreachable", "input": "x"}
        )
        assert unreachable.status_code == 502
        # A background run whose upstream cannot be reached: it fails before it starts.
        never = http.post(
            "/v1/responses", headers=plain,
            json={"model": "unreachable", "input": "x", "background": True},
        ).json()  # fmt: skip
        deadline = time.monotonic() + 10
        while http.get(f"/v1/responses/{never['id']}", headers=plain).json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # Refused: a rate limit (the second request in a minute), a used-up credit.
        limited = {"authorization": f"Bearer {LIMITED}"}
        for expected in (200, 429):
            answer = http.post(
                "/v1/responses", headers=limited, json={"model": "priced", "input": "h"}
            )
            assert answer.status_code == expected
        broke = http.post(
            "/v1/responses", headers={"authorization": f"Bearer {BROKE}"},
            json={"model": "priced", "input": "i"},
        )  # fmt: skip
        assert broke.status_code == 402
        assert http.get("/metrics").status_code == 401  # an admin key's
        time.sleep(1.5)  # the gauges are read every second
        from_api = http.get("/metrics", headers={"x-admin-key": ADMIN})
    assert from_api.status_code == 200
    assert from_api.headers["content-type"].startswith("text/plain")
    from_port = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert len(answers) == 7
    for samples in (scrape(from_api.text), scrape(from_port)):
        check(samples, answers)
    check_log(relay, sent, {queued["id"]: "completed", never["id"]: "failed"})


def check_log(relay: Any, sent: list[str], background: dict[str, str]) -> None:
    """log_format = "json": every line an object; one access line per request, refused ones
    included, naming its request id; and a line of its own for each background response,
    however it ended."""
    time.sleep(0.3)  # info lines are written out every 0.1 s
    lines = [orjson.loads(line) for line in relay.log_so_far().splitlines()]
    access = [line for line in lines if line["logger"] == "relay.access"]
    for request_id in sent:
        [line] = [line for line in access if line["request_id"] == request_id]
        assert line["status"] in (101, 200, 401, 402, 429, 502), line
        assert line["latency_ms"] > 0
    refused = {line["status"]: line for line in access if line["status"] in (402, 429)}
    assert refused[429]["error_code"] == "rate_limit_exceeded"
    assert refused[402]["project"] == "p-broke" and refused[402]["key_id"]
    served = [line for line in access if line.get("response_status") == "completed"]
    assert all(line["model"] == "priced" and line["deployment"] == "priced-1" for line in served)
    assert all(line["cost_usd"] > 0 and line["input_tokens"] > 0 for line in served)
    for response_id, status in background.items():
        [line] = [line for line in lines if line.get("response_id") == response_id]
        assert line["logger"] == "relay.engine" and line["project"] == "p-plain"
        assert line["response_status"] == status


def check(samples: Samples, answers: list[dict[str, Any]]) -> None:
    priced = {"model": "priced", "deployment": "priced-1"}
    gen_ai = {"gen_ai_request_model": "priced", "deployment": "priced-1"}
    requests = "relay_http_requests_total"
    # HTTP: every POST by its status; the WebSocket's upgrade (101); the refusals' codes.
    assert value(samples, requests, endpoint="/v1/responses", method="POST", status="200") == 9
    assert value(samples, requests, endpoint="/v1/responses", method="GET", status="101") == 1
    assert value(samples, requests, status="429", error_code="rate_limit_exceeded") == 1
    assert value(samples, requests, status="402", error_code="insufficient_quota") == 1
    assert value(samples, requests, status="502") == 1
    # The stream that failed after its first output: a 200, and the failure its response tells.
    assert value(samples, requests, status="200", error_code="server_error") == 1
    assert value(samples, "relay_refusals_total", reason="rate_limit_exceeded") == 1
    assert value(samples, "relay_refusals_total", reason="insufficient_quota") == 1
    assert (
        value(samples, "relay_http_request_duration_seconds_count", endpoint="/v1/responses") == 13
    )
    # Responses: the seven completed on the priced route (the limited key's one among them
    # makes eight), the failed one, and the one the unreachable upstream never began (the
    # background one, which has a response: no deployment answered it).
    assert value(samples, "relay_responses_total", status="completed", **priced) == 8
    unserved = {"model": "unreachable", "deployment": "", "status": "failed"}
    assert value(samples, "relay_responses_total", **unserved) == 1
    assert value(samples, "relay_responses_total", model="breaks", status="failed") == 1
    assert value(samples, "relay_upstream_attempts_total", deployment="nowhere") == 2
    assert value(samples, "relay_upstream_attempts_total", deployment="nowhere", outcome="ok") == 0
    assert value(samples, "relay_upstream_attempts_total", deployment="priced-1", outcome="ok") == 8
    # Tokens and cost, by project (metrics_labels = ["project"]): what the answers reported.
    input_tokens = sum(answer["usage"]["input_tokens"] for answer in answers)
    output_tokens = sum(answer["usage"]["output_tokens"] for answer in answers)
    mine = {**priced, "project": "p-plain"}
    assert value(samples, "relay_tokens_total", type="input", **mine) == input_tokens
    assert value(samples, "relay_tokens_total", type="output", **mine) == output_tokens
    cost = (input_tokens * PRICE["input"] + output_tokens * PRICE["output"]) / 1e6
    assert value(samples, "relay_cost_usd_total", **mine) == pytest.approx(cost)
    usage = "gen_ai_client_token_usage"
    assert value(samples, f"{usage}_count", gen_ai_token_type="input", **gen_ai) == 8
    assert value(samples, f"{usage}_sum", gen_ai_token_type="output", **gen_ai) == (
        output_tokens + value(samples, "relay_tokens_total", type="output", project="p-limited")
    )
    # Latency histograms: one observation per response; each within its bounds.
    for name in (
        "gen_ai_server_request_duration_seconds",
        "gen_ai_server_time_to_first_token_seconds",
        "gen_ai_client_operation_duration_seconds",
    ):
        assert value(samples, f"{name}_count", **gen_ai) == 8, name
        assert 0 < value(samples, f"{name}_sum", **gen_ai) < 8 * 10, name
        assert value(samples, f"{name}_bucket", le="+Inf", **gen_ai) == 8, name
    first = value(samples, "gen_ai_server_time_to_first_token_seconds_sum", **gen_ai)
    total = value(samples, "gen_ai_server_request_duration_seconds_sum", **gen_ai)
    assert first <= total
    # Gauges: nothing in flight now; the cooling state of the deployment that failed once
    # (three failures in a row make it cool).
    assert value(samples, "relay_active_streams") == 0
    assert value(samples, "relay_active_websockets") == 0
    assert value(samples, "relay_background_runs", state="running") == 0
    assert value(samples, "relay_deployment_cooling", deployment="nowhere") == 0


def test_a_tally_counts_as_prometheus_client_does() -> None:
    """Observations added up in a tally and flushed land in the buckets, sum and count that
    prometheus_client's own observe gives them (bounds included: `le` is "at most")."""
    registry = CollectorRegistry()
    direct = Histogram("direct", "d", buckets=(0.1, 1.0, 10.0), registry=registry)
    tallied = Histogram("tallied", "t", buckets=(0.1, 1.0, 10.0), registry=registry)
    counted = Counter("counted", "c", registry=registry)
    tallies = Tallies()
    histogram, counter = tallies.histogram(tallied), tallies.counter(counted)
    values = [0.0, 0.1, 0.5, 1.0, 3.0, 10.0, 11.0, 1e9]
    for number in values:
        direct.observe(number)
        histogram.observe(number)
        counter.inc(number)
    assert registry.get_sample_value("tallied_sum") == 0  # until flushed
    tallies.flush()
    tallies.flush()  # nothing twice
    for bound in ("0.1", "1.0", "10.0", "+Inf"):
        expected = registry.get_sample_value("direct_bucket", {"le": bound})
        assert registry.get_sample_value("tallied_bucket", {"le": bound}) == expected
    assert registry.get_sample_value("tallied_sum") == pytest.approx(sum(values))
    assert registry.get_sample_value("counted_total") == pytest.approx(sum(values))


def test_a_metrics_port_in_use_is_one_clear_start_up_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            Metrics().serve("127.0.0.1", port)
