"""Where the store's statements run: `Database.read` and `Database.write` take a synchronous
function of a SQLAlchemy `Connection`, so every query is written once for both databases.

- SQLite runs them on threads of its own with the standard library's sqlite3: a whole save is
  one hop from the event loop to a thread and back (aiosqlite made one hop per cursor call,
  about ten per save). One writer thread per process serialises this process's writes, and an
  advisory file lock serialises processes, so that writers queue in the kernel and wake as soon
  as the lock is free; SQLite's own busy handler sleeps in growing steps (1, 2, 5, 10... ms)
  instead, which was most of the latency of concurrent saves. A small write a request waits
  for (`write_awaited`) runs on the event loop instead when nothing is queued for the writer
  and both locks are free at once: the hop to the writer thread and back cost about 0.2 ms,
  as much as the write itself.
- PostgreSQL runs them on asyncpg through `AsyncConnection.run_sync`: no threads; each
  statement is awaited on the event loop, and each is a round trip to the server, as are the
  BEGIN and COMMIT of a transaction: a write of one statement (`write_one`) runs without
  them, the statement its own transaction. A response's save (`execute_one`) goes past
  SQLAlchemy, to a pool of asyncpg's own: SQLAlchemy's async connection checkout, greenlet
  and result handling cost it more than PostgreSQL's execution (docs/design.md).

Errors that say the database cannot be reached leave both as `DatabaseUnavailable`
(relay.storage.outage).

`open_database` also migrates the schema (Alembic, imported only when the schema is behind:
relay.storage.revision), with the locks that let processes starting together take turns.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from sqlalchemy import ClauseElement, Connection, Engine, Executable, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.pool import QueuePool, StaticPool

from relay.errors import StartupError
from relay.storage.checkpoints import RESTART_WAIT_S, Checkpoints, writers_wait
from relay.storage.outage import reachable
from relay.storage.revision import current_revision, head_revision

if TYPE_CHECKING:
    from alembic.config import Config

T = TypeVar("T")
MIGRATIONS = Path(__file__).with_name("migrations")
# Key of the PostgreSQL advisory lock that serialises migrations of processes starting together.
_MIGRATION_LOCK = 7_366_100_261_625_119_076
_BUSY_TIMEOUT_MS = 10_000
# Serialises migrations within this process (the advisory lock or BEGIN IMMEDIATE serialises
# processes): Alembic keeps the running migration in module globals (`alembic.op`,
# `alembic.context`), so two migrations in one process must not interleave.
_MIGRATING = threading.Lock()
_LOCK_POLL_S = 0.01
# Reads run in parallel with the writer; SQLite in WAL mode never makes a reader wait.
_SQLITE_READERS = 2


# Told of each statement sent past SQLAlchemy (`execute_one` on PostgreSQL), as SQLAlchemy's
# cursor events are of its own: round trips counted by tests and benchmarks.
DRIVER_STATEMENTS: list[Callable[[str], None]] = []
# Connections of that pool, per process, beside SQLAlchemy's (5, and 10 more at peaks): all
# opened on its first use and kept, so that the count stays flat (a pool that grew with the
# load and shrank when idle looked like a leak to the soak).
DRIVER_POOL_SIZE = 3


class Database(Protocol):
    """Runs synchronous functions of a Connection: `write` inside a transaction that commits
    when the function returns (and rolls back when it raises), `read` outside one."""

    @property
    def sync_engine(self) -> Engine: ...

    @property
    def engines(self) -> tuple[Engine, ...]:
        """Every engine statements go through (to listen to them all)."""
        ...

    async def read(self, work: Callable[[Connection], T]) -> T: ...

    async def write(self, work: Callable[[Connection], T]) -> T: ...

    async def write_one(self, work: Callable[[Connection], T]) -> T:
        """`write` for work that runs a single statement, atomic on its own: committed (as
        durably as `write`) when it returns, nothing written when it raises."""
        ...

    async def write_awaited(self, work: Callable[[Connection], T]) -> T:
        """`write` for a small write a request waits for (a response's save, its run's
        record), which may run on the calling thread."""
        ...

    async def glance(self, work: Callable[[Connection], T]) -> T:
        """`read` for a single indexed lookup, which may run on the calling thread."""
        ...

    def connections(self) -> tuple[int, int] | None:
        """Its connections now, (in use, idle), over every pool; None: a single shared one."""
        ...

    async def execute_one(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> Sequence[Any] | None:
        """One statement, built once (what it compiles to is kept), atomic on its own,
        committed (as durably as `write`) when it returns, as a small write a request waits
        for: the first row it returns, or None."""
        ...

    async def close(self) -> None: ...


class SqliteDatabase:
    def __init__(self, url: URL) -> None:
        database = url.database or ""
        self._memory = database in ("", ":memory:")
        # One writer thread; readers on their own threads, except in memory, where one
        # connection holds the database and every statement must go through it.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="relay-sqlite-writer")
        self._readers = (
            self._writer
            if self._memory
            else ThreadPoolExecutor(_SQLITE_READERS, thread_name_prefix="relay-sqlite-reader")
        )
        # sqlite3 calls sqlite3_busy_timeout() as it opens the file, before any statement
        # runs; connections move between this store's threads, never two at once.
        connect_args = {"timeout": _BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        self._lock_file: int | None = None
        if self._memory:
            self._engine = create_engine(url, poolclass=StaticPool, connect_args=connect_args)
        else:
            if not url.query.get("uri"):
                Path(database).parent.mkdir(parents=True, exist_ok=True)
                self._lock_file = os.open(f"{database}.write-lock", os.O_RDWR | os.O_CREAT, 0o600)
            self._engine = create_engine(
                url,
                poolclass=QueuePool,
                pool_size=1 + _SQLITE_READERS,
                connect_args=connect_args,
            )
        # The event loop's own connection for `glance` and `write_awaited`. No busy timeout:
        # where SQLite would wait, they hand the work to a thread instead.
        self._inline = (
            None
            if self._memory
            else create_engine(
                url, poolclass=StaticPool, connect_args={**connect_args, "timeout": 0}
            )
        )
        # The event loop's own descriptor of the write-lock file: flock excludes open file
        # descriptions, not threads, so the loop and the writer thread each need one.
        self._inline_lock: int | None = None
        if self._lock_file is not None:
            self._inline_lock = os.open(f"{database}.write-lock", os.O_RDWR)
        self._queued = 0  # writes handed to the writer thread and not yet done
        # Off the event loop, where a save would have made every request wait for them.
        self._checkpoints = (
            None
            if self._memory
            else Checkpoints(
                create_engine(
                    url,
                    poolclass=StaticPool,
                    connect_args={**connect_args, "timeout": RESTART_WAIT_S},
                ),
                None if self._lock_file is None else f"{database}.write-lock",
            )
        )
        memory = self._memory

        def _configure(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            if not memory:
                cursor.execute("PRAGMA synchronous = NORMAL")  # durable across crashes in WAL
                cursor.execute("PRAGMA wal_autocheckpoint = 0")  # relay.storage.checkpoints
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.close()

        for engine in (self._engine, self._inline):
            if engine is not None:
                event.listen(engine, "connect", _configure)

    @property
    def sync_engine(self) -> Engine:
        return self._engine

    @property
    def engines(self) -> tuple[Engine, ...]:
        return (self._engine,) if self._inline is None else (self._engine, self._inline)

    async def read(self, work: Callable[[Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        with reachable():
            return await loop.run_in_executor(self._readers, self._read, work)

    async def write(self, work: Callable[[Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        self._queued += 1
        try:
            with reachable():
                return await loop.run_in_executor(self._writer, self._write, work)
        finally:
            self._queued -= 1

    async def write_one(self, work: Callable[[Connection], T]) -> T:
        # A transaction costs SQLite no round trip, and keeps the writer lock's discipline.
        return await self.write_awaited(work)

    async def write_awaited(self, work: Callable[[Connection], T]) -> T:
        """On the event loop when no write is queued for the writer thread (which keeps this
        process's writes in the order they were asked) and the write locks, the processes'
        and SQLite's, are free at once; else, or when SQLite turns out busy (nothing then
        written), on the writer thread. Only for small writes: the loop waits for it."""
        if self._inline is not None and self._inline_lock is not None and not self._queued:
            try:
                fcntl.flock(self._inline_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another process is writing
            else:
                try:
                    done = _unless_busy(self._inline.begin, work)
                finally:
                    fcntl.flock(self._inline_lock, fcntl.LOCK_UN)
                if done is not _BUSY:
                    self._written()
                    return cast(T, done)
        return await self.write(work)

    def connections(self) -> tuple[int, int] | None:
        return None if self._memory else _counted(self._engine)

    async def execute_one(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> Sequence[Any] | None:
        def work(conn: Connection) -> Sequence[Any] | None:
            result = conn.execute(statement, params)
            return result.first() if result.returns_rows else None

        return await self.write_awaited(work)

    async def glance(self, work: Callable[[Connection], T]) -> T:
        """A lookup by primary key costs SQLite tens of microseconds, and the hop to a reader
        thread and back several times that (two thread switches), so it runs here, on the
        event loop, when SQLite answers at once. In WAL mode a reader waits for nobody except
        in rare moments (a checkpoint restarting the log): then it takes the thread path."""
        if self._inline is not None:
            done = _unless_busy(self._inline.connect, work)
            if done is not _BUSY:
                return cast(T, done)
        return await self.read(work)

    def _read(self, work: Callable[[Connection], T]) -> T:
        with self._engine.connect() as conn:
            return work(conn)

    def _write(self, work: Callable[[Connection], T]) -> T:
        # The write lock across processes (workers of one server share the file).
        with writers_wait(self._lock_file), self._engine.begin() as conn:
            done = work(conn)
        self._written()
        return done

    def _written(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.written()

    async def migrate(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._migrate)

    def _migrate(self) -> None:
        # Blocking on the lock is fine here: this is the writer thread, not an event loop.
        with _MIGRATING, self._engine.connect() as conn:
            if not self._memory:
                _use_wal(conn)
            # Takes the write lock at once; and DDL inside an explicit transaction is not
            # autocommitted by sqlite3.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            _upgrade(conn)
            conn.commit()

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._checkpoints is not None:
            await loop.run_in_executor(None, self._checkpoints.close)
        # Runs after every queued statement, on the writer thread.
        await loop.run_in_executor(self._writer, self._engine.dispose)
        if self._inline is not None:
            self._inline.dispose()
        self._writer.shutdown()
        self._readers.shutdown()
        for fd in (self._lock_file, self._inline_lock):
            if fd is not None:
                os.close(fd)
        self._lock_file = self._inline_lock = None


_BUSY = object()


def _unless_busy(
    connection: Callable[[], AbstractContextManager[Connection]], work: Callable[[Connection], T]
) -> T | object:
    """`work` on the event loop's SQLite connection, or _BUSY (nothing done) where SQLite would
    make it wait: that connection has no busy timeout."""
    with reachable():
        try:
            with connection() as conn:
                return work(conn)
        except OperationalError as error:
            if not _is_busy(error):
                raise
    return _BUSY


def _counted(engine: Engine) -> tuple[int, int]:
    pool: Any = engine.pool
    return pool.checkedout(), pool.checkedin()


def _is_busy(error: OperationalError) -> bool:
    text = str(error.orig)
    return "locked" in text or "busy" in text


def _use_wal(conn: Connection) -> None:
    """Switch a SQLite file to WAL journaling (a no-op once it is WAL: the mode is stored in the
    file). SQLite answers "database is locked" at once, without waiting out the busy timeout,
    when another connection holds a lock while a file changes mode; so retry, within the busy
    timeout, as the busy handler would have."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.exec_driver_sql("PRAGMA journal_mode = WAL")
        except OperationalError as error:
            if not _is_busy(error) or time.monotonic() > deadline:
                raise
            conn.rollback()
            time.sleep(_LOCK_POLL_S)
        else:
            conn.commit()
            return


class AsyncDatabase:
    """PostgreSQL on asyncpg."""

    def __init__(self, url: URL) -> None:
        # Imported here: SQLAlchemy's asyncio extension brings its ORM (about 7 MB a process),
        # which a SQLite process does without.
        from sqlalchemy.ext.asyncio import create_async_engine

        self._engine = create_async_engine(url)
        # Single-statement reads and writes need no transaction: no BEGIN/COMMIT round trips.
        self._autocommit = self._engine.execution_options(isolation_level="AUTOCOMMIT")
        self._url = url
        self._driver_pool: Any = None  # asyncpg's, for execute_one; made on first use
        self._driver_pool_made = asyncio.Lock()
        # statement -> (its SQL, and for each positional parameter its name and, for a
        # literal of the statement's own, its value)
        self._driver_sql: dict[Executable, tuple[str, list[tuple[str, bool, Any]]]] = {}

    @property
    def sync_engine(self) -> Engine:
        return self._engine.sync_engine

    @property
    def engines(self) -> tuple[Engine, ...]:
        return (self._engine.sync_engine,)

    async def read(self, work: Callable[[Connection], T]) -> T:
        with reachable():
            async with self._autocommit.connect() as conn:
                return await conn.run_sync(work)

    async def write(self, work: Callable[[Connection], T]) -> T:
        with reachable():
            async with self._engine.begin() as conn:
                return await conn.run_sync(work)

    async def write_one(self, work: Callable[[Connection], T]) -> T:
        """Outside a transaction, PostgreSQL runs the statement as one of its own, committed
        before it answers (with synchronous_commit, as durably as a COMMIT)."""
        return await self.read(work)

    async def write_awaited(self, work: Callable[[Connection], T]) -> T:
        return await self.write(work)  # no thread to spare: it runs on the event loop anyway

    async def glance(self, work: Callable[[Connection], T]) -> T:
        return await self.read(work)

    def connections(self) -> tuple[int, int] | None:
        in_use, idle = _counted(self.sync_engine)
        driver = self._driver_pool
        if driver is not None:
            idle_ones = driver.get_idle_size()
            in_use, idle = in_use + driver.get_size() - idle_ones, idle + idle_ones
        return in_use, idle

    async def execute_one(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> Sequence[Any] | None:
        """On a connection of asyncpg's own pool, as SQL compiled once (asyncpg prepares it
        once per connection), outside a transaction."""
        sql, binds = self._compiled(statement)
        args = [params[name] if required else value for name, required, value in binds]
        for listener in DRIVER_STATEMENTS:
            listener(sql)
        with reachable():
            pool = self._driver_pool or await self._make_driver_pool()
            async with pool.acquire() as conn:
                row: Sequence[Any] | None = await conn.fetchrow(sql, *args)
                return row

    def _compiled(self, statement: Executable) -> tuple[str, list[tuple[str, bool, Any]]]:
        found = self._driver_sql.get(statement)
        if found is None:
            compiled: Any = cast(ClauseElement, statement).compile(dialect=self.sync_engine.dialect)
            binds = [
                (name, compiled.binds[name].required, compiled.binds[name].value)
                for name in compiled.positiontup
            ]
            found = self._driver_sql[statement] = (str(compiled), binds)
        return found

    async def _make_driver_pool(self) -> Any:
        async with self._driver_pool_made:
            if self._driver_pool is None:
                import asyncpg  # type: ignore[import-untyped]

                # The connection arguments SQLAlchemy's dialect would give asyncpg, less its
                # own adapter's.
                _, arguments = self.sync_engine.dialect.create_connect_args(self._url)
                for adapters in ("prepared_statement_cache_size", "prepared_statement_name_func"):
                    arguments.pop(adapters, None)
                self._driver_pool = await asyncpg.create_pool(
                    min_size=DRIVER_POOL_SIZE,
                    max_size=DRIVER_POOL_SIZE,
                    max_inactive_connection_lifetime=0,  # kept while the process lives
                    reset=_left_as_is,
                    **arguments,
                )
        return self._driver_pool

    async def migrate(self) -> None:
        async with _migration_turn(), self._engine.connect() as conn:
            await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
            await conn.run_sync(_upgrade)
            await conn.commit()

    async def close(self) -> None:
        if self._driver_pool is not None:
            await self._driver_pool.close()
        await self._engine.dispose()


async def _left_as_is(_connection: Any) -> None:
    """asyncpg resets a connection it takes back (a round trip: unlock, close cursors,
    unlisten, reset settings) unless told otherwise. execute_one's statements, each its own
    transaction, leave nothing to reset."""


@asynccontextmanager
async def _migration_turn() -> AsyncIterator[None]:
    """This process's turn to migrate, taken on an event loop. The lock is polled, not waited
    on: a blocking wait would stall this thread's event loop, and with it the migration holding
    the lock if it runs there."""
    while not _MIGRATING.acquire(blocking=False):  # noqa: ASYNC110 (no awaitable wait)
        await asyncio.sleep(_LOCK_POLL_S)
    try:
        yield
    finally:
        _MIGRATING.release()


def alembic_config(url: str | None = None) -> Config:
    """Alembic's configuration, built in code: no alembic.ini."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _upgrade(connection: Connection) -> None:
    if current_revision(connection) == head_revision():
        return  # nothing to migrate, and Alembic (relay.storage.revision) is not imported
    from alembic import command

    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names; None for another database, or one in memory."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.query.get("uri"):
        return None
    return None if parsed.database in (None, "", ":memory:") else Path(parsed.database)


async def open_database(url: str) -> SqliteDatabase | AsyncDatabase:
    """The database at `url`, its schema migrated to the latest revision. SQLite URLs may name
    any driver (`sqlite://`, `sqlite+aiosqlite://`, `sqlite+pysqlite://`): Relay always uses the
    standard library's sqlite3 on its own threads. A database that cannot be reached or opened
    is a StartupError."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    database: SqliteDatabase | AsyncDatabase
    if backend == "sqlite":
        try:
            database = SqliteDatabase(parsed.set(drivername="sqlite+pysqlite"))
        except OSError as error:  # its folder cannot be made, or its lock file written
            raise StartupError(
                f"cannot open the SQLite database {parsed.database}: {_reason(error)}"
            ) from None
    elif backend == "postgresql":
        database = AsyncDatabase(parsed)
    else:
        raise ValueError(f"unsupported database {backend!r}: use SQLite or PostgreSQL")
    try:
        await database.migrate()
    except BaseException as error:
        await database.close()
        failure = unreachable(parsed, error)
        if failure is not None:
            raise failure from None
        raise
    return database


async def schema_revision(url: str) -> str | None:
    """The schema revision of the database at `url` (None: it has no schema yet), read without
    changing anything: `relay check`. StartupError when PostgreSQL cannot be reached."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(parsed.set(drivername="sqlite+pysqlite"))
        try:
            with engine.connect() as conn:
                return current_revision(conn)
        except DatabaseError as error:
            raise unreachable(parsed, error) or error from None
        finally:
            engine.dispose()
    from sqlalchemy.ext.asyncio import create_async_engine

    async_engine = create_async_engine(parsed)
    try:
        async with async_engine.connect() as connection:
            return await connection.run_sync(current_revision)
    except Exception as error:
        failure = unreachable(parsed, error)
        if failure is not None:
            raise failure from None
        raise
    finally:
        await async_engine.dispose()


def unreachable(url: URL, error: BaseException) -> StartupError | None:
    """A failure to open the database as one line that says what to do (None for any other
    failure): a SQLite file that is not a database (or cannot be read); no PostgreSQL server
    answering, no such database, a user refused."""
    if url.get_backend_name() == "sqlite":
        if not isinstance(error, DatabaseError):
            return None
        detail = str(error.orig).splitlines()[0] if error.orig else type(error).__name__
        return StartupError(f"cannot open the SQLite database {url.database}: {detail}")
    where = f"PostgreSQL at {url.host or 'localhost'}:{url.port or 5432}"
    if isinstance(error, OSError):  # refused, an unknown host, no answer in time
        return StartupError(
            f"{where} is not answering ({_reason(error)}): start it, or correct database_url"
        )
    # Imported here: only PostgreSQL URLs come this far.
    from asyncpg import InvalidCatalogNameError, PostgresError

    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, PostgresError):
        cause = cause.__cause__  # SQLAlchemy wraps asyncpg's errors twice
    if isinstance(cause, InvalidCatalogNameError):
        return StartupError(
            f'{where} has no database "{url.database}": create it '
            f"(createdb {url.database}), or correct database_url"
        )
    # Connection exceptions (08) and refused authorizations (28): the server's own words.
    if cause is not None and str(cause.sqlstate)[:2] in ("08", "28"):
        return StartupError(f"{where} refused the connection: {cause}")
    return None


def _reason(error: OSError) -> str:
    if error.errno is not None and error.errno > 0:
        return os.strerror(error.errno)  # uvloop's strerror names the call, not the reason
    return error.strerror or str(error) or type(error).__name__  # getaddrinfo's, a timeout
