"""`relay check`: what `relay serve` needs, tried without serving: the configuration, the
database, Redis and each upstream's models endpoint, one row each of a table on stdout. Exit 0
when nothing failed, 1 otherwise. No credential is printed: URLs lose their passwords and
upstream text is scrubbed as in any error."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import astuple, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from pydantic import SecretStr

from relay.config import RouteConfig, Settings, load_settings
from relay.console import report_config_error, without_password
from relay.errors import StartupError
from relay.models.deployments import DeploymentConfig
from relay.providers.base import ProviderError
from relay.providers.registry import build_provider

Status = Literal["ok", "warn", "error", "skipped"]


@dataclass(frozen=True)
class Row:
    component: str
    target: str
    status: Status
    detail: str


class _ListsModels(Protocol):
    """What the HTTP providers offer `relay check`."""

    async def list_models(self) -> Any: ...

    async def aclose(self) -> None: ...


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="relay check",
        description="Check the configuration, and reach the database, Redis and every upstream.",
    )
    parser.add_argument("--config", type=Path, help="TOML config file (env vars override it)")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds each check may take (default 5)"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ValueError as error:  # pydantic's ValidationError included
        report_config_error("relay check", error)
        return 1
    rows = [_config(settings, args.config), *asyncio.run(_reach(settings, args.timeout))]
    print(table(rows))
    return 0 if all(row.status != "error" for row in rows) else 1


def table(rows: list[Row]) -> str:
    lines = [("component", "target", "status", "detail"), *(astuple(row) for row in rows)]
    widths = [max(len(line[column]) for line in lines) for column in range(3)]
    return "\n".join(
        "  ".join(
            [*(cell.ljust(width) for cell, width in zip(line, widths, strict=False)), line[3]]
        )
        for line in lines
    )


def _config(settings: Settings, path: Path | None) -> Row:
    row = partial(Row, "config", str(path) if path else "defaults and RELAY_* variables")
    try:
        for key in [*settings.api_keys, *settings.admin_keys]:
            key.secret()
    except ValueError as error:
        return row("error", str(error))
    deployments = sum(len(route.deployments) for route in settings.routes)
    return row(
        "ok",
        f"{len(settings.routes)} routes, {deployments} deployments, "
        f"{len(settings.api_keys)} API keys, {len(settings.admin_keys)} admin keys",
    )


async def _reach(settings: Settings, wait_s: float) -> list[Row]:
    checks = [_database(settings.database_url, wait_s), _redis(settings.redis_url, wait_s)]
    checks += [
        _upstream(route, deployment, wait_s)
        for route in settings.routes
        for deployment in route.deployments
    ]
    return list(await asyncio.gather(*checks))


def _silent(wait_s: float) -> str:
    return f"no answer within {wait_s:g} s"


async def _database(url: str, wait_s: float) -> Row:
    # Imported here: a configuration error is reported without loading the storage layer.
    from relay.storage.database import schema_revision, sqlite_file
    from relay.storage.revision import head_revision

    row = partial(Row, "database", without_password(url))
    path = sqlite_file(url)
    if path is not None and not path.exists():
        return row("ok", "not created yet: relay serve creates it")
    try:
        revision = await asyncio.wait_for(schema_revision(url), wait_s)
    except StartupError as error:
        return row("error", str(error))
    except TimeoutError:
        return row("error", _silent(wait_s))
    head = head_revision()
    if revision == head:
        return row("ok", f"schema at revision {revision}")
    found = "no schema" if revision is None else f"schema at revision {revision}"
    return row("ok", f"{found}: relay serve migrates it to {head}")


async def _redis(url: SecretStr | None, wait_s: float) -> Row:
    if url is None:
        return Row("redis", "-", "skipped", "not configured: each process counts its own limits")
    from redis.asyncio import from_url
    from redis.exceptions import RedisError

    row = partial(Row, "redis", without_password(url.get_secret_value()))
    client = from_url(url.get_secret_value(), socket_timeout=wait_s)
    try:
        await asyncio.wait_for(client.ping(), wait_s)
    except TimeoutError:
        return row("error", _silent(wait_s))
    except (RedisError, OSError) as error:
        return row("error", str(error) or type(error).__name__)
    finally:
        await client.aclose()
    return row("ok", "answered PING")


async def _upstream(route: RouteConfig, deployment: DeploymentConfig, wait_s: float) -> Row:
    target = f"{route.model}/{deployment.label}"
    base_url: str | None = getattr(deployment, "base_url", None)
    if base_url is None:  # the embedded model, the fake provider
        return Row("upstream", target, "skipped", "in-process")
    row = partial(Row, "upstream", f"{target} {without_password(base_url)}")
    try:
        deployment.api_key()
    except ValueError as error:
        return row("error", str(error))
    # Its own client's timeouts bound the request; no retries.
    provider = cast(
        _ListsModels,
        build_provider(deployment.model_copy(update={"timeout_s": wait_s, "retries": 0})),
    )
    try:
        answer = await provider.list_models()
    except ProviderError as error:
        return row("error", error.message)
    finally:
        await provider.aclose()
    try:
        listed = {str(entry["id"]) for entry in answer["data"]}
    except (KeyError, TypeError):
        return row("warn", "its models list has no data[].id")
    model = deployment.upstream_model or route.model
    if model not in listed:
        # Not an error: some upstreams list only some of the names they serve (aliases).
        return row("warn", f"'{model}' is not among the {len(listed)} models it lists")
    return row("ok", f"'{model}' is among the {len(listed)} models it lists")
