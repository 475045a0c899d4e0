"""A process imports what its configuration uses (docs/benchmarks.md, "What each dependency
costs"): a worker on SQLite without Redis, MCP servers, traces or an embedded model starts
without their libraries, and the supervisor of `relay serve --workers 2` without the
settings' models or the storage layer. Each is read from a real process: a fresh interpreter
that runs the application's start-up, and a running `relay serve`. And the schema revision
Relay reads without Alembic is the one Alembic reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
from live_server import relay_serve
from sqlalchemy import Connection, create_engine

from relay.storage.sql import open_store

# What a minimal configuration must not import: each costs megabytes in every process.
UNUSED = [
    "llama_cpp",  # the embedded model: only with a llama_cpp route
    "psycopg",  # PostgreSQL: its drivers, the job queue and SQLAlchemy's asyncio and ORM
    "asyncpg",
    "procrastinate",
    "sqlalchemy.ext.asyncio",
    "sqlalchemy.orm",
    "sqlalchemy.dialects.postgresql",
    "alembic",  # migrations: only when the schema is behind
    "mako",
    "redis",  # only with redis_url
    "mcp",  # MCP servers, web search and images: when configured or first used
    "httpx2",
    "opentelemetry",  # only when tracing is on
    "jinja2",  # the console's pages: on the first one asked for
    "cryptography",  # sealing: on the first item sealed or opened
    "jsonschema",  # on the first client schema to check
    "watchfiles",  # uvicorn's --reload, never used
]

# Starts the application (what a uvicorn worker runs, lifespan included), then names every
# module it imported.
START_UP = """
import asyncio, sys
import orjson
from relay.cli import app_factory

app = app_factory().app

async def start_and_stop():
    async with app.router.lifespan_context(app):
        pass

asyncio.run(start_and_stop())
sys.stdout.buffer.write(orjson.dumps(sorted(sys.modules)))
"""


def imported_at_start_up(tmp_path: Path, extra: str = "") -> set[str]:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'database_url = "sqlite:///{tmp_path}/relay.db"\n'
        f'data_dir = "{tmp_path}/data"\n'
        f"{extra}\n"
        '[[routes]]\nmodel = "m"\nprovider = "openai_chat"\n'
        'base_url = "http://127.0.0.1:9/v1"\n'
    )
    done = subprocess.run(
        [sys.executable, "-c", START_UP],
        env={**os.environ, "RELAY_CONFIG": str(config)},
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    return set(orjson.loads(done.stdout))


def among(modules: set[str], names: list[str]) -> list[str]:
    """The `names` that `modules` holds, as themselves or through a submodule."""
    return [name for name in names if any(m == name or m.startswith(f"{name}.") for m in modules)]


async def migrated(tmp_path: Path) -> None:
    """The database at the head revision, as a restarted Relay, or a worker of `--workers N`
    (whose supervisor migrated it first), finds it."""
    store = await open_store(f"sqlite:///{tmp_path}/relay.db")
    await store.close()


async def test_a_minimal_configuration_imports_none_of_the_optional_libraries(
    tmp_path: Path,
) -> None:
    await migrated(tmp_path)
    modules = imported_at_start_up(tmp_path)
    assert "relay.api.app" in modules and "sqlalchemy" in modules
    assert among(modules, UNUSED) == []


async def test_what_a_configuration_names_is_imported(tmp_path: Path, redis_url: str) -> None:
    await migrated(tmp_path)
    modules = imported_at_start_up(tmp_path, f'redis_url = "{redis_url}"')
    # redis-py itself imports the OpenTelemetry SDK and cryptography (its observability
    # module) wherever they are installed.
    assert among(modules, UNUSED) == ["redis", "opentelemetry", "cryptography"]


def test_the_supervisor_of_several_workers_holds_neither_settings_nor_storage(
    tmp_path: Path,
) -> None:
    env = {"RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/relay.db", "RELAY_DATA_DIR": str(tmp_path)}
    with relay_serve(env, "--workers", "2") as relay:
        supervisor = relay.process.pid  # the same process, become relay.launch
        command = Path(f"/proc/{supervisor}/cmdline").read_bytes().split(b"\0")
        assert b"relay.launch" in command
        children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
        # Extension modules show as mapped files: pydantic's core, SQLAlchemy's.
        maps = {pid: Path(f"/proc/{pid}/maps").read_text() for pid in [supervisor, *children]}
    assert "_pydantic_core" not in maps[supervisor]
    assert "sqlalchemy" not in maps[supervisor]
    assert any("_pydantic_core" in maps[child] for child in children)  # a worker's


async def test_the_revision_read_without_alembic_is_alembics(store_url: str) -> None:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from relay.storage.database import alembic_config
    from relay.storage.revision import current_revision, head_revision

    assert head_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head()
    store = await open_store(store_url)
    try:

        def both(conn: Connection) -> tuple[str | None, str | None]:
            alembic = MigrationContext.configure(conn).get_current_revision()
            return current_revision(conn), alembic

        ours, alembics = await store.db.read(both)
        assert ours == alembics == head_revision()
        # A database without a schema is at no revision, for both.
        empty = create_engine("sqlite://")
        with empty.connect() as conn:
            assert current_revision(conn) is None
            assert MigrationContext.configure(conn).get_current_revision() is None
    finally:
        await store.close()
