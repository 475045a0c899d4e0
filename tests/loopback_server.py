"""The lifecycle shared by the loopback servers of the tests (`LoopbackApp`: any ASGI app under
uvicorn in a daemon thread), and by the scripted loopback upstreams (chat_upstream,
anthropic_upstream, responses_upstream: `LoopbackServer`, a Starlette app on 127.0.0.1 with a
record of every request it received).

A subclass passes its routes to `LoopbackServer.__init__`, records each request it accepts with
`record`, adds its own state and extends `reset` to clear it. `base_url` is the server's root
followed by the class's `base_path` ("" or "/v1")."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

__all__ = ["LoopbackApp", "LoopbackServer", "serve_forever"]


class LoopbackApp:
    """An ASGI app under uvicorn in a daemon thread, on a loopback address (any 127.x.y.z: Linux
    routes all of 127/8 to loopback). `uvicorn_options` go to uvicorn.Config (ssl_certfile,
    lifespan...)."""

    label = "server"  # in messages: "the loopback <label> did not start", "<label> on <url>"

    def __init__(
        self, app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0, **uvicorn_options: Any
    ) -> None:
        self.host = host
        self.port = port  # 0: any free one
        self.scheme = "https" if "ssl_certfile" in uvicorn_options else "http"
        config = uvicorn.Config(
            app, log_config=None, access_log=False, ws="none", loop="asyncio", **uvicorn_options
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def root(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root

    def start(self) -> Self:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Accepted connections inherit it: without it a response written in two pieces (its
        # head, then its body) waits for the client's delayed ACK, 40 ms a request.
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket.bind((self.host, self.port))
        self.port = self._socket.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the loopback {self.label} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LoopbackServer(LoopbackApp):
    base_path = ""  # what base_url adds to the server's root

    def __init__(
        self, routes: Sequence[BaseRoute], *, api_key: str | None = None, port: int = 0
    ) -> None:
        super().__init__(Starlette(routes=list(routes)), port=port, lifespan="off")
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    @property
    def base_url(self) -> str:
        return self.root + self.base_path

    @property
    def last(self) -> dict[str, Any]:
        """The body of the most recent request."""
        return self.requests[-1]

    def record(self, request: Request, body: dict[str, Any]) -> None:
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})

    def reset(self) -> None:
        self.requests.clear()
        self.headers.clear()


def serve_forever(make: Callable[..., LoopbackServer]) -> None:
    """`python tests/<module>.py [PORT]`: serve on PORT (else any free one) until interrupted."""
    with make(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0) as server:
        print(f"{server.label} on {server.base_url}", flush=True)
        threading.Event().wait()
