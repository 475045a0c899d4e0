"""Log lines of `relay serve` processes: buffered, yet none lost on a normal exit, and
warnings written at once."""

from __future__ import annotations

import subprocess
import sys
import time

SCRIPT = """
import logging, sys, time
from relay.log_lines import BatchedStderr
handler = BatchedStderr()
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
        assert time.monotonic() - started < 10
    finally:
        process.kill()
        process.wait()
        if process.stderr is not None:
            process.stderr.close()
    assert lines == ["INFO line 0", "INFO line 1", "INFO line 2", "WARNING a warning"]
