"""Alembic environment. Relay runs it from code (relay.storage.sql.migrate), which hands over an
open connection already inside a transaction; there is no alembic.ini.

To write a new revision against a scratch database:

    from relay.storage.sql import alembic_config
    from alembic import command
    command.revision(alembic_config("sqlite:///scratch.db"), "what", autogenerate=True)
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from relay.storage.tables import metadata

config = context.config


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        # SQLite can only alter a table by copying it: autogenerate must write batch operations.
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_with_async_url(url: str) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(run)
    finally:
        await engine.dispose()


def run_with_url(url: str) -> None:
    if make_url(url).get_dialect().is_async:
        asyncio.run(run_with_async_url(url))
        return
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("Relay's migrations run online only")
shared = config.attributes.get("connection")
if isinstance(shared, Connection):
    run(shared)
else:
    run_with_url(config.get_main_option("sqlalchemy.url") or "")
