"""`python -m bench memory [--quick]`: what large stored inputs cost a Relay process in memory.

Each process remembers recent conversations (`history_cache_bytes`, `history_cache_items`) so
that the next turn of one reads only its new items. Large inputs must not turn that into a
way to pin the process's memory: the cache is bounded in bytes and never keeps one oversized
history. Here one `relay serve` (one worker, SQLite, the scripted fake provider, which echoes
the input, so each response stores its input twice) takes store=true requests with large
inputs, with the cache at its defaults and with it off; its resident memory is read from
/proc before and after.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson

from bench.gateway import table
from bench.local_model import free_port, start_relay

MB = 1_000_000
ROUTES = orjson.dumps([{"model": "echo", "provider": "fake", "upstream_model": "text"}]).decode()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@contextmanager
def relay(workdir: Path, settings: dict[str, str]) -> Iterator[tuple[str, int]]:
    """`relay serve` with one worker; yields its URL and the worker's pid."""
    port = free_port()
    process = start_relay(port, workdir, RELAY_ROUTES=ROUTES, **settings)
    try:
        yield f"http://127.0.0.1:{port}", process.pid  # one worker: it serves in this process
    finally:
        process.terminate()
        process.wait(30)


def run(size: int, count: int, settings: dict[str, str]) -> tuple[float, float]:
    """RSS in MB after a warm-up, and after `count` stored requests of `size` input bytes."""
    with (
        tempfile.TemporaryDirectory() as workdir,
        relay(Path(workdir), settings) as (url, pid),
        httpx.Client(base_url=url, timeout=300) as client,
    ):
        for _ in range(3):
            client.post("/v1/responses", json={"model": "echo", "input": "warm up"})
        before = rss_mb(pid)
        for _ in range(count):
            # Different text each time, one word: the fake provider answers in one delta.
            text = secrets.token_hex(size // 2)
            answer = client.post("/v1/responses", json={"model": "echo", "input": text})
            assert answer.status_code == 200, answer.text[:200]
        return before, rss_mb(pid)


def main(quick: bool = False) -> None:
    scenarios = [(10 * MB, 3 if quick else 30), (1 * MB, 10 if quick else 100)]
    settings = {
        "cache at its defaults": {},
        "cache off (history_cache_bytes = 0)": {"RELAY_HISTORY_CACHE_BYTES": "0"},
    }
    rows = []
    for size, count in scenarios:
        for name, values in settings.items():
            before, after = run(size, count, values)
            rows.append(
                [
                    f"{count} x {size // MB} MB inputs",
                    name,
                    f"{before:.0f}",
                    f"{after:.0f}",
                    f"{after - before:+.0f}",
                ]
            )
    print("\n## Memory: large stored inputs, one process\n")
    print(table(["requests", "history cache", "RSS before MB", "RSS after MB", "growth"], rows))
