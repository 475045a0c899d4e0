"""The ASGI application: settings -> registry, store, engine; routes under /v1 and /api/v1."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from relay import __version__
from relay.access.admin import Admin
from relay.access.gate import Access, Credentials
from relay.api import errors
from relay.api.routes import routes
from relay.config import Settings
from relay.engine.prompts import PromptTemplates
from relay.engine.run import Engine
from relay.engine.tool_loop import ToolRuntime
from relay.heap import freeze_startup_heap
from relay.observe import MULTIPROCESS_DIR, tracing
from relay.observe.access import ObservedRequests
from relay.observe.metrics import Metrics
from relay.providers.registry import Registry
from relay.runs.log import RunLog
from relay.runs.runner import Runner
from relay.sealing import Sealer, agree, fingerprint, load_keys
from relay.storage.conversations import ConversationStore
from relay.storage.database import AsyncDatabase
from relay.storage.sql import open_store
from relay.supervisor import Supervisor
from relay.tools import web_search
from relay.tools.egress import EgressPolicy
from relay.tools.images import ImagesBackend
from relay.tools.mcp import McpClient, McpLimits
from relay.ui.guard import Console, SignInThrottle
from relay.ui.routes import console_routes
from relay.ui.sessions import Sessions

log = logging.getLogger("relay")
SAMPLE_S = 1.0  # how often the metrics' gauges are read (relay.observe.metrics)


def create_app(settings: Settings) -> ASGIApp:
    keys = load_keys([key.get_secret_value() for key in settings.sealing_keys], settings.data_dir)
    kept = _Secrets(
        Credentials.of(settings), Sealer(keys), fingerprint(keys[0]), bool(settings.sealing_keys)
    )
    # From here on the application holds only the client and admin keys' digests, and the
    # sealing keys inside the sealer.
    settings = settings.model_copy(update={"api_keys": [], "admin_keys": [], "sealing_keys": []})
    metrics = Metrics(settings.metrics_labels)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        supervisor = Supervisor()
        try:
            await _start(app, settings, kept, metrics, supervisor)
            freeze_startup_heap()
            yield
        finally:
            await supervisor.aclose()

    middleware = []
    if settings.cors_origins:
        # Browser clients (such as the Open Responses compliance tester) need CORS.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=[
                    "authorization",
                    "content-type",
                    "x-request-id",
                    "x-session-id",
                    "idempotency-key",
                    "x-project-id",
                    "traceparent",
                    "tracestate",
                ],
                expose_headers=["x-request-id", "x-relay-omitted-tools", "x-relay-deployment"],
            )
        )
    if tracing.wanted(settings):
        # Each request's span: outside the others, inside the request id's (the span carries
        # the id). Not installed at all when tracing is off.
        middleware.insert(0, Middleware(tracing.TracingMiddleware))
    app = Starlette(
        routes=[*routes(("/v1", "/api/v1")), *(console_routes() if settings.console else [])],
        middleware=middleware,
        exception_handlers=errors.HANDLERS,
        lifespan=lifespan,
    )

    return ObservedRequests(app, metrics, log_access=settings.access_log)


@dataclass(frozen=True, slots=True)
class _Secrets:
    """What the application keeps of the settings' keys."""

    credentials: Credentials
    sealer: Sealer
    key_fingerprint: str
    configured_keys: bool  # sealing keys configured, not generated


def _tool_runtime(settings: Settings, access: Access, metrics: Metrics) -> ToolRuntime:
    """What server-side tools run with: each project's egress policy is its own list of MCP
    servers where its policy has one, else the server's."""
    config = settings.tools
    networks = tuple(config.mcp.private_networks)
    default = EgressPolicy(tuple(config.mcp.allowed_servers), networks)
    policies: dict[tuple[str, ...], EgressPolicy] = {}

    async def policy_for(project: str) -> EgressPolicy:
        record = await access.keys.project(project)
        servers = None if record is None else record.policy.mcp_servers
        if servers is None:
            return default
        policy = policies.get(servers)
        if policy is None:
            policy = policies[servers] = EgressPolicy(servers, networks)
        return policy

    limits = McpLimits(
        config.mcp.list_timeout_s, config.mcp.call_timeout_s, config.mcp.max_output_bytes
    )
    search = None if config.web_search is None else web_search.build(config.web_search)
    images = None if config.images is None else ImagesBackend(config.images)
    return ToolRuntime(config, McpClient(limits), search, policy_for, metrics, images)


async def _start(
    app: Starlette, settings: Settings, kept: _Secrets, metrics: Metrics, supervisor: Supervisor
) -> None:
    """Open what the application serves with, each handed to `supervisor` as it opens: a
    start-up that fails half-way closes what it had opened, and a shutdown closes in the
    reverse order (what depends on another stops before it)."""
    stop_tracing = tracing.start(settings)
    if stop_tracing is not None:
        # First in, so last out: the spans of everything else's shutdown are exported too.
        supervisor.closes("tracing", stop_tracing)
    store = await open_store(settings.database_url)
    supervisor.closes("store", store.close)
    await agree(
        store.db,
        kept.key_fingerprint,
        configured=kept.configured_keys,
        data_dir=settings.data_dir,
    )
    registry = Registry(
        settings.routes,
        cooldown_failures=settings.cooldown_failures,
        cooldown_s=settings.cooldown_s,
        metrics=metrics,
    )
    supervisor.closes("providers", registry.aclose)
    access = Access(settings, kept.credentials, store.db, metrics)
    supervisor.closes("access", access.aclose)
    conversations = ConversationStore(store.db, settings.run_lease_s)
    prompt_templates = PromptTemplates(store.db, settings.key_cache_s)
    tools = _tool_runtime(settings, access, metrics)
    supervisor.closes("tools", tools.aclose)
    if settings.tools.mcp.allowed_servers:
        await asyncio.to_thread(tools.mcp.warm)
    engine = Engine(
        registry,
        store,
        echo_json_schema=settings.echo_json_schema,
        history_cache_items=settings.history_cache_items,
        history_cache_bytes=settings.history_cache_bytes,
        sealer=kept.sealer,
        hosted_tools=settings.hosted_tools,
        conversations=conversations,
        tools=tools,
        prompt_templates=prompt_templates,
    )
    supervisor.closes("engine", engine.aclose)
    runner = Runner(
        engine,
        RunLog(store, settings.run_lease_s, stopping=engine.stopping),
        max_running=settings.background_max_running,
        max_queued=settings.background_max_queued,
        poll_s=settings.run_poll_s,
        accounting_for=access.accounting_for,
        leases=(access.idempotency, conversations),
    )
    supervisor.closes("runs", runner.aclose)
    if isinstance(store.db, AsyncDatabase):
        await _share_runs(settings, supervisor, runner)
    supervisor.start("run upkeep", runner.keep())
    supervisor.closes("metrics", metrics.aclose)
    if settings.metrics_port is not None and MULTIPROCESS_DIR not in os.environ:
        supervisor.closes(
            "metrics port", metrics.serve(settings.metrics_host, settings.metrics_port)
        )
    supervisor.start("metrics sampling", metrics.sample(engine, runner, store.db, SAMPLE_S))

    async def stop_waiting() -> None:
        engine.stopping.set()

    # Registered last, so done first: what still waits for the database gives up (the sweep
    # ends those runs) rather than hold the shutdown.
    supervisor.closes("waits for the database", stop_waiting)
    app.state.conversations = conversations
    app.state.settings = settings
    app.state.store = store
    app.state.engine = engine
    app.state.runner = runner
    app.state.access = access
    app.state.admin = Admin(store.db)
    app.state.prompt_templates = prompt_templates
    app.state.metrics = metrics
    if settings.console:
        sessions = Sessions(store.db, settings.console_session_s)
        app.state.console = Console(sessions, SignInThrottle(access.limiter))
    log.info("relay %s ready; models: %s", __version__, ", ".join(registry.names()))


async def _share_runs(settings: Settings, supervisor: Supervisor, runner: Runner) -> None:
    """With PostgreSQL: the job queue that hands background runs out, and the signals
    between instances."""
    # Imported here: the job queue and the signals need psycopg and procrastinate, which a
    # SQLite process does without (about 10 MB a worker).
    from relay.runs.notify import Listener
    from relay.runs.queue import JobQueue, conninfo

    if settings.background_queue == "auto":
        queue = JobQueue(
            settings.database_url, runner.run_queued, concurrency=settings.background_max_running
        )
        await queue.open()
        supervisor.closes("job queue", queue.close)
        if settings.background_worker:
            supervisor.start("job worker", queue.work())
        runner.queue = queue
    listener = Listener(conninfo(settings.database_url), runner.on_signal)
    supervisor.start("run signals", listener.listen())
    runner.signalled = True
