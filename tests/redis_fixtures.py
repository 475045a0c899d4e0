"""Redis for tests: the `redis_url` of a Redis that nothing else in the session writes to.

The server on 127.0.0.1:6379 (or $RELAY_TEST_REDIS_PORT) is used when it answers PING: the
session gets one of its databases 9 to 15, picked at random, flushed at the start and at the
end (Relay's keys cannot be given a prefix, so a database of their own keeps them apart).
Otherwise a throwaway `redis-server` is started from the installed binary on a free port, with
no persistence, and stopped at the end of the session. When neither works, Redis tests are
skipped, saying why.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

__all__ = ["redis_url"]

HOST = "127.0.0.1"
# Where to look for a running server; a throwaway one is started when none answers there.
PORT = int(os.environ.get("RELAY_TEST_REDIS_PORT", "6379"))
# The databases of a shared server that tests may take (and flush).
TEST_DATABASES = range(9, 16)


def _client(port: int, db: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, db=db, socket_timeout=5, socket_connect_timeout=5)


def _answers(port: int, db: int) -> bool:
    client = _client(port, db)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _flush(port: int, db: int) -> None:
    client = _client(port, db)
    try:
        client.flushdb()
    finally:
        client.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class Throwaway:
    """A `redis-server` of this session's own: a free port, nothing written to disk."""

    def __init__(self, binary: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="relay-redis-"))
        self.port = _free_port()
        self._log = (self.root / "server.log").open("wb")
        try:
            self.process = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    HOST,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.root),
                    "--daemonize",
                    "no",
                ],
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
        except OSError:
            self._cleanup()
            raise
        deadline = time.monotonic() + 20
        while not _answers(self.port, 0):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (self.root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start: {log.strip()}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database for this session (redis://host:port/db); skips the test when there
    is none."""
    db = secrets.choice(TEST_DATABASES)
    if _answers(PORT, db):
        _flush(PORT, db)
        try:
            yield f"redis://{HOST}:{PORT}/{db}"
        finally:
            _flush(PORT, db)
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            f"REDIS TESTS SKIPPED: Redis is not installed: no Redis answers on {HOST}:{PORT} "
            f"(database {db}) and there is no redis-server on PATH to start one"
        )
    try:
        server = Throwaway(binary)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
        pytest.skip(
            f"REDIS TESTS SKIPPED: no Redis answers on {HOST}:{PORT} (database {db}) and "
            f"a throwaway redis-server ({binary}) could not be started: {error}"
        )
    try:
        yield server.url
    finally:
        server.stop()
