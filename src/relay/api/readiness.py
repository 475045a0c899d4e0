"""`GET /readyz`: whether this instance can serve, for a load balancer or an orchestrator.

`/healthz` says the process lives; this asks what serving needs: the database answers, its
schema is at the revision this code migrates to (an instance started against a database that
a newer instance migrated, or never migrated, is not ready), Redis answers when rate limits
are shared through it, and the in-process models loaded at start-up have loaded. Each check
is bounded, so a database that hangs is reported
within CHECK_S rather than holding the probe; a failing part is named in the answer (its
reason for the log, never a credential: the drivers' messages name hosts, not passwords).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Protocol, cast

import orjson
from starlette.requests import Request
from starlette.responses import Response

from relay.models.deployments import LlamaCppConfig
from relay.providers.registry import Registry
from relay.storage.revision import current_revision, head_revision

log = logging.getLogger("relay.api")
CHECK_S = 2.0
_HEAD = head_revision()


async def readyz(request: Request) -> Response:
    state = request.app.state
    checks = {
        "database": _checked(state.store.db.glance(current_revision)),
        "redis": _checked(state.access.limiter.ping()),
    }
    outcomes = dict(zip(checks, await asyncio.gather(*checks.values()), strict=True))
    revision = outcomes["database"]
    results = {
        "database": "ok" if isinstance(revision, _Ok) else str(revision),
        "migrations": _migrations(revision),
        "redis": "ok" if isinstance(outcomes["redis"], _Ok) else str(outcomes["redis"]),
        **_models(state.engine.registry),
    }
    failing = [part for part, result in results.items() if result != "ok"]
    if failing:
        log.warning("not ready: %s", ", ".join(f"{part}: {results[part]}" for part in failing))
    return Response(
        orjson.dumps({"status": "not_ready" if failing else "ready", "checks": results}),
        status_code=503 if failing else 200,
        media_type="application/json",
    )


class _Ok:
    """A check that passed, with what it read."""

    def __init__(self, value: object) -> None:
        self.value = value


async def _checked(check: Awaitable[object]) -> _Ok | str:
    try:
        async with asyncio.timeout(CHECK_S):
            return _Ok(await check)
    except TimeoutError:
        return f"no answer within {CHECK_S:g} s"
    except Exception as error:  # any failure of the part is its answer
        return f"unavailable ({type(error).__name__})"


def _models(registry: Registry) -> dict[str, str]:
    """The in-process models loaded at start-up: "ok" once loaded (`model <route>`)."""
    return {
        f"model {deployment.route}": cast(Loading, deployment.provider).readiness()
        for deployment in registry.deployments()
        if isinstance(deployment.config, LlamaCppConfig) and deployment.config.load == "startup"
    }


class Loading(Protocol):
    def readiness(self) -> str: ...


def _migrations(revision: _Ok | str) -> str:
    if not isinstance(revision, _Ok):
        return "unknown (the database is unavailable)"
    if revision.value != _HEAD:
        return f"schema at {revision.value}, this code needs {_HEAD}"
    return "ok"
