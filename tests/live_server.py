"""Real Relay servers for tests, on loopback and a free port: the app under uvicorn in a
background thread (`relay_server`), or `relay serve` in a process of its own (`relay_serve`);
and any `relay` command run to its end (`relay`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import uvicorn

from relay.api.app import create_app
from relay.config import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running(app: object, port: int | None = None) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 and yield its base URL; stop it afterwards."""
    port = port or free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",  # type: ignore[arg-type]
        lifespan="on",
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@contextmanager
def relay_server(settings: Settings) -> Iterator[str]:
    with running(create_app(settings)) as url:
        yield url


class ServeProcess:
    """`relay serve` as a user starts it: its own process, settings from the environment."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: IO[bytes]) -> None:
        self.process = process
        self.url = url
        self._log = log  # a file, not a pipe: a pipe nobody reads would block the server
        self.output = ""  # everything it printed (stdout and stderr), once it stopped

    def log_so_far(self) -> str:
        """What it has printed until now (a read at offset 0 that leaves the file's position,
        which the process writes at, alone)."""
        size = os.fstat(self._log.fileno()).st_size
        return os.pread(self._log.fileno(), size, 0).decode(errors="replace")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.seek(0)
        self.output = self._log.read().decode(errors="replace")
        return self.output


def relay(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`relay ...` run to its end in a process of its own, with `env` added to this
    environment."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("relay")), *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def refused_in_one_line(done: subprocess.CompletedProcess[str], saying: str) -> str:
    """The one line of stderr that says `saying`, from a command that failed without a
    traceback."""
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if saying in line]
    assert len(lines) == 1, done.stderr
    return lines[0]


@contextmanager
def relay_serve(env: dict[str, str], *args: str) -> Iterator[ServeProcess]:
    """Run `relay serve --port <free>` with `env` added to this environment; yields once
    /healthz answers, stops it (SIGINT, as Ctrl+C) on the way out."""
    port = free_port()
    relay = Path(sys.executable).with_name("relay")
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [str(relay), "serve", "--port", str(port), *args],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        served = ServeProcess(process, f"http://127.0.0.1:{port}", log)
        try:
            _wait_until_healthy(served)
            yield served
        finally:
            served.stop()


def _wait_until_healthy(served: ServeProcess) -> None:
    deadline = time.monotonic() + 60
    while True:
        if served.process.poll() is not None:
            raise RuntimeError(f"relay serve exited: {served.stop()}")
        try:
            if httpx.get(f"{served.url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"relay serve did not start: {served.stop()}")
        time.sleep(0.05)
