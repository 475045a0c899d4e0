"""`relay serve`: start the server (uvicorn) from a TOML config, env vars and flags."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp

from relay import __version__, log_lines
from relay.config import Settings, load_settings
from relay.console import report_config_error, without_password
from relay.errors import StartupError
from relay.launch import Launch, become_supervisor, run
from relay.loopback import is_loopback
from relay.models.deployments import DeploymentConfig, FakeConfig, LlamaCppConfig
from relay.observe import MULTIPROCESS_DIR

CONFIG_ENV = "RELAY_CONFIG"
log = logging.getLogger("relay")


def settings_from_env() -> Settings:
    path = os.environ.get(CONFIG_ENV)
    return load_settings(Path(path) if path else None)


def app_factory() -> ASGIApp:
    """What each uvicorn worker imports: settings travel through the environment."""
    # Imported here, not at the top: `relay serve`'s checks before it serves, `relay admin`
    # and `relay check` do without the application.
    from relay.api.app import create_app

    settings = settings_from_env()
    configure_logging(settings)  # a worker process of its own (--workers N) starts bare
    return create_app(settings)


def configure_logging(settings: Settings) -> None:
    log_lines.configure(settings.log_level, settings.log_format)


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="relay serve", description="Start the Relay server.")
    parser.add_argument("--config", type=Path, help="TOML config file (env vars override it)")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (default 8080)")
    parser.add_argument("--workers", type=int, help="worker processes (default 1)")
    args = parser.parse_args(argv)

    # Flags become env vars so that every worker process sees the same settings.
    if args.config is not None:
        os.environ[CONFIG_ENV] = str(args.config.resolve())
    for name in ("host", "port", "workers"):
        value = getattr(args, name)
        if value is not None:
            os.environ[f"RELAY_{name.upper()}"] = str(value)
    try:
        settings = settings_from_env()
        # Secrets are read now so that a missing variable is one clear line, not a traceback.
        for route in settings.routes:
            route.api_keys()
        for key in [*settings.api_keys, *settings.admin_keys]:
            key.secret()
    except ValueError as error:  # pydantic's ValidationError included
        report_config_error("relay", error)
        return 2
    configure_logging(settings)
    if not settings.api_keys and not settings.admin_keys and not is_loopback(settings.host):
        print(
            f"relay: refusing to serve on {settings.host} without API keys; "
            "configure api_keys or admin_keys, or bind to 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    taken = cannot_listen(settings.host, settings.port)
    if taken is not None:
        print(f"relay: {taken}", file=sys.stderr)
        return 1
    if settings.workers > 1:
        # The database is opened (and migrated) here once, so that its failure is this
        # command's, in one line, rather than each worker's, and the workers find it migrated.
        unopened = database_fails(settings.database_url)
        if unopened is not None:
            print(f"relay: {unopened}", file=sys.stderr)
            return 1
    if settings.metrics_port is not None:
        taken = cannot_listen(settings.metrics_host, settings.metrics_port)
        if taken is not None:
            print(f"relay: metrics_port: {taken}", file=sys.stderr)
            return 1
    describe(settings)
    launch = Launch(
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        log_format=settings.log_format,
        max_body_bytes=settings.max_body_bytes,
        metrics_host=settings.metrics_host,
        metrics_port=settings.metrics_port,
    )
    if settings.workers > 1:
        become_supervisor(launch)  # never returns: this process becomes relay.launch
    # One process counts in memory, and serves metrics_port itself.
    os.environ.pop(MULTIPROCESS_DIR, None)
    run(launch)
    return 0


def database_fails(url: str) -> str | None:
    """Why the database at `url` cannot be opened, in one line; None when it opens. Opened
    in this process, whose storage layer goes with it when it becomes the supervisor."""
    import asyncio

    from relay.storage.database import open_database

    async def probe() -> None:
        database = await open_database(url)
        await database.close()

    try:
        asyncio.run(probe())
    except StartupError as error:
        return str(error)
    return None


def worker(argv: list[str]) -> int:
    """`relay worker`: take background runs from the job queue (PostgreSQL), serving no
    HTTP: runners scaled apart from the API (which may set background_worker = false)."""
    parser = argparse.ArgumentParser(
        prog="relay worker", description="Run background responses from the job queue."
    )
    parser.add_argument("--config", type=Path, help="TOML config file (env vars override it)")
    args = parser.parse_args(argv)
    if args.config is not None:
        os.environ[CONFIG_ENV] = str(args.config.resolve())
    try:
        settings = settings_from_env().model_copy(update={"background_worker": True})
    except ValueError as error:
        report_config_error("relay worker", error)
        return 2
    if not settings.database_url.startswith("postgresql") or settings.background_queue != "auto":
        print('relay worker: needs PostgreSQL and background_queue = "auto"', file=sys.stderr)
        return 2
    configure_logging(settings)
    log.info("relay %s worker; storage: %s", __version__, without_password(settings.database_url))
    import uvloop

    try:
        uvloop.run(_work(settings))
    except StartupError as error:
        print(f"relay worker: {error}", file=sys.stderr)
        return 1
    return 0


async def _work(settings: Settings) -> None:
    """The application's start-up and shutdown, and nothing in between but its background
    work, until SIGINT or SIGTERM."""
    import asyncio
    import signal

    from relay.api.app import create_app

    app: Any = create_app(settings).app  # type: ignore[attr-defined]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, stop.set)
    async with app.router.lifespan_context(app):
        await stop.wait()


def cannot_listen(host: str, port: int) -> str | None:
    """Why Relay could not listen on host:port, or None. uvicorn binds only once the
    application has started (the embedded model loaded, minutes for a large one), so the
    address is tried first, as uvicorn will bind it, then let go."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            hint = ""
            if error.errno == errno.EADDRINUSE:
                hint = ": another process listens there; stop it, or choose another --port"
            return f"cannot listen on {host}:{port} ({error.strerror or error}){hint}"
    return None


def describe(settings: Settings) -> None:
    """What a user needs to see at start-up: where Relay listens, its storage, its
    authentication and its routes (no credential among them)."""
    workers = f"{settings.workers} worker{'s' if settings.workers > 1 else ''}"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("relay %s on http://%s:%d (%s)", __version__, host, settings.port, workers)
    log.info("storage: %s", without_password(settings.database_url))
    if settings.api_keys or settings.admin_keys:
        tenants = sorted({key.tenant for key in settings.api_keys})
        log.info(
            "auth: %d API keys in the config (tenants %s), keys in the database, %d admin keys",
            len(settings.api_keys),
            ", ".join(tenants) or "none",
            len(settings.admin_keys),
        )
        if settings.redis_url is not None:
            log.info(
                "rate limits: shared through %s",
                without_password(settings.redis_url.get_secret_value()),
            )
    else:
        log.warning("auth: no API keys configured: serving without authentication, loopback only")
    for route in settings.routes:
        targets = [_target(route.model, deployment) for deployment in route.deployments]
        if len(targets) > 1:
            labels = [deployment.label for deployment in route.deployments]
            targets = [f"{label}: {target}" for label, target in zip(labels, targets, strict=True)]
        fallbacks = f" (falls back to {', '.join(route.fallbacks)})" if route.fallbacks else ""
        log.info("model %s -> %s%s", route.model, "; ".join(targets), fallbacks)


def _target(model: str, deployment: DeploymentConfig) -> str:
    upstream = deployment.upstream_model or model
    if isinstance(deployment, LlamaCppConfig):
        return f"{deployment.model_path or 'the bundled SmolLM2-135M-Instruct'}, in-process"
    if isinstance(deployment, FakeConfig):
        return f"the fake provider's script '{upstream}'"
    return f"'{upstream}' at {without_password(deployment.base_url)}"


COMMANDS = {
    "serve": "start the server",
    "worker": "run background responses from the job queue (PostgreSQL), serving no HTTP",
    "admin": "projects, keys, usage and the audit log, on the configured database",
    "check": "check the configuration, the database, Redis and every upstream",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Relay: a server for the OpenAI Responses API in front of any model.",
        epilog="relay COMMAND --help shows a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, what in COMMANDS.items():
        # Each command parses its own options (and answers its own --help).
        commands.add_parser(name, help=what, add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "worker":
        return worker(rest)
    if args.command == "admin":
        from relay.admin_cli import main as admin

        return admin(rest)
    if args.command == "check":
        from relay.check import main as check

        return check(rest)
    return serve(rest)


if __name__ == "__main__":
    sys.exit(main())
