"""Running uvicorn for `relay serve`, and the supervisor process of `relay serve --workers N`.

With several workers, uvicorn's supervisor process serves nothing: it binds the socket,
spawns the workers and restarts any that dies. `relay serve` reads and checks the
configuration, opens (and migrates) the database and says what it serves first, which takes
the settings' models, the storage layer and their libraries (about 40 MB); then it replaces
itself (`os.execv`, the same process id) with `python -m relay.launch`, which imports only
uvicorn and what writes log lines, and is handed the few settings it needs (`Launch`) as
JSON. Each worker reads the whole configuration itself (relay.cli.app_factory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import NoReturn

from relay import log_lines
from relay.observe import MULTIPROCESS_DIR


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
    """Serve until stopped: in this process with one worker, else through uvicorn's
    supervisor of `launch.workers` spawned worker processes."""
    import uvicorn

    uvicorn.run(
        "relay.cli:app_factory",
        factory=True,
        host=launch.host,
        port=launch.port,
        workers=launch.workers,
        log_level=launch.log_level,
        # uvicorn's lines go through Relay's handler (configure_logging), in its format.
        log_config=None,
        loop="uvloop",
        http="httptools",
        # A larger WebSocket message closes its socket with 1009 and the limit as reason,
        # refused by the protocol library before it is all in memory.
        ws_max_size=launch.max_body_bytes,
        # Relay writes its own access lines (relay.observe.access).
        access_log=False,
    )


def become_supervisor(launch: Launch) -> NoReturn:
    """Replace this process with the lean supervisor of `launch`'s workers; never returns.
    The interpreter's flags (-X, -W) and the environment (with the variables `relay serve`
    set from its flags) carry over."""
    logging.shutdown()  # what the batched handler still holds is written before the exec
    sys.stdout.flush()
    sys.stderr.flush()
    flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    encoded = json.dumps(asdict(launch), separators=(",", ":"))
    os.execv(sys.executable, [sys.executable, *flags, "-m", "relay.launch", encoded])


def supervise(launch: Launch) -> None:
    with _summed_metrics(launch):
        run(launch)


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


def main(encoded: str) -> int:
    launch = Launch(**json.loads(encoded))
    log_lines.configure(launch.log_level, launch.log_format)
    supervise(launch)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
