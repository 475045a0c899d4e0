"""`python -m bench limits [--quick]`: what a rate-limited request's admission and settling
cost, counted in-process and shared through Redis (127.0.0.1:6379, database 15).

One request falls under a key and a project, each with every limit on (requests, tokens and
concurrency), high enough never to bind, as in the keyed gateway benchmark. Each row admits
and settles the same number of requests, one after the other (the latency a request sees)
and 64 at a time (what a busy process spends); CPU is this process's (its syncs included),
in microseconds a request. Rows: in-process; shared, as Relay runs it (local far from the
limits); and shared with every request asked of Redis (SLACK = 0: the path near a limit,
which was every request's before).
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

from bench.gateway import table
from bench.keyed_relay import POLICY, redis_answers
from relay.access import shared_limits
from relay.access.limits import RateLimiter, Scope
from relay.models.policy import Policy

REDIS_URL = "redis://127.0.0.1:6379/15"
US = 1_000_000


@contextmanager
def slack(value: float) -> Iterator[None]:
    saved, shared_limits.SLACK = shared_limits.SLACK, value
    try:
        yield
    finally:
        shared_limits.SLACK = saved


async def one(limiter: RateLimiter, scopes: list[Scope]) -> None:
    admission = await limiter.admit(scopes, 250)
    waiting = limiter.settle(admission, 500)
    if waiting is not None:
        await waiting


async def measure(redis_url: str | None, count: int, at_once: int) -> tuple[float, float, float]:
    """(median latency us, p99 latency us, CPU us) per request."""
    limiter = RateLimiter(redis_url, timeout_s=1.0)
    policy = Policy(**POLICY)
    scopes = [Scope("key", secrets.token_hex(6), policy), Scope("project", "bench", policy)]
    try:
        for _ in range(200):  # the views are read, the process registered
            await one(limiter, scopes)
        await asyncio.sleep(0.1)
        latencies: list[float] = []

        async def worker(share: int) -> None:
            for _ in range(share):
                started = time.perf_counter()
                await one(limiter, scopes)
                latencies.append(time.perf_counter() - started)
                # A server's request waits on its client and upstream between these: the
                # syncs run there.
                await asyncio.sleep(0)

        cpu = time.process_time()
        await asyncio.gather(*(worker(count // at_once) for _ in range(at_once)))
        cpu = time.process_time() - cpu
    finally:
        await limiter.aclose()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99)]
    return statistics.median(latencies) * US, p99 * US, cpu / len(latencies) * US


def main(quick: bool = False) -> None:
    count = 640 if quick else 20_000
    variants: list[tuple[str, str | None, float]] = [("in-process", None, shared_limits.SLACK)]
    if redis_answers():
        variants += [
            ("Redis, local far from the limits", REDIS_URL, shared_limits.SLACK),
            ("Redis, every request (SLACK = 0)", REDIS_URL, 0.0),
        ]
    else:
        print("limits in Redis: skipped, no Redis answers on 127.0.0.1:6379", flush=True)
    rows = []
    for name, url, share in variants:
        for at_once in (1, 64):
            with slack(share):
                median, p99, cpu = asyncio.run(measure(url, count, at_once))
            rows.append([name, str(at_once), f"{median:.0f}", f"{p99:.0f}", f"{cpu:.1f}"])
    print(f"\n## Rate limits: admission and settling, {count:,} requests\n")
    print(table(["limits", "at once", "p50 us", "p99 us", "CPU us/request"], rows))


if __name__ == "__main__":
    main()
