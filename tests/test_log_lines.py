"""Log lines of `relay serve` processes: buffered, yet none lost on a normal exit, and
warnings written at once; and written while it serves (uvicorn's logging set-up closes
every handler it finds)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
from live_server import relay_serve

SCRIPT = """
import logging, sys, time
from relay import log_lines
log_lines.FLUSH_S = 3600  # only a warning, or the exit, writes the lines out
handler = log_lines.BatchedStderr()
handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
logging.getLogger().addHandler(handler)
logging.getLogger().setLevel("INFO")
for number in range(3):
    logging.info("line %d", number)
if sys.argv[1] == "warn":
    logging.warning("a warning")
    time.sleep(30)
"""


def test_every_line_is_written_by_a_normal_exit() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, "exit"], capture_output=True, text=True, timeout=30
    )
    assert done.stderr.splitlines() == ["INFO line 0", "INFO line 1", "INFO line 2"]


def test_a_warning_is_written_at_once_with_the_lines_before_it() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, "warn"], stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        started = time.monotonic()
        lines = [process.stderr.readline().strip() for _ in range(4)]
        assert time.monotonic() - started < 5  # the warning's write, not the hour's
    finally:
        process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()
    assert lines == ["INFO line 0", "INFO line 1", "INFO line 2", "WARNING a warning"]


def test_relay_serve_writes_its_lines_while_it_serves(tmp_path: Path) -> None:
    route = {"model": "fake-text", "provider": "fake", "upstream_model": "text"}
    env = {
        "RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/relay.db",
        "RELAY_ROUTES": orjson.dumps([route]).decode(),
    }
    with relay_serve(env) as relay:
        answer = httpx.post(
            f"{relay.url}/v1/responses",
            json={"model": "fake-text", "input": "hi"},
            headers={"x-request-id": "req-trace-42"},
        )
        # The time, and the request the line was written for: an operator follows a
        # client's X-Request-ID through the log.
        line = "INFO relay.access [req-trace-42]: POST /v1/responses 200 latency_ms="
        deadline = time.monotonic() + 10
        while line not in relay.log_so_far() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert " ready; models: fake-text" in relay.log_so_far() and line in relay.log_so_far()
    assert relay.output.count(line) == 1
    [written] = [found for found in relay.output.splitlines() if line in found]
    assert re.match(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO relay.access \[req-trace-42\]: ", written
    )
    assert f" response_id={answer.json()['id']} " in written
