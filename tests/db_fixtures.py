"""Database fixtures: SQLite files and PostgreSQL databases for tests.

PostgreSQL: the server on 127.0.0.1:5432 (or $RELAY_TEST_PG_PORT) is used when one answers
(trust auth, as the current OS user or `postgres`). Otherwise a throwaway cluster is started
from the installed binaries (initdb/pg_ctl on PATH or under /usr/lib/postgresql/*/bin) in a
temporary directory, on a free port, as an unprivileged user when running as root, and stopped
at the end of the session. When neither works, PostgreSQL tests are skipped, saying why. Each
test (or session, for `postgres_url`) gets a fresh, randomly named database, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import getpass
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from relay.storage.sql import SqlStore, open_store

__all__ = ["PgCluster", "PgServer", "pg_cluster", "pg_server", "postgres_url", "store", "store_url"]

T = TypeVar("T")
HOST = "127.0.0.1"
# Where to look for a running server; a throwaway cluster is started when none answers there.
PORT = int(os.environ.get("RELAY_TEST_PG_PORT", "5432"))


def _run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run admin SQL on its own loop in a worker thread, clear of pytest-asyncio's loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _can_connect(port: int, user: str, database: str) -> bool:
    try:
        connection = await asyncpg.connect(
            host=HOST, port=port, user=user, database=database, timeout=5
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    await connection.close()
    return True


async def _execute(port: int, user: str, database: str, sql: str) -> None:
    connection = await asyncpg.connect(
        host=HOST, port=port, user=user, database=database, timeout=10
    )
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@dataclass(frozen=True)
class PgServer:
    port: int
    user: str
    admin_database: str

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{self.user}@{HOST}:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh, empty database; its name."""
        name = f"relay_test_{secrets.token_hex(6)}"
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        # FORCE (PostgreSQL 13+) also ends connections a failed test left open.
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin(self, sql: str) -> None:
        _run_async(_execute(self.port, self.user, self.admin_database, sql))


def _find_running() -> PgServer | None:
    users = list(dict.fromkeys([getpass.getuser(), "postgres"]))
    for user in users:
        for database in ("test", "postgres"):
            if _run_async(_can_connect(PORT, user, database)):
                return PgServer(PORT, user, database)
    return None


def _binaries() -> tuple[str, str] | None:
    initdb = shutil.which("initdb")
    if initdb is None:
        found = sorted(
            glob.glob("/usr/lib/postgresql/*/bin/initdb"),
            key=lambda path: int(Path(path).parts[-3]) if Path(path).parts[-3].isdigit() else 0,
        )
        initdb = found[-1] if found else None
    if initdb is None:
        return None
    pg_ctl = shutil.which("pg_ctl", path=str(Path(initdb).resolve().parent))
    return (initdb, pg_ctl) if pg_ctl else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class PgCluster:
    """A throwaway cluster in a temporary directory."""

    def __init__(self) -> None:
        binaries = _binaries()
        if binaries is None:
            raise RuntimeError("no initdb/pg_ctl found (PATH, /usr/lib/postgresql/*/bin)")
        initdb, self.pg_ctl = binaries
        self.root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.data = self.root / "data"
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root and `runuser` is missing")
            account = _unprivileged_account()
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.prefix = [runuser, "-u", account.pw_name, "--"]
        self.port = _free_port()
        self._run(
            initdb,
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self.start()
        self.server = PgServer(self.port, "postgres", "postgres")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses={HOST} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        log = self.root / "server.log"
        self._run(
            self.pg_ctl,
            "-D",
            str(self.data),
            "-l",
            str(log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def halt(self) -> None:
        """Stop the server as an administrator would (its sessions terminated), keeping its
        data: `start` brings it back."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def _run(self, *command: str) -> None:
        try:
            subprocess.run(
                [*self.prefix, *command], check=True, capture_output=True, text=True, timeout=120
            )
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"{command[0]} failed: {error.stderr.strip()}") from error

    def stop(self) -> None:
        try:
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _unprivileged_account() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root and there is no `postgres` or `nobody` account")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server to create test databases on; skips the test when there is none."""
    running = _find_running()
    if running is not None:
        yield running
        return
    try:
        cluster = PgCluster()
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        pytest.skip(
            f"POSTGRESQL TESTS SKIPPED: no PostgreSQL answers on {HOST}:{PORT} and no "
            f"throwaway cluster could be started: {error}"
        )
    try:
        yield cluster.server
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL server of the module's own, which its tests may stop and start
    (an outage); never the shared one."""
    try:
        cluster = PgCluster()
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"POSTGRESQL OUTAGE TESTS SKIPPED: no throwaway cluster: {error}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def postgres_url(pg_server: PgServer) -> Iterator[str]:
    """The URL of a fresh PostgreSQL database for the whole session, dropped at its end."""
    name = pg_server.create_database()
    try:
        yield pg_server.url(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database for one test: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        # A directory that does not exist yet: open_store must create it.
        yield f"sqlite:///{tmp_path}/data/relay.db"
        return
    server: PgServer = request.getfixturevalue("pg_server")
    name = server.create_database()
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlStore]:
    opened = await open_store(store_url)
    try:
        yield opened
    finally:
        await opened.close()
