"""Running uvicorn for `relay serve`, and the supervisor process of `relay serve --workers N`.

With several workers, the supervisor process serves nothing: it binds the socket, starts the
workers and restarts any that dies (relay.workers). `relay serve` reads and checks the
configuration, opens (and migrates) the database and says what it serves first, which takes
the settings' models, the storage layer and their libraries (about 40 MB); then it replaces
itself (`os.execv`, the same process id) with `python -m relay.launch`, which imports only
the standard library and what writes log lines, and is handed the few settings it needs
(`Launch`) as JSON. Each worker (`python -m relay.launch --worker`) runs uvicorn's server on
the inherited socket and reads the whole configuration itself (relay.cli.app_factory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, NoReturn

from relay import log_lines, workers
from relay.observe import MULTIPROCESS_DIR

WS_MAX_QUEUE = 2


@dataclass(frozen=True, slots=True)
class Launch:
    """What uvicorn, and the supervisor around it, need of the settings."""

    host: str
    port: int
    workers: int
    log_level: str
    log_format: str
    max_body_bytes: int
    metrics_host: str
    metrics_port: int | None


def run(launch: Launch) -> None:
    """Serve in this process until stopped (`--workers 1`)."""
    import uvicorn

    uvicorn.run("relay.cli:app_factory", host=launch.host, port=launch.port, **_options(launch))


def serve_worker(launch: Launch, listener_fd: int, ping_fd: int, pong_fd: int) -> None:
    """A worker of `--workers N`: uvicorn's server on the supervisor's socket, answering its
    health checks (relay.workers)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config("relay.cli:app_factory", **_options(launch)))
    threading.Thread(
        target=workers.answer_health_checks,
        args=(ping_fd, pong_fd, lambda: server.started),
        name="health-checks",
        daemon=True,
    ).start()
    server.run(sockets=[socket.socket(fileno=listener_fd)])


def _options(launch: Launch) -> dict[str, Any]:
    return {
        "factory": True,
        "log_level": launch.log_level,
        # uvicorn's lines go through Relay's handler (configure_logging), in its format.
        "log_config": None,
        "loop": "uvloop",
        "http": "httptools",
        # A larger WebSocket message closes its socket with 1009 and the limit as reason,
        # refused by the protocol library before it is all in memory.
        "ws_max_size": launch.max_body_bytes,
        # Messages the protocol library holds before Relay reads them (uvicorn's default is
        # 32, up to 32 times `ws_max_size` a socket): Relay reads each at once, queueing or
        # refusing it, so a small buffer costs nothing and a flood waits in TCP instead.
        "ws_max_queue": WS_MAX_QUEUE,
        # Relay writes its own access lines (relay.observe.access).
        "access_log": False,
    }


def become_supervisor(launch: Launch) -> NoReturn:
    """Replace this process with the lean supervisor of `launch`'s workers; never returns.
    The interpreter's flags (-X, -W) and the environment (with the variables `relay serve`
    set from its flags) carry over."""
    logging.shutdown()  # what the batched handler still holds is written before the exec
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [*_interpreter(), "-m", "relay.launch", _encoded(launch)])


def supervise(launch: Launch) -> int:
    """Run `launch.workers` workers until stopped; the exit status."""
    worker = [*_interpreter(), "-m", "relay.launch", "--worker", _encoded(launch)]
    with _summed_metrics(launch):
        return workers.supervise(worker, launch.host, launch.port, launch.workers)


def _interpreter() -> list[str]:
    """This interpreter with its flags (-X, -W)."""
    flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    return [sys.executable, *flags]


def _encoded(launch: Launch) -> str:
    return json.dumps(asdict(launch), separators=(",", ":"))


@contextlib.contextmanager
def _summed_metrics(launch: Launch) -> Iterator[None]:
    """Several workers: each writes its metrics to files in a folder of this run's
    (prometheus_client's multiprocess mode, chosen by the variable when a worker imports the
    library), which any worker's /metrics, and this process on metrics_port, sum."""
    folder = tempfile.mkdtemp(prefix="relay-metrics-")
    os.environ[MULTIPROCESS_DIR] = folder
    try:
        if launch.metrics_port is not None:
            from relay.observe.metrics import serve_summed

            serve_summed(launch.metrics_host, launch.metrics_port)
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str]) -> int:
    """`relay.launch LAUNCH`: the supervisor; `relay.launch --worker LAUNCH LISTENER PING
    PONG`: one of its workers (LAUNCH: the settings as JSON; the others: file descriptors)."""
    worker = argv[:1] == ["--worker"]
    encoded, *fds = argv[1:] if worker else argv
    launch = Launch(**json.loads(encoded))
    log_lines.configure(launch.log_level, launch.log_format)
    if worker:
        listener_fd, ping_fd, pong_fd = map(int, fds)
        serve_worker(launch, listener_fd, ping_fd, pong_fd)
        return 0
    return supervise(launch)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
