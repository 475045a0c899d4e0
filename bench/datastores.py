"""PostgreSQL and Redis for the production benchmark and the soak, and their round-trip counters.

Each server under test gets its own throwaway PostgreSQL cluster (initdb in a temporary
directory, `pg_stat_statements` preloaded, PostgreSQL's default durability settings) and its
own `redis-server` (no persistence), started from the installed binaries on free ports, so that
the counters read before and after a phase are that server's alone and the machine's shared
servers are left undisturbed. Where the binaries are missing, the shared servers on
127.0.0.1:5432 (a database of the run's own) and 127.0.0.1:6379 (database 15) are used instead,
and `notes` says what that costs the counters.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import redis

from bench.peers import ManagedProcess, clean_env, free_port

HOST = "127.0.0.1"
SHARED_PG_PORT, SHARED_REDIS_PORT, SHARED_REDIS_DB = 5432, 6379, 15
# PostgreSQL refuses to run as root: the cluster runs as this account then.
PG_ACCOUNT = "postgres"
# pg_stat_database's counters reach shared memory when a backend goes idle, at most once a
# second, and from an idle backend within 10 s (PostgreSQL 15's PGSTAT_IDLE_INTERVAL): a phase's
# transactions are read once the counter has held still this long, or after STATS_SETTLE_MAX_S.
STATS_STILL_S = 1.2
STATS_SETTLE_MAX_S = 11.0
# The commands that run a script or function: one round trip each, whatever they call.
SCRIPTS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")
T = TypeVar("T")


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: Path(p).parts[-3])
    on_path = shutil.which("initdb")
    initdb = found[-1] if found else on_path
    return Path(initdb).resolve().parent if initdb else None


@dataclass
class Postgres:
    """One database on a PostgreSQL server; `process` is None for the machine's shared one."""

    port: int
    database: str
    user: str = "postgres"
    process: ManagedProcess | None = None
    root: Path | None = None  # the throwaway cluster's directory
    notes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """As Relay's `database_url` takes it."""
        return f"postgresql+asyncpg://{self.user}@{HOST}:{self.port}/{self.database}"

    @property
    def plain_url(self) -> str:
        return f"postgresql://{self.user}@{HOST}:{self.port}/{self.database}"

    async def _admin_sql(self, sql: str, *args: Any) -> Any:
        """One statement on the administrative database (DDL, which takes no arguments, through
        the simple protocol)."""
        connection = await asyncpg.connect(
            host=HOST, port=self.port, user=self.user, database="postgres", timeout=10
        )
        try:
            if args:
                return await connection.fetchval(sql, *args)
            return await connection.execute(sql)
        finally:
            await connection.close()

    def statements(self) -> int | None:
        """Statements run so far on the database (pg_stat_statements' calls; BEGIN and COMMIT
        included): each is a round trip from the server's driver. None: not counted here."""
        sql = (
            "SELECT coalesce(sum(s.calls), 0)::bigint FROM pg_stat_statements s "
            "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1"
        )
        try:
            return int(_run(self._admin_sql(sql, self.database)))
        except asyncpg.PostgresError:
            return None

    def transactions(self) -> int:
        sql = "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1"
        return int(_run(self._admin_sql(sql, self.database)))

    def settled_transactions(self) -> int:
        """The transaction count once the backends have reported theirs (see STATS_STILL_S)."""
        deadline = time.monotonic() + STATS_SETTLE_MAX_S
        last = self.transactions()
        while time.monotonic() < deadline:
            time.sleep(STATS_STILL_S)
            now = self.transactions()
            if now == last:
                return now
            last = now
        return last

    def connections(self) -> int:
        sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
        return int(_run(self._admin_sql(sql, self.database)))

    def pids(self) -> list[int]:
        return self.process.pids() if self.process else []

    def stop(self) -> None:
        if self.process is None:
            _run(self._admin_sql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'))
            return
        self.process.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(name: str, database: str) -> Postgres:
    """A throwaway cluster with `database` (and pg_stat_statements), or the shared server."""
    binaries = pg_bin()
    if binaries is None:
        return _shared_postgres(database, "no PostgreSQL binaries under /usr/lib/postgresql")
    root = Path(tempfile.mkdtemp(prefix=f"relay-bench-{name}-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam(PG_ACCOUNT)
        os.chown(root, account.pw_uid, account.pw_gid)
        prefix = ["runuser", "-u", PG_ACCOUNT, "--"]
    initdb = [str(binaries / "initdb"), "-D", str(root / "data"), "-U", "postgres", "-A", "trust"]
    done = subprocess.run(
        [*prefix, *initdb, "-E", "UTF8", "--no-sync"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        return _shared_postgres(database, f"initdb failed: {done.stderr.strip()[-300:]}")
    port = free_port()
    settings = {
        "listen_addresses": HOST,
        "unix_socket_directories": str(root),
        "shared_preload_libraries": "pg_stat_statements",
        "pg_stat_statements.track": "top",
        "max_connections": "200",
    }
    argv = [*prefix, str(binaries / "postgres"), "-D", str(root / "data"), "-p", str(port)]
    for key, value in settings.items():
        argv += ["-c", f"{key}={value}"]
    process = ManagedProcess(f"postgresql ({name})", argv, root / "server.log", env=clean_env())
    process.start()
    server = Postgres(port, database, process=process, root=root)
    _wait_for(lambda: _run(server._admin_sql("SELECT $1::int", 1)) == 1, process)
    _run(server._admin_sql("CREATE EXTENSION pg_stat_statements"))
    _run(server._admin_sql(f'CREATE DATABASE "{database}"'))
    return server


def _shared_postgres(database: str, why: str) -> Postgres:
    server = Postgres(SHARED_PG_PORT, f"{database}_{secrets.token_hex(4)}")
    _run(server._admin_sql(f'CREATE DATABASE "{server.database}"'))
    server.notes.append(
        f"PostgreSQL: the shared server on {HOST}:{SHARED_PG_PORT}, database "
        f"{server.database} ({why}); statements are counted only if it preloads "
        "pg_stat_statements, and its CPU is not measured"
    )
    return server


@dataclass
class Redis:
    port: int
    db: int = 0
    process: ManagedProcess | None = None
    notes: list[str] = field(default_factory=list)
    _client: redis.Redis | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/{self.db}"

    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis(host=HOST, port=self.port, db=self.db, socket_timeout=10)
        return self._client

    def commands(self) -> tuple[int, int]:
        """(commands, scripts) the server has run so far, this counter's own INFO calls left
        out. Commands include those a script runs (Redis counts them alike), so round trips
        lie between the number of scripts and that of commands."""
        stats = self.client().info("commandstats")
        commands = sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
        scripts = sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in SCRIPTS)
        return commands, scripts

    def clients(self) -> int:
        """Connected clients other than this counter's own connection."""
        return int(self.client().info("clients")["connected_clients"]) - 1

    def pids(self) -> list[int]:
        return self.process.pids() if self.process else []

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
        if self.process is not None:
            self.process.stop()


def start_redis(name: str, workdir: Path) -> Redis:
    binary = shutil.which("redis-server")
    if binary is None:
        server = Redis(SHARED_REDIS_PORT, SHARED_REDIS_DB)
        server.client().flushdb()
        server.notes.append(
            f"Redis: the shared server on {HOST}:{SHARED_REDIS_PORT} db {SHARED_REDIS_DB} (no "
            "redis-server installed): its command counts include every other client's"
        )
        return server
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(workdir)]
    process = ManagedProcess(f"redis ({name})", argv, workdir / f"redis-{name}.log")
    process.start()
    server = Redis(port, process=process)
    _wait_for(lambda: bool(server.client().ping()), process)
    return server


def _wait_for(ready: Any, process: ManagedProcess, timeout_s: float = 60.0) -> None:
    """Poll `ready()` until true; fail with the log's tail if the server exits or never is."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.proc is None or process.proc.poll() is not None:
            raise RuntimeError(f"{process.name} exited during start-up:\n{process.log_tail()}")
        try:
            if ready():
                return
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, redis.RedisError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{process.name} did not answer in {timeout_s:.0f} s:\n{process.log_tail()}")


@dataclass
class Datastores:
    """The PostgreSQL database and Redis a server under test uses."""

    postgres: Postgres
    redis: Redis

    @property
    def notes(self) -> list[str]:
        return [*self.postgres.notes, *self.redis.notes]

    def stop(self) -> None:
        self.redis.stop()
        self.postgres.stop()


def start_datastores(name: str, workdir: Path) -> Datastores:
    postgres = start_postgres(name, name)
    try:
        return Datastores(postgres, start_redis(name, workdir))
    except Exception:
        postgres.stop()
        raise
