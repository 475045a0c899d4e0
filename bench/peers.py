"""The servers under test, each a subprocess in its own session: Relay, LiteLLM, OGX.

Every peer gets its own virtual environment under bench/.venvs/ (gitignored), created on
first use with pip; Relay runs from the project's .venv. Nothing here outlives the benchmark:
`ManagedProcess.stop` ends the process group it started, and only that.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / "bench" / ".venvs"
RELAY_BIN = ROOT / ".venv" / "bin" / "relay"
SEALING_KEY = Fernet.generate_key().decode()
PYENV = Path("/root/.pyenv/versions")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without RELAY_* settings or proxies, plus `extra`."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("RELAY_") and "proxy" not in key.lower()
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra or {})
    return env


@dataclass
class ManagedProcess:
    """A server subprocess: started in a new session, polled until it answers, then stopped."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=clean_env)
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )

    def wait_ready(self, url: str, timeout_s: float = 60.0) -> None:
        """Poll `url` until it answers below 500; fail with the log's tail if the process dies."""
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited during start-up:\n{self.log_tail()}")
                try:
                    if client.get(url).status_code < 500:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(
            f"{self.name} did not answer {url} in {timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def pids(self) -> list[int]:
        """This process and all its descendants (read from /proc)."""
        if self.proc is None:
            return []
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session: the group is ours alone
        for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def memory_kib(pids: list[int]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in KiB over `pids`; PSS counts shared pages once."""
    rss = pss = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        rss += _field_kib(status, "VmRSS:")
        pss += _field_kib(rollup, "Pss:")
    return rss, pss


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of `pids` (all their threads) so far."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _field_kib(text: str, name: str) -> int:
    for line in text.splitlines():
        if line.startswith(name):
            return int(line.split()[1])
    return 0


# Relay --------------------------------------------------------------------------------------------


def start_relay(
    workdir: Path,
    upstream: str,
    port: int,
    workers: int,
    *,
    database: Path | None = None,
    database_url: str | None = None,
    settings: Sequence[str] = (),
    anthropic: bool = True,
    env: Mapping[str, str] | None = None,
) -> ManagedProcess:
    """Relay with SQLite (in `workdir` unless `database` names a file; or the database
    `database_url` names), no API keys, a route per nginx location (json, sse, hold, long, and
    with `anthropic` the Anthropic-shaped sse); `settings` are extra lines of its TOML file,
    `env` extra environment variables."""
    workdir.mkdir(parents=True, exist_ok=True)
    database = database or workdir / "relay.db"
    # One sealing key for every Relay of a run: those that share a database must seal alike
    # (Relay refuses to start beside an instance that generated another key).
    lines = [
        f'database_url = "{database_url or f"sqlite:///{database}"}"',
        'log_level = "info"',
        f'sealing_keys = ["{SEALING_KEY}"]',
        *settings,
    ]
    for kind in ("json", "sse", "hold", "long"):
        lines += ["", "[[routes]]", f'model = "bench-{kind}"', 'provider = "openai_chat"']
        lines += [f'base_url = "{upstream}/{kind}/v1"', 'upstream_model = "mock-model"']
    if anthropic:
        # The same canned answer, as an Anthropic Messages stream (nginx's /sse/v1/messages).
        lines += ["", "[[routes]]", 'model = "bench-claude"', 'provider = "anthropic"']
        lines += [f'base_url = "{upstream}/sse"', 'upstream_model = "mock-model"']
    config = workdir / "relay.toml"
    config.write_text("\n".join(lines) + "\n")
    argv = [str(RELAY_BIN), "serve", "--config", str(config), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--workers", str(workers)]
    proc = ManagedProcess("relay", argv, workdir / "relay.log", env=clean_env(env), cwd=workdir)
    proc.start()
    proc.wait_ready(f"http://127.0.0.1:{port}/healthz", timeout_s=90)
    return proc


# Peers: installed into their own virtual environments -----------------------------------------


@dataclass(frozen=True)
class PeerVenv:
    name: str
    requirement: str
    binary: str
    python_min: tuple[int, int] = (3, 11)

    @property
    def path(self) -> Path:
        return VENVS / self.name

    def bin(self, name: str | None = None) -> Path:
        return self.path / "bin" / (name or self.binary)

    def installed(self) -> bool:
        return self.bin().exists()

    def ensure(self) -> str | None:
        """Install if needed; None when ready, else one line saying why it is not."""
        if self.installed():
            return None
        python = find_python(self.python_min)
        if python is None:
            return (
                f"{self.name} needs Python >= {self.python_min[0]}.{self.python_min[1]}: none found"
            )
        print(f"  installing {self.requirement} into {self.path} (once) ...", flush=True)
        steps = [
            [python, "-m", "venv", str(self.path)],
            [str(self.bin("pip")), "install", "--quiet", "--upgrade", "pip"],
            [str(self.bin("pip")), "install", "--quiet", self.requirement],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = "\n".join((done.stdout + done.stderr).splitlines()[-5:])
                return f"installing {self.requirement} failed: {tail}"
        return None if self.installed() else f"{self.binary} missing after installing"


LITELLM = PeerVenv("litellm", "litellm[proxy]", "litellm")
OGX = PeerVenv("ogx", "ogx", "ogx", python_min=(3, 12))


def find_python(minimum: tuple[int, int]) -> str | None:
    """This interpreter if recent enough, else the oldest suitable pyenv one."""
    if sys.version_info[:2] >= minimum:
        return sys.executable
    found = []
    for candidate in PYENV.glob("3.*/bin/python3"):
        version = tuple(int(part) for part in candidate.parent.parent.name.split(".")[:2])
        if version >= minimum:
            found.append((version, str(candidate)))
    return min(found)[1] if found else None


def start_litellm(workdir: Path, upstream: str, port: int, workers: int) -> ManagedProcess:
    """LiteLLM's proxy: stateless bridge routes (custom_openai/) to the same upstream paths."""

    def route(name: str, prefix: str) -> dict[str, object]:
        params = {"model": "custom_openai/mock-model", "api_base": f"{upstream}/{prefix}/v1"}
        return {"model_name": name, "litellm_params": {**params, "api_key": "dummy"}}

    config = {
        "model_list": [route("mock-json", "json"), route("mock-sse", "sse")],
        "litellm_settings": {"telemetry": False, "num_retries": 0, "callbacks": []},
        "general_settings": {"master_key": LITELLM_KEY},
    }
    path = workdir / "litellm.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    argv = [str(LITELLM.bin()), "--config", str(path), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--num_workers", str(workers)]
    env = clean_env({"LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    proc = ManagedProcess("litellm", argv, workdir / "litellm.log", env=env, cwd=workdir)
    proc.start()
    proc.wait_ready(f"http://127.0.0.1:{port}/health/liveliness", timeout_s=180)
    return proc


LITELLM_KEY = "sk-bench"


# OGX (llama-stack): its own distribution config, trimmed from the `starter` one ---------------

OGX_CONFIG = """\
version: 2
distro_name: bench
apis: [inference, responses, files, vector_io, tool_runtime]
providers:
  inference:
  - provider_id: vllm
    provider_type: remote::vllm
    config: {{base_url: "{upstream}/sse/v1", api_token: fake}}
  vector_io:
  - provider_id: sqlite-vec
    provider_type: inline::sqlite-vec
    config:
      db_path: {state}/sqlite_vec.db
      persistence: {{namespace: "vector_io::sqlite_vec", backend: kv_default}}
  files:
  - provider_id: builtin-files
    provider_type: inline::localfs
    config:
      storage_dir: {state}/files
      metadata_store: {{table_name: files_metadata, backend: sql_default}}
  responses:
  - provider_id: builtin
    provider_type: inline::builtin
    config:
      persistence:
        responses: {{table_name: responses, backend: sql_default, max_write_queue_size: 10000,
                     num_writers: 4}}
  tool_runtime:
  - provider_id: model-context-protocol
    provider_type: remote::model-context-protocol
storage:
  backends:
    kv_default: {{type: kv_sqlite, db_path: {state}/kvstore.db}}
    sql_default: {{type: sql_sqlite, db_path: {state}/sql_store.db}}
  stores:
    metadata: {{namespace: registry, backend: kv_default}}
    inference: {{table_name: inference_store, backend: sql_default, max_write_queue_size: 10000,
                num_writers: 4}}
    conversations: {{table_name: openai_conversations, backend: sql_default}}
    prompts: {{table_name: prompts, backend: sql_default}}
    connectors: {{table_name: connectors, backend: sql_default}}
registered_resources:
  models:
  - {{metadata: {{}}, model_id: mock-model, provider_id: vllm, provider_model_id: mock-model,
     model_type: llm}}
"""
# tiktoken's cache file name for cl100k_base (the sha1 of its download URL). OGX insists on the
# encoding at start-up and this box cannot download it; LiteLLM's wheel ships the same file.
CL100K_CACHE_NAME = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"


def ensure_ogx(workdir: Path) -> str | None:
    """Install OGX and its distribution's dependencies; None when ready, else why not."""
    fresh = not OGX.installed()
    problem = OGX.ensure()
    if problem is not None:
        return problem
    cache = OGX.path / "tiktoken-cache"
    if not (cache / CL100K_CACHE_NAME).exists():
        shipped = list(
            LITELLM.path.glob(f"lib/python3*/site-packages/litellm/**/{CL100K_CACHE_NAME}")
        )
        if not shipped:
            return "OGX needs tiktoken's cl100k_base, taken from LiteLLM's wheel: install LiteLLM"
        cache.mkdir(exist_ok=True)
        (cache / CL100K_CACHE_NAME).write_bytes(shipped[0].read_bytes())
    if fresh or not (OGX.path / ".deps-installed").exists():
        config = write_ogx_config(workdir, "http://127.0.0.1:1")
        listed = subprocess.run(
            [str(OGX.bin()), "stack", "list-deps", str(config)],
            capture_output=True,
            text=True,
            check=False,
        )
        deps = listed.stdout.split()
        done = subprocess.run(
            [str(OGX.bin("pip")), "install", "--quiet", *deps],
            capture_output=True,
            text=True,
            check=False,
        )
        if listed.returncode != 0 or done.returncode != 0:
            return f"installing OGX's dependencies failed: {(listed.stderr + done.stderr)[-500:]}"
        (OGX.path / ".deps-installed").touch()
    return None


def write_ogx_config(workdir: Path, upstream: str) -> Path:
    state = workdir / "ogx-state"
    state.mkdir(exist_ok=True)
    path = workdir / "ogx-bench.yaml"
    path.write_text(OGX_CONFIG.format(upstream=upstream, state=state))
    return path


def start_ogx(workdir: Path, upstream: str, port: int, workers: int) -> ManagedProcess:
    """OGX with N uvicorn workers, as its own k8s benchmark runs it; SQLite state in workdir.

    On a fresh store its workers race to create their tables ("table jobs already exists"),
    one fails to start and uvicorn then stops the server: one worker creates them first.
    """
    config = write_ogx_config(workdir, upstream)
    env = clean_env(
        {
            "OGX_CONFIG": str(config),
            "OGX_DISABLE_VERSION_CHECK": "1",
            "TIKTOKEN_CACHE_DIR": str(OGX.path / "tiktoken-cache"),
        }
    )
    argv = [str(OGX.bin("uvicorn")), "ogx.core.server.server:create_app", "--factory"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers"]
    for count in (1, workers):
        proc = ManagedProcess("ogx", [*argv, str(count)], workdir / "ogx.log", env=env, cwd=workdir)
        proc.start()
        proc.wait_ready(f"http://127.0.0.1:{port}/v1/health", timeout_s=180)
        if count != workers:
            proc.stop()
    return proc


def package_version(venv: PeerVenv, package: str) -> str:
    found = sorted(venv.path.glob(f"lib/python3*/site-packages/{package}-*.dist-info"))
    return found[-1].name.removesuffix(".dist-info").split("-", 1)[1] if found else "?"
