"""The upstream that is never the bottleneck: nginx answering canned chat completions.

The config (bench/nginx/nginx.conf.in) and bodies (bench/nginx/*.json, *.sse) are rendered
into a temp dir; nginx runs in the foreground (`daemon off`) as our child, on a loopback port.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from string import Template
from typing import Any

from bench import peers
from bench.loadgen import PROMPT, Target
from bench.peers import ManagedProcess, clean_env

NGINX_DIR = Path(__file__).resolve().parent / "nginx"
APT_COMMAND = "apt-get update && apt-get install -y nginx wrk"
# The holding stream: its head arrives at once, then HOLD_RATE bytes a second of SSE comments
# (":\n"), so it stays open for about HOLD_PADDING_LINES * 2 / HOLD_RATE seconds.
HOLD_PADDING_LINES = 600
HOLD_RATE = 1
LONG_DELTAS = 1000  # content chunks of the long stream (/long/): about as many events


def missing_tools() -> list[str]:
    return [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]


def require_tools(benchmark: str) -> None:
    """Exit with status 2, saying what to run, when nginx, wrk or Relay's own binary is
    missing."""
    missing = missing_tools()
    if missing:
        print(f"the {benchmark} benchmark needs {' and '.join(missing)}; run:\n  {APT_COMMAND}")
        sys.exit(2)
    if not peers.RELAY_BIN.exists():
        print(f"{peers.RELAY_BIN} is missing: run `make` (or `make bench`) first")
        sys.exit(2)


def _nginx_string(text: str) -> str:
    """`text` as the inside of a single-quoted nginx string (its parser undoes these escapes)."""
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def _sse_events(text: str) -> list[str]:
    return [event + "\n\n" for event in text.split("\n\n") if event.strip()]


def render_config(prefix: Path, port: int) -> Path:
    chat_json = (NGINX_DIR / "chat.json").read_text().strip()
    chat_sse = (NGINX_DIR / "chat.sse").read_text()
    head = (NGINX_DIR / "hold-head.sse").read_text()
    # finish chunk, usage chunk and [DONE]: the held stream ends honestly, minutes later
    tail = "".join(_sse_events(chat_sse)[-3:])
    (prefix / "hold.sse").write_text(head + ":\n" * HOLD_PADDING_LINES + tail)
    events = _sse_events(chat_sse)
    (prefix / "long.sse").write_text(events[0] + events[1] * LONG_DELTAS + tail)
    models = (NGINX_DIR / "models.json").read_text().strip()
    template = Template((NGINX_DIR / "nginx.conf.in").read_text())
    text = template.substitute(
        prefix=str(prefix),
        port=port,
        chat_json=_nginx_string(chat_json),
        chat_sse=_nginx_string(chat_sse),
        # the response head (status line and headers, under 300 bytes) plus the first events
        hold_after=len(head.encode()) + 300,
        hold_rate=HOLD_RATE,
        models_json=_nginx_string(models),
        messages_sse=_nginx_string((NGINX_DIR / "messages.sse").read_text()),
    )
    config = prefix / "nginx.conf"
    config.write_text(text)
    return config


def start_nginx(workdir: Path, port: int) -> ManagedProcess:
    prefix = workdir / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    return run_nginx(prefix, render_config(prefix, port), f"http://127.0.0.1:{port}/v1/models")


def run_nginx(prefix: Path, config: Path, ready_url: str) -> ManagedProcess:
    """nginx in the foreground on `config` (checked first), once `ready_url` answers."""
    where = ["-c", str(config), "-p", str(prefix), "-e", str(prefix / "error.log")]
    test = subprocess.run(
        ["nginx", "-t", "-q", *where], capture_output=True, text=True, check=False
    )
    if test.returncode != 0:
        raise RuntimeError(f"nginx rejected {config}:\n{test.stderr}")
    proc = ManagedProcess(
        "nginx", ["nginx", *where], prefix / "stdout.log", env=clean_env(), cwd=prefix
    )
    proc.start()
    proc.wait_ready(ready_url, timeout_s=15)
    return proc


def direct_target(upstream: str) -> Target:
    """The chat-completions request itself, straight to the upstream: the baseline."""
    body: dict[str, Any] = {
        "model": "mock-model",
        "messages": [{"role": "user", "content": PROMPT}],
    }
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    url, stream_url = (f"{upstream}/{p}/v1/chat/completions" for p in ("json", "sse"))
    return Target("direct (nginx)", url, body, stream_url, stream_body)
