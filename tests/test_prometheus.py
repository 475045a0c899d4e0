"""A real Prometheus (Debian's `prometheus`) scraping `relay serve --workers 2` on its
metrics_port, as deploy/prometheus.yml has it do: what it stores counts what was served, and
every query of the Grafana dashboard is one Prometheus evaluates, with data behind it.
Skipped, saying so, where Prometheus is not installed (`apt-get install prometheus`)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from live_server import free_port, relay_serve
from test_deploy import load_dashboard, panels

REQUESTS = 6
# Grafana's variables, as the dashboard's panels would have them for all instances.
VARIABLES = {"$instance": ".*", "$__rate_interval": "1m"}


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(Relay's URL, Prometheus' URL): Prometheus scraping Relay's metrics_port every 0.5 s."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("PROMETHEUS TESTS SKIPPED: no `prometheus` binary (apt-get install prometheus)")
    folder: Path = tmp_path_factory.mktemp("prometheus")
    metrics_port, web_port = free_port(), free_port()
    route = {"model": "fake-text", "provider": "fake", "upstream_model": "text"}
    env = {
        "RELAY_DATABASE_URL": f"sqlite:///{folder}/relay.db",
        "RELAY_ROUTES": orjson.dumps([route]).decode(),
        "RELAY_METRICS_PORT": str(metrics_port),
    }
    config = folder / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 500ms, evaluation_interval: 500ms}\n"
        "scrape_configs:\n"
        "  - job_name: relay\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    with relay_serve(env, "--workers", "2") as relay:
        server = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{web_port}"
        try:
            deadline = time.monotonic() + 30
            while not _ready(url):
                assert server.poll() is None and time.monotonic() < deadline, "no Prometheus"
                time.sleep(0.1)
            yield relay.url, url
        finally:
            server.terminate()
            server.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_prometheus_stores_what_relay_served_and_the_dashboard_queries_it(
    prometheus: tuple[str, str],
) -> None:
    relay, url = prometheus
    body = {"model": "fake-text", "input": "one two three"}
    for _ in range(REQUESTS):
        assert httpx.post(f"{relay}/v1/responses", json=body, timeout=30).status_code == 200
    served = 'sum(relay_http_requests_total{endpoint="/v1/responses",status="200"})'
    deadline = time.monotonic() + 20
    while True:  # flushed within a second, scraped every half second
        found = query(url, served)
        if found and float(found[0]["value"][1]) == REQUESTS:
            break
        assert time.monotonic() < deadline, found
        time.sleep(0.2)
    tokens = query(url, 'sum(relay_tokens_total{model="fake-text",type="input"})')
    assert float(tokens[0]["value"][1]) == REQUESTS * 3  # the fake counts words
    time.sleep(1.5)  # a few scrapes more, for the panels' rates
    empty = []
    for panel in panels(load_dashboard()):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            if not query(url, expr):
                empty.append(panel["title"])
    # Every query parses and evaluates; all have data but those about failures, of which
    # there were none, and about server-side tools, which these responses did not call.
    assert set(empty) <= {
        "Server errors",
        "Errors by code",
        "Refusals by reason",
        "Server-side tool calls",
        "Server-side tool call duration (p95)",
    }, empty
