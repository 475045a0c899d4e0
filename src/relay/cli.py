"""`relay serve`: start the server (uvicorn) from a TOML config, env vars and flags."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import uvicorn
from pydantic import ValidationError
from starlette.types import ASGIApp

from relay.config import Settings, load_settings
from relay.loopback import is_loopback

CONFIG_ENV = "RELAY_CONFIG"
log = logging.getLogger("relay")


def settings_from_env() -> Settings:
    path = os.environ.get(CONFIG_ENV)
    return load_settings(Path(path) if path else None)


def app_factory() -> ASGIApp:
    """What each uvicorn worker imports: settings travel through the environment."""
    # Imported here, not at the top: with --workers N the supervisor process never serves a
    # request, and importing the application there would cost it tens of MB for nothing.
    from relay.api.app import create_app

    return create_app(settings_from_env())


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
            route.api_key()
        for key in settings.api_keys:
            key.secret()
    except ValidationError as error:
        # Without the offending values: a misplaced secret must not reach the terminal.
        for detail in error.errors(include_input=False, include_url=False):
            where = ".".join(str(step) for step in detail["loc"]) or "config"
            print(f"relay: invalid configuration: {where}: {detail['msg']}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"relay: invalid configuration: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    if not settings.api_keys:
        if not is_loopback(settings.host):
            print(
                f"relay: refusing to serve on {settings.host} without API keys; "
                "configure api_keys or bind to 127.0.0.1",
                file=sys.stderr,
            )
            return 2
        log.warning("no API keys configured: serving without authentication, on loopback only")
    uvicorn.run(
        "relay.cli:app_factory",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        loop="uvloop",
        http="httptools",
        access_log=False,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "serve":
        print(
            "usage: relay serve [--config relay.toml] [--host H] [--port P] [--workers N]",
            file=sys.stderr,
        )
        return 2
    return serve(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
