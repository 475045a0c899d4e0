"""The container image serves a real request with its embedded model: `make image-test` builds
it (deploy/build-image.sh) and runs this with RELAY_IMAGE naming it; plain `make test` skips it
(the build compiles llama.cpp, many minutes).

The image is run two ways, each skipped where this machine cannot: as a container (`podman
run`, host network), and from its file system in a chroot as the image's user, with its
environment, working directory and command (root, podman, unshare, chroot), for machines
where containers cannot start (no cgroups, no rlimits for the runtime to set, ...)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from live_server import free_port

IMAGE = os.environ.get("RELAY_IMAGE", "")
MODEL = "smollm2-135m-instruct"
KEY = "sk-image-test-" + uuid.uuid4().hex
KEYS = {"RELAY_API_KEYS": '[{"key_env": "RELAY_TEST_KEY"}]', "RELAY_TEST_KEY": KEY}


def _why_not() -> str | None:
    if not IMAGE:
        return "RELAY_IMAGE is not set: `make image-test` builds the image and runs this test"
    if shutil.which("podman") is None:
        return "podman is not installed (it builds and runs the image: make image)"
    exists = subprocess.run(["podman", "image", "exists", IMAGE], capture_output=True)
    if exists.returncode != 0:
        return f"image {IMAGE} is not built (make image)"
    return None


WHY_NOT = _why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    inspected = podman("image", "inspect", IMAGE)
    assert inspected.returncode == 0, inspected.stderr
    image = json.loads(inspected.stdout)[0]
    image_config: dict[str, Any] = image["Config"]
    # podman shows a docker-format image's health check beside its config.
    image_config.setdefault("Healthcheck", image.get("Healthcheck"))
    return image_config


def image_env(config: dict[str, Any]) -> dict[str, str]:
    return dict(entry.split("=", 1) for entry in config["Env"])


def test_the_image_runs_relay_as_its_own_user_with_a_data_volume(config: dict[str, Any]) -> None:
    env = image_env(config)
    assert config["User"] == "relay"
    assert config["Entrypoint"] == ["relay"] and config["Cmd"] == ["serve"]
    assert "8080/tcp" in config["ExposedPorts"]
    assert env["RELAY_HOST"] == "0.0.0.0" and env["RELAY_PORT"] == "8080"
    assert "/var/lib/relay" in config["Volumes"]
    assert env["RELAY_DATABASE_URL"] == "sqlite:////var/lib/relay/relay.db"
    assert env["RELAY_DATA_DIR"] == "/var/lib/relay"
    assert config["WorkingDir"] == "/var/lib/relay"
    # Kept by the docker image format (OCI image configs have no health check).
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])


class Serving(Protocol):
    url: str

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        """`command` beside the server, as the image's user, with its environment."""
        ...

    def uid(self) -> int:
        """The user id the server runs as."""
        ...

    def log(self) -> str: ...


class Runner(Protocol):
    def once(self, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        """The image's entrypoint with `args` (its command when none), run to its end."""
        ...

    def serve(self, env: dict[str, str]) -> AbstractContextManager[Serving]:
        """The image's command, serving on a free port, until the block ends."""
        ...


def wait_until_healthy(url: str, alive: Callable[[], bool], log: Callable[[], str]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if not alive():
            raise AssertionError(f"relay stopped:\n{log()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"relay did not answer /healthz in 180 s:\n{log()}")


class Container:
    """`podman run` on the host's network (where containers can start here)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def once(self, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return podman("run", "--rm", "--network", "host", *self._env(env), IMAGE, *args)

    def _env(self, env: dict[str, str]) -> list[str]:
        return [option for name, value in env.items() for option in ("-e", f"{name}={value}")]

    @contextmanager
    def serve(self, env: dict[str, str]) -> Iterator[Serving]:
        port = free_port()
        name = f"relay-image-test-{uuid.uuid4().hex[:8]}"
        environment = self._env({**env, "RELAY_PORT": str(port)})
        started = podman("run", "-d", "--name", name, "--network", "host", *environment, IMAGE)
        assert started.returncode == 0, started.stderr

        class InContainer:
            url = f"http://127.0.0.1:{port}"

            def run(self, *command: str) -> subprocess.CompletedProcess[str]:
                return podman("exec", name, *command)

            def uid(self) -> int:
                return int(podman("exec", name, "id", "-u").stdout)

            def log(self) -> str:
                done = podman("logs", name)
                return done.stdout + done.stderr

        def running() -> bool:
            state = podman("inspect", "-f", "{{.State.Running}}", name)
            return state.stdout.strip() == "true"

        serving = InContainer()
        try:
            wait_until_healthy(serving.url, running, serving.log)
            yield serving
        finally:
            podman("stop", "-t", "20", name)
            podman("rm", "-f", "-v", name)


class Chroot:
    """The image's file system (a container's, writable, mounted by podman), run in a chroot in
    a mount namespace of its own (its /proc and /dev), as the image's user."""

    def __init__(self, config: dict[str, Any], root: Path) -> None:
        self.config = config
        self.root = root
        name = config["User"]
        passwd = (root / "etc/passwd").read_text().splitlines()
        (entry,) = [line.split(":") for line in passwd if line.split(":")[0] == name]
        self.user = f"{entry[2]}:{entry[3]}"
        self.home = entry[5]

    def command(self, env: dict[str, str], argv: list[str]) -> tuple[list[str], dict[str, str]]:
        script = (
            'root=$1 user=$2 dir=$3; shift 3; mount -t proc proc "$root/proc"'
            ' && mount --rbind /dev "$root/dev"'
            ' && exec chroot --userspec="$user" "$root" env -C "$dir" "$@"'
        )
        command = ["unshare", "--mount", "--", "sh", "-c", script, "sh"]
        command += [str(self.root), self.user, self.config["WorkingDir"], *argv]
        return command, {"HOME": self.home, **image_env(self.config), **env}

    def exec(self, env: dict[str, str], argv: list[str]) -> subprocess.CompletedProcess[str]:
        command, environment = self.command(env, argv)
        return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120)

    def once(self, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return self.exec(env, [*self.config["Entrypoint"], *(args or self.config["Cmd"])])

    @contextmanager
    def serve(self, env: dict[str, str]) -> Iterator[Serving]:
        port = free_port()
        argv = [*self.config["Entrypoint"], *self.config["Cmd"]]
        command, environment = self.command({**env, "RELAY_PORT": str(port)}, argv)
        chroot = self
        with tempfile.TemporaryFile() as output:
            process = subprocess.Popen(
                command, env=environment, stdout=output, stderr=subprocess.STDOUT
            )

            class InChroot:
                url = f"http://127.0.0.1:{port}"

                def run(self, *command: str) -> subprocess.CompletedProcess[str]:
                    return chroot.exec({**env, "RELAY_PORT": str(port)}, list(command))

                def uid(self) -> int:
                    status = Path(f"/proc/{process.pid}/status").read_text()
                    (line,) = [line for line in status.splitlines() if line.startswith("Uid:")]
                    return int(line.split()[1])

                def log(self) -> str:
                    output.seek(0)
                    return output.read().decode(errors="replace")

            serving = InChroot()
            try:
                wait_until_healthy(serving.url, lambda: process.poll() is None, serving.log)
                yield serving
            finally:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture(scope="module", params=["container", "chroot"])
def runner(request: pytest.FixtureRequest, config: dict[str, Any]) -> Iterator[Runner]:
    if request.param == "container":
        probe = podman("run", "--rm", "--network", "host", IMAGE, "--version")
        if probe.returncode != 0:
            reason = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"podman cannot run containers on this machine: {reason}")
        yield Container(config)
        return
    if os.geteuid() != 0:
        pytest.skip("the chroot run needs root (podman mount, unshare, chroot)")
    for tool in ("unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"the chroot run needs {tool}")
    created = podman("create", IMAGE)
    assert created.returncode == 0, created.stderr
    container = created.stdout.strip()
    try:
        mounted = podman("mount", container)
        assert mounted.returncode == 0, mounted.stderr
        yield Chroot(config, Path(mounted.stdout.strip()))
    finally:
        podman("umount", container)
        podman("rm", "-f", "-v", container)


def test_without_keys_it_refuses_to_serve_on_every_interface(runner: Runner) -> None:
    done = runner.once({})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refusing to serve on 0.0.0.0 without API keys" in done.stderr


def test_it_answers_a_request_with_the_embedded_model(
    runner: Runner, config: dict[str, Any]
) -> None:
    with runner.serve(KEYS) as relay:
        assert relay.uid() != 0
        assert httpx.get(f"{relay.url}/healthz", timeout=10).status_code == 200
        # The embedded model loads beside the listening server: not ready until it has.
        deadline = time.monotonic() + 60
        while (ready := httpx.get(f"{relay.url}/readyz", timeout=10)).status_code != 200:
            assert ready.json()["checks"]["model smollm2-135m-instruct"] == "loading", ready.text
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.1)

        # Structured output: the grammar ends the answer, so it completes in a few tokens.
        schema = {
            "type": "object",
            "properties": {"greeting": {"type": "string", "maxLength": 20}},
            "required": ["greeting"],
            "additionalProperties": False,
        }
        body = {
            "model": MODEL,
            "input": "Greet me in JSON.",
            "max_output_tokens": 64,
            "text": {"format": {"type": "json_schema", "name": "greeting", "schema": schema}},
        }
        refused = httpx.post(f"{relay.url}/v1/responses", json=body, timeout=10)
        assert refused.status_code == 401, refused.text

        auth = {"authorization": f"Bearer {KEY}"}
        answer = httpx.post(f"{relay.url}/v1/responses", json=body, headers=auth, timeout=120)
        assert answer.status_code == 200, answer.text
        response = answer.json()
        assert response["status"] == "completed", response
        assert response["model"] == MODEL
        assert response["usage"]["output_tokens"] > 0
        (message,) = [item for item in response["output"] if item["type"] == "message"]
        assert set(json.loads(message["content"][0]["text"])) == {"greeting"}, response

        # Stored in the image's data volume (SQLite).
        stored = httpx.get(f"{relay.url}/v1/responses/{response['id']}", headers=auth, timeout=10)
        assert stored.status_code == 200 and stored.json()["id"] == response["id"]

        # The image's own health check passes.
        kind, *healthcheck = config["Healthcheck"]["Test"]
        assert kind == "CMD"
        check = relay.run(*healthcheck)
        assert check.returncode == 0, check.stdout + check.stderr
