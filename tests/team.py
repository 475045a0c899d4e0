"""A Relay run for a team, for tests: an admin key, a key in the config file, fake routes
(one of them priced), and a small client for the admin API."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from live_server import relay_server
from pydantic import SecretStr
from relay_fixtures import checked_client, fake_routes

from relay.config import AdminKeyConfig, ApiKeyConfig, RouteConfig, Settings
from relay.models.policy import Price

ADMIN_KEY = "adm-" + secrets.token_urlsafe(24)
CONFIG_KEY = "sk-config-" + secrets.token_urlsafe(24)
CONFIG_TENANT = "legacy"
# $1,000 per million input tokens and $2,000 per million output tokens: a fake answer of a
# few tokens costs a few cents, so budgets in cents are crossed in a few requests.
PRICE = Price(input=1000, output=2000)


def clear_of_a_minute_end(margin_s: float = 10.0) -> None:
    """Wait for the next minute when this one ends within `margin_s`: a sliding window (rate
    limits, failed console sign-ins) weighs the previous minute's count, so exact counts taken
    across a minute's end would see one more allowed."""
    into_minute = time.time() % 60
    if into_minute > 60 - margin_s:
        time.sleep(60.5 - into_minute)


def team_routes() -> list[RouteConfig]:
    routes = fake_routes()
    routes.append(RouteConfig(model="priced", provider="fake", upstream_model="text", price=PRICE))
    for script in ("slow", "unmetered"):
        routes.append(
            RouteConfig(
                model=f"priced-{script}", provider="fake", upstream_model=script, price=PRICE
            )
        )
    # Two deployments at two prices: usage and cost are each deployment's own.
    deployments = [
        {"name": "dear", "provider": "fake", "upstream_model": "text", "price": PRICE},
        {"name": "cheap", "provider": "fake", "upstream_model": "text"},
    ]
    routes.append(RouteConfig.model_validate({"model": "priced-pair", "deployments": deployments}))
    return routes


def team_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "routes": team_routes(),
        "admin_keys": [AdminKeyConfig(key=SecretStr(ADMIN_KEY), name="ops")],
        "api_keys": [ApiKeyConfig(key=SecretStr(CONFIG_KEY), tenant=CONFIG_TENANT)],
        "key_cache_s": 0.2,
        **overrides,
    }
    return Settings(**values)


class AdminClient:
    """The admin API, as a test drives it; every call must succeed."""

    def __init__(self, base_url: str) -> None:
        self.http = checked_client(base_url)
        self.http.headers["x-admin-key"] = ADMIN_KEY

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        answer = self.http.request(method, f"/admin/v1{path}", json=body, params=params)
        assert answer.status_code in (200, 201), answer.text
        return answer.json()

    def project(self, name: str = "team", policy: dict[str, Any] | None = None) -> str:
        body = {"name": name, "policy": policy or {}}
        project_id: str = self.call("POST", "/projects", body)["id"]
        return project_id

    def key(self, project: str, **fields: Any) -> tuple[str, str]:
        """A new key of `project`: (id, value)."""
        created = self.call("POST", "/keys", {"project_id": project, **fields})
        return created["id"], created["value"]

    def revoke(self, key_id: str) -> None:
        self.call("DELETE", f"/keys/{key_id}")

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def client(base_url: str, key: str, project: str | None = None) -> httpx.Client:
    http = checked_client(base_url)
    http.headers["authorization"] = f"Bearer {key}"
    if project is not None:
        http.headers["x-project-id"] = project
    return http


@contextmanager
def team_relay(database_url: str, **overrides: Any) -> Iterator[str]:
    with relay_server(team_settings(database_url, **overrides)) as url:
        yield url


def ask(http: httpx.Client, model: str = "fake-text", **extra: object) -> httpx.Response:
    return http.post("/v1/responses", json={"model": model, "input": "hello", **extra})


@pytest.fixture(scope="module")
def team_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Relay for a team (team_settings) on its own SQLite file, per test module."""
    database = tmp_path_factory.mktemp("team") / "relay.db"
    with team_relay(f"sqlite:///{database}") as base_url:
        yield base_url


@pytest.fixture
def admin(team_url: str) -> Iterator[AdminClient]:
    with AdminClient(team_url) as admin_client:
        yield admin_client
