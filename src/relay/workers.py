"""The supervisor of `relay serve --workers N`: it binds the socket, starts N worker processes
that share it, and keeps them running. It serves nothing, so it holds the standard library
and Relay's log handler only: uvicorn's supervisor imports uvicorn, asyncio and OpenSSL into
it and starts multiprocessing's resource tracker beside it (about 27 MB for the tree;
docs/design.md, "The supervisor of `--workers N`").

What it does, as uvicorn's supervisor does:
- A worker is `python -m relay.launch --worker ...` (relay.launch.serve_worker): uvicorn's
  server on the inherited socket, with a thread that answers this process's health checks
  through a pair of pipes, saying whether the server has started.
- Every CHECK_S each worker is checked: one that exited, or that does not answer within
  HEALTH_TIMEOUT_S (its process wedged), is killed and replaced. One that exited with
  STARTUP_FAILURE (uvicorn's status for an application that could not start) would fail the
  same way again: the supervisor stops every worker and exits with that status.
- SIGINT, SIGTERM, SIGQUIT: each worker gets SIGTERM (uvicorn's graceful shutdown) and is
  waited for; a second such signal kills those still running. SIGHUP replaces the workers
  one at a time, each once its replacement has started. SIGTTIN adds a worker, SIGTTOU
  retires one.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Callable

log = logging.getLogger("relay.workers")

CHECK_S = 0.5
HEALTH_TIMEOUT_S = 5.0  # uvicorn's default timeout_worker_healthcheck
READY_TIMEOUT_S = 60.0  # a replacement (SIGHUP) that has not started by then is given up
STARTUP_FAILURE = 3  # uvicorn.config.STARTUP_FAILURE (tests/test_workers.py holds them equal)
_STOP = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
_HANDLED = (*_STOP, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


def listen(host: str, port: int) -> socket.socket:
    """The socket every worker accepts on, bound as uvicorn binds it (SO_REUSEADDR, IPv6 for
    a host with a colon), inheritable. Raises OSError when it cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    listener.set_inheritable(True)
    return listener


def answer_health_checks(ping_fd: int, pong_fd: int, started: Callable[[], bool]) -> None:
    """A worker's side of the health checks, on a thread of its own: each byte read is
    answered with whether the server has started. Returns when the supervisor's end closes."""
    while os.read(ping_fd, 1):
        os.write(pong_fd, b"1" if started() else b"0")


class Worker:
    """One worker process and the pipes of its health checks."""

    def __init__(self, command: list[str], listener: socket.socket) -> None:
        ping_read, self._ping = os.pipe()
        self._pong, pong_write = os.pipe()
        fds = (listener.fileno(), ping_read, pong_write)
        self.process = subprocess.Popen([*command, *map(str, fds)], pass_fds=fds)
        os.close(ping_read)
        os.close(pong_write)
        self._fds: tuple[int, ...] = (self._ping, self._pong)
        log.info("started worker process [%d]", self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def health(self, timeout: float) -> bool | None:
        """Whether the worker's server has started (True) or not yet (False); None when the
        worker has exited or does not answer within `timeout`."""
        if self.process.poll() is not None:
            return None
        try:
            os.write(self._ping, b"?")
            ready, _, _ = select.select([self._pong], [], [], timeout)
            answer = os.read(self._pong, 1) if ready else b""
        except OSError:
            return None
        return {b"1": True, b"0": False}.get(answer)

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    def wait(self) -> int:
        """Its exit status, once it has exited; its pipes closed (once)."""
        status = self.process.wait()
        fds, self._fds = self._fds, ()
        for fd in fds:
            os.close(fd)
        return status


class Workers:
    def __init__(self, command: list[str], listener: socket.socket, count: int) -> None:
        self._command = command
        self._listener = listener
        self._count = count
        self._workers: list[Worker] = []
        self._signals: list[int] = []
        self._stopping = False
        self._status = 0

    def run(self) -> int:
        """Serve until stopped; the exit status: 0, or STARTUP_FAILURE."""
        for number in _HANDLED:
            signal.signal(number, lambda number, _frame: self._signals.append(number))
        log.info("started supervisor process [%d]", os.getpid())
        self._workers = [self._start() for _ in range(self._count)]
        while not self._stopping:
            time.sleep(CHECK_S)
            self._handle_signals()
            self._keep_alive()
        for worker in self._workers:
            worker.terminate()
        self._wait_all()
        log.info("stopped supervisor process [%d]", os.getpid())
        return self._status

    def _start(self) -> Worker:
        return Worker(self._command, self._listener)

    def _handle_signals(self) -> None:
        while self._signals and not self._stopping:
            number = self._signals.pop(0)
            if number in _STOP:
                self._stopping = True
            elif number == signal.SIGHUP:
                self._replace_all()
            elif number == signal.SIGTTIN:
                self._workers.append(self._start())
            elif len(self._workers) > 1:  # SIGTTOU
                retired = self._workers.pop()
                retired.terminate()
                retired.wait()

    def _keep_alive(self) -> None:
        for index, worker in enumerate(self._workers):
            if self._stopping or worker.health(HEALTH_TIMEOUT_S) is not None:
                continue
            wedged = worker.process.poll() is None
            worker.kill()
            status = worker.wait()
            if status == STARTUP_FAILURE:
                log.error(
                    "worker process [%d] could not start; stopping the supervisor", worker.pid
                )
                self._stopping = True
                self._status = STARTUP_FAILURE
                return
            if wedged:
                log.error(
                    "worker process [%d] did not answer its health check in %g s; "
                    "killed and replaced",
                    worker.pid,
                    HEALTH_TIMEOUT_S,
                )
            else:
                log.warning("worker process [%d] exited (%d); replacing it", worker.pid, status)
            self._workers[index] = self._start()

    def _replace_all(self) -> None:
        """Each worker replaced by a new one once the new one has started."""
        for index, old in enumerate(list(self._workers)):
            new = self._start()
            deadline = time.monotonic() + READY_TIMEOUT_S
            while new.health(HEALTH_TIMEOUT_S) is False and time.monotonic() < deadline:
                if self._signals and self._signals[0] in _STOP:
                    break
                time.sleep(0.1)
            if new.health(HEALTH_TIMEOUT_S) is not True:
                new.kill()
                new.wait()
                log.error(
                    "new worker process [%d] did not start; keeping [%d], restart abandoned",
                    new.pid,
                    old.pid,
                )
                return
            old.terminate()
            old.wait()
            self._workers[index] = new

    def _wait_all(self) -> None:
        """Wait for every worker to exit; another stop signal meanwhile kills them."""
        self._signals.clear()
        for worker in self._workers:
            while worker.process.poll() is None:
                if any(number in _STOP for number in self._signals):
                    for each in self._workers:
                        each.kill()
                time.sleep(0.05)
            worker.wait()


def supervise(command: list[str], host: str, port: int, count: int) -> int:
    """Bind host:port and run `count` workers (`command`, to which each worker's listener,
    ping and pong file descriptors are appended) until stopped; the exit status."""
    try:
        listener = listen(host, port)
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", host, port, error)
        return STARTUP_FAILURE
    with listener:
        return Workers(command, listener, count).run()
