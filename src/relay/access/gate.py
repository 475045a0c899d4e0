"""The one way in: `Access.principal` turns a request's credentials into a Principal (the
project it acts for, its key, its limits), `Access.admin` does the same for the admin plane,
and `Access.admit` applies a key's model list, budgets and rate limits before a response
starts. `Accounting.settle` closes the books when the response is settled (every outcome).

Client keys and admin keys are disjoint by construction: the data plane reads only
`Authorization: Bearer` against client keys, the admin plane only `X-Admin-Key` against admin
keys.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

from relay.access.idempotency import Idempotency
from relay.access.keys import CONFIG_PROJECT, KeyRecord, KeyStore, digest
from relay.access.limits import Admission, RateLimiter, Scope
from relay.access.usage import Ledger, UsageRow, periods
from relay.config import Settings
from relay.errors import AuthenticationError, PermissionDenied, RelayError
from relay.loopback import is_loopback
from relay.models.policy import NO_POLICY, Served, Settle
from relay.observe.metrics import Metrics
from relay.protocol import CreateResponse
from relay.storage.database import Database

OPEN_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a data-plane request acts for: a project (the tenant owning every row it touches),
    through a key, within limits (`scopes`: the key's and the project's, where set)."""

    project: str
    key: KeyRecord
    scopes: tuple[Scope, ...] = ()

    @property
    def key_id(self) -> str | None:
        return self.key.key_id or None


OPEN_PRINCIPAL = Principal(
    OPEN_TENANT, KeyRecord("", OPEN_TENANT, frozenset([OPEN_TENANT]), None, NO_POLICY)
)


@dataclass(frozen=True, slots=True)
class Credentials:
    """The config file's client and admin keys, as digests."""

    client_keys: dict[str, KeyRecord]
    admin_keys: dict[str, str]  # digest -> name

    @classmethod
    def of(cls, settings: Settings) -> Credentials:
        clients = {}
        for config in settings.api_keys:
            key_digest = digest(config.secret())
            clients[key_digest] = KeyRecord(
                # Names the key in usage without revealing it: its digest's first digits.
                key_id=f"cfg_{key_digest[:12]}",
                project=config.tenant,
                projects=frozenset([config.tenant, *config.projects]),
                models=None if config.models is None else frozenset(config.models),
                policy=config.policy,
            )
        admins = {digest(key.secret()): key.name for key in settings.admin_keys}
        return cls(clients, admins)


@dataclass(slots=True)
class Accounting:
    """One admitted response's books: settled once, when it ends (or abandoned when it never
    started)."""

    access: Access
    principal: Principal
    model: str
    admission: Admission | None
    started: float = field(default_factory=time.monotonic)
    done: bool = False

    @property
    def headers(self) -> dict[str, str]:
        return self.admission.headers if self.admission is not None else {}

    def settle(
        self, response: dict[str, Any], served: Served | None = None
    ) -> Awaitable[None] | None:
        """Called by the run once its outcome is final, with the deployment that answered
        (None: nothing was generated). Under a budget near its cap: the write of its spend,
        which the run awaits before its terminal event, so that the client's next request,
        on whichever instance, is admitted against it (far from the cap, the spend is batched:
        relay.access.spend_view states the bound)."""
        if self.done:
            return None
        self.done = True
        usage = response.get("usage") or {}
        input_tokens = int(usage.get("input_tokens") or 0)
        output_tokens = int(usage.get("output_tokens") or 0)
        cached = int((usage.get("input_tokens_details") or {}).get("cached_tokens") or 0)
        route = str(response.get("model") or self.model)
        price = served.price if served is not None else None
        now = time.time()
        written = self.access.ledger.add(
            UsageRow(
                created_at=int(now),
                day=periods(now)[0].removeprefix("day:"),
                project_id=self.principal.project,
                key_id=self.principal.key_id,
                model=self.model,
                route=route,
                deployment=served.deployment if served is not None else None,
                response_id=str(response.get("id", "")),
                status=str(response.get("status", "")),
                input_tokens=input_tokens,
                cached_tokens=cached,
                output_tokens=output_tokens,
                cost_nanos=(
                    0 if price is None else price.cost_nanos(input_tokens, cached, output_tokens)
                )
                + (served.tools_nanos if served is not None else 0),
                latency_ms=round((time.monotonic() - self.started) * 1000),
                estimated=served is not None and served.estimated,
            ),
            now=self.access.ledger.near(self.principal.scopes),
        )
        if self.admission is not None:
            self._free(self.admission, input_tokens + output_tokens)
        return written

    def abandon(self) -> None:
        """The response never started (refused, or the upstream failed before its first
        byte): free what admission took; nothing is recorded."""
        if self.done:
            return
        self.done = True
        if self.admission is not None:
            self._free(self.admission, 0)

    def _free(self, admission: Admission, tokens: int) -> None:
        # Done now where it can be (in memory, or admitted locally with Redis), without a
        # task; else by a task of the gate's.
        waiting = self.access.limiter.settle(admission, tokens)
        if waiting is not None:
            self.access.track(waiting)


class Access:
    def __init__(
        self, settings: Settings, credentials: Credentials, db: Database, metrics: Metrics
    ) -> None:
        self.db = db
        self._refusals = metrics.refusals
        # No key configured at all: an open, loopback-only Relay (a developer's machine).
        self.open = not credentials.client_keys and not credentials.admin_keys
        self.keys = KeyStore(db, credentials.client_keys, settings.key_cache_s)
        self._admins = credentials.admin_keys
        redis_url = settings.redis_url.get_secret_value() if settings.redis_url else None
        self.limiter = RateLimiter(redis_url, timeout_s=settings.redis_timeout_s)
        self.ledger = Ledger(db)
        self.idempotency = Idempotency(db, settings.idempotency_ttl_s, settings.run_lease_s)
        self._tasks: set[asyncio.Task[None]] = set()

    def track(self, work: Awaitable[None]) -> None:
        """Run `work` as a task of this gate's: settling never waits for it, and a
        cancelled request does not cut it short."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.ledger.close()
        await self.limiter.aclose()

    def accounting_for(self, project: str, key_id: str | None, model: str) -> Settle:
        """The books of a run admitted elsewhere (a background run from the job queue):
        its usage row, without the limits, which the admitting instance applied."""
        key = KeyRecord(key_id or "", project, frozenset([project]), None, NO_POLICY)
        return Accounting(self, Principal(project, key), model, None).settle

    async def principal(self, connection: HTTPConnection) -> Principal:
        """The caller of a data-plane request (or a WebSocket's upgrade), or 401/403."""
        if self.open:
            # No keys configured: `relay serve` refuses to bind anywhere but loopback; this
            # check holds however the app is served.
            client = connection.client
            if client is None or not is_loopback(client.host):
                raise PermissionDenied(
                    "This Relay has no API keys configured and only serves loopback clients."
                )
            return OPEN_PRINCIPAL
        header = connection.headers.get("authorization")
        if not header:
            hint = (
                " Admin keys (X-Admin-Key) are for the admin API only."
                if "x-admin-key" in connection.headers
                else ""
            )
            raise AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'." + hint,
                code="authentication_required",
            )
        scheme, _, key = header.partition(" ")
        record = await self.keys.find(key.strip()) if scheme.lower() == "bearer" else None
        return await self.principal_of(record, connection.headers.get("x-project-id"))

    async def principal_of(self, record: KeyRecord | None, requested: str | None) -> Principal:
        """What a client key found by any way in (a request's header, a console session)
        acts for: the project `requested` (None: the key's own), or 401/403. The one place
        these rules live."""
        if record is None:
            raise AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
        if record.revoked:
            raise AuthenticationError("This API key has been revoked.", code="api_key_revoked")
        if record.expires_at is not None and time.time() >= record.expires_at:
            raise AuthenticationError("This API key has expired.", code="api_key_expired")
        project = await self._project(requested, record)
        if record.in_database and self.keys.should_touch(record.key_id):
            await self.keys.touch(record.key_id)
        return project

    async def _project(self, requested: str | None, record: KeyRecord) -> Principal:
        project_id = requested or record.project
        if project_id not in record.projects:
            raise PermissionDenied(
                f"This API key may not act for project '{project_id[:100]}'.",
                param="X-Project-ID",
                code="project_not_allowed",
            )
        project = await self.keys.project(project_id)
        if project is None:
            if record.in_database:  # a config key's projects need no row
                raise PermissionDenied(
                    f"Project '{project_id[:100]}' does not exist.",
                    param="X-Project-ID",
                    code="project_not_allowed",
                )
            project = CONFIG_PROJECT
        if project.archived:
            raise PermissionDenied(
                f"Project '{project_id[:100]}' is archived.", code="project_archived"
            )
        scopes = []
        if record.policy.limits_anything:
            scopes.append(Scope("key", record.key_id, record.policy))
        if project.policy.limits_anything:
            scopes.append(Scope("project", project_id, project.policy))
        return Principal(project_id, record, tuple(scopes))

    def admin(self, connection: HTTPConnection) -> str:
        """The admin key's name, or 401. Only X-Admin-Key is read here."""
        key = connection.headers.get("x-admin-key")
        if not key:
            raise AuthenticationError(
                "The admin API needs an admin key in the X-Admin-Key header.",
                code="authentication_required",
            )
        found = self.admin_of(key)
        if found is None:
            raise AuthenticationError("Incorrect admin key provided.", code="invalid_admin_key")
        return found[1]

    def admin_of(self, key: str) -> tuple[str, str] | None:
        """The admin key `key` is, as (its id, its name), or None. The id names the key
        without revealing it (its digest's first digits, as a config client key's), for
        what must find it again later (a console session)."""
        key_digest = digest(key)
        for known, name in self._admins.items():
            if hmac.compare_digest(known, key_digest):
                return f"adm_{known[:12]}", name
        return None

    def admin_named(self, admin_id: str) -> str | None:
        """The name of the configured admin key whose id is `admin_id`, or None (it was
        removed from the configuration)."""
        for known, name in self._admins.items():
            if hmac.compare_digest(f"adm_{known[:12]}", admin_id):
                return name
        return None

    async def admit(
        self, principal: Principal, request: CreateResponse, body_size: int
    ) -> Accounting:
        """Refuse what the key may not do (403), a spent budget (402), a rate over its
        limit (429); else the request's Accounting, holding its concurrency slots."""
        model = request.model or ""
        allowed = principal.key.models
        if allowed is not None:
            for name in [model, *(request.models or [])]:
                if name and name not in allowed:  # no model at all: the engine's 400
                    raise PermissionDenied(
                        f"This API key may not use model '{name[:100]}'.",
                        param="model",
                        code="model_not_allowed",
                    )
        scopes = list(principal.scopes)
        if not scopes:
            return Accounting(self, principal, model, None)
        try:
            await self.ledger.check_budgets(scopes)
            # Input tokens, estimated from the body's size (about 4 bytes a token).
            admission = await self.limiter.admit(scopes, body_size // 4)
        except RelayError as refusal:
            self._refusals.labels(refusal.code or refusal.type).inc()
            raise
        return Accounting(self, principal, model, admission)
