"""The supervisor of `relay serve --workers N` (relay.workers), as an operator meets it: a real
`relay serve --workers 2`, its worker processes killed, wedged, replaced on SIGHUP, added and
retired with SIGTTIN/SIGTTOU, and stopped; and a worker that cannot start stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn.config
from live_server import ServeProcess, free_port, relay_serve

from relay import workers

ROUTES = '[{"model": "text", "provider": "fake"}]'


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/relay.db",
        "RELAY_DATA_DIR": str(tmp_path),
        "RELAY_ROUTES": ROUTES,
    }


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _eventually(condition: Callable[[], bool], within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.1)


def _serving(relay: ServeProcess) -> bool:
    """Answers a response."""
    answer = httpx.post(
        f"{relay.url}/v1/responses", json={"model": "text", "input": "hi"}, timeout=10
    )
    return answer.status_code == 200 and answer.json()["status"] == "completed"


def test_the_startup_failure_status_is_uvicorns() -> None:
    assert workers.STARTUP_FAILURE == uvicorn.config.STARTUP_FAILURE


def test_workers_are_kept_running_replaced_and_stopped(tmp_path: Path) -> None:
    with relay_serve(_env(tmp_path), "--workers", "2") as relay:
        supervisor = relay.process.pid
        first = _children(supervisor)
        # Two workers and nothing else (no resource tracker beside them).
        assert len(first) == 2
        for pid in first:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"relay.launch" in command and b"--worker" in command

        # A worker killed outright is replaced; the other serves meanwhile.
        os.kill(first[0], signal.SIGKILL)
        _eventually(lambda: first[0] not in _children(supervisor))
        _eventually(lambda: len(_children(supervisor)) == 2)
        assert first[1] in _children(supervisor)
        assert _serving(relay)
        assert f"worker process [{first[0]}] exited (-9); replacing it" in relay.log_so_far()

        # SIGHUP: every worker replaced, one at a time, each once its replacement started.
        before = _children(supervisor)
        os.kill(supervisor, signal.SIGHUP)
        _eventually(lambda: not set(before) & set(_children(supervisor)))
        assert len(_children(supervisor)) == 2
        assert _serving(relay)

        # SIGTTIN adds a worker, SIGTTOU retires one.
        os.kill(supervisor, signal.SIGTTIN)
        _eventually(lambda: len(_children(supervisor)) == 3)
        os.kill(supervisor, signal.SIGTTOU)
        _eventually(lambda: len(_children(supervisor)) == 2)

        # A wedged worker (stopped: it cannot answer its health check) is killed and replaced.
        wedged = _children(supervisor)[0]
        os.kill(wedged, signal.SIGSTOP)
        _eventually(lambda: wedged not in _children(supervisor), workers.HEALTH_TIMEOUT_S + 10)
        _eventually(lambda: len(_children(supervisor)) == 2)
        assert f"worker process [{wedged}] did not answer its health check" in relay.log_so_far()
        assert _serving(relay)
        last = _children(supervisor)

    # Stopped (SIGINT): its workers stopped with it, the supervisor's status 0.
    assert relay.process.returncode == 0, relay.output
    for pid in last:
        assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)
    assert f"stopped supervisor process [{supervisor}]" in relay.output
    assert "Traceback" not in relay.output


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]


def _supervise(command: list[str], port: int) -> subprocess.CompletedProcess[str]:
    """workers.supervise(command, one worker, on port) in a Python of its own, to its end."""
    script = (
        "import sys\n"
        "from relay import log_lines, workers\n"
        "log_lines.configure('info', 'text')\n"
        f"sys.exit(workers.supervise({command!r}, '127.0.0.1', {port}, 1))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )


def test_a_worker_that_cannot_start_stops_the_supervisor() -> None:
    """Exit status 3 (uvicorn's for an application that could not start) would recur at
    every restart: the supervisor stops the others and exits with it."""
    done = _supervise([sys.executable, "-c", "import sys; sys.exit(3)"], free_port())
    assert done.returncode == workers.STARTUP_FAILURE, done.stderr
    assert "could not start; stopping the supervisor" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_port_taken_is_one_line_and_the_startup_failure_status() -> None:
    with workers.listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        taken.listen()
        done = _supervise(["true"], port)
    assert done.returncode == workers.STARTUP_FAILURE
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
