"""The compose file, Prometheus's configuration and the Grafana dashboard agree with each other
and with the metrics Relay exports: a dashboard query that names a metric Relay does not have
draws an empty panel, and nothing else would say so."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml  # installed with uvicorn[standard]

from relay.observe.metrics import OPTIONAL_LABELS, Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def exported() -> dict[str, str]:
    """Each metric Relay exports, as Prometheus names it (counters with their _total), and its
    type: read off the application's own registry, so that the dashboard follows the code."""
    families = Metrics(OPTIONAL_LABELS).registry.collect()
    return {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for family in families
    }


EXPORTED = exported()
# Series Prometheus makes itself for every target.
PROMETHEUS = {"up"}
KNOWN = (
    {name for name, kind in EXPORTED.items() if kind != "histogram"}
    | PROMETHEUS
    | {
        name + suffix
        for name, kind in EXPORTED.items()
        if kind == "histogram"
        for suffix in ("_bucket", "_sum", "_count")
    }
)

# What in PromQL is a name but not a metric's.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left of its identifiers once
    label matchers, range selectors, grouping clauses, strings and function calls are gone."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, regexes
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges ([5m], [$__rate_interval])
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"
    expr = re.sub(grouping, "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        name, rest = match.group(), expr[match.end() :]
        if re.match(r"\s*\(", rest) or name in KEYWORDS:
            continue  # a function or an aggregation
        if match.start() > 0 and expr[match.start() - 1] in "$0123456789.":
            continue  # a Grafana variable, a number (1e3) or a duration
        names.add(name)
    return names


def test_the_extraction_finds_metrics_and_only_metrics() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, gen_ai_request_model) (rate("
        'gen_ai_server_request_duration_seconds_bucket{instance=~"$instance", a="b c"}'
        "[$__rate_interval]))) / sum without (x) (relay_x_total offset 5m) * 3600 "
        "or on(instance) vector(0)"
    )
    assert metric_names(expr) == {"gen_ai_server_request_duration_seconds_bucket", "relay_x_total"}


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads((DEPLOY / "grafana/dashboards/relay.json").read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row's
    return found


def datasource_uid() -> str:
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    uid: str = source["uid"]
    return uid


def test_every_dashboard_query_names_only_metrics_relay_exports() -> None:
    dashboard = load_dashboard()
    unknown: dict[str, set[str]] = {}
    used: set[str] = set()
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            names = metric_names(target["expr"])
            assert names, f"panel {panel['title']!r}: no metric in {target['expr']!r}"
            used |= names
            if names - KNOWN:
                unknown[panel["title"]] = names - KNOWN
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"]
        selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
        assert selector, query
        used |= metric_names(selector.group(1))
        if metric_names(selector.group(1)) - KNOWN:
            unknown[f"variable {variable['name']}"] = metric_names(selector.group(1)) - KNOWN
    assert not unknown, f"metrics Relay does not export: {unknown}"
    # Every metric has a panel.
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    assert shown >= set(EXPORTED), set(EXPORTED) - shown


def test_the_dashboard_is_grafana_json_on_the_provisioned_datasource() -> None:
    dashboard = load_dashboard()
    uid = datasource_uid()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"] == "Relay"
    assert dashboard["id"] is None  # provisioned: Grafana assigns it
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid


def test_compose_runs_relay_on_postgres_and_redis_with_metrics_scraped() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    relays = {name: service for name, service in services.items() if name.startswith("relay")}
    assert len(relays) == 3
    for name, service in relays.items():
        environment = service["environment"]
        assert environment["RELAY_DATABASE_URL"].startswith("postgresql+asyncpg://"), name
        assert environment["RELAY_REDIS_URL"] == "redis://redis:6379/0", name
        assert environment["RELAY_METRICS_HOST"] == "0.0.0.0", name
        for keys in ("RELAY_API_KEYS", "RELAY_ADMIN_KEYS"):
            for key in json.loads(environment[keys]):
                assert key["key_env"] in environment, (name, key)
    # The API instances leave background runs to the worker.
    assert relays["relay-worker"]["command"] == ["worker"]
    assert "RELAY_BACKGROUND_WORKER" not in relays["relay-worker"]["environment"]
    for name in ("relay-1", "relay-2"):
        assert relays[name]["environment"]["RELAY_BACKGROUND_WORKER"] == "false"

    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    (static,) = job["static_configs"]
    assert job["job_name"] == "relay"  # the dashboard's up{job="relay"}
    assert sorted(static["targets"]) == sorted(
        f"{name}:{service['environment']['RELAY_METRICS_PORT']}" for name, service in relays.items()
    )

    grafana = services["grafana"]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in grafana["volumes"]}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/relay.yml").read_text())
    (dashboards,) = provider["providers"]
    assert (ROOT / mounts[dashboards["options"]["path"]] / "relay.json").is_file()
    assert (ROOT / mounts["/etc/grafana/provisioning"]).resolve() == DEPLOY / "grafana/provisioning"
    assert (ROOT / services["prometheus"]["volumes"][0].split(":")[0]).resolve() == (
        DEPLOY / "prometheus.yml"
    )
