"""Limits shared through Redis by two limiters (as two processes would share them): counted
locally while far from the limit, with at most the stated error over it, and exact near it.
(Across two `relay serve` processes: test_two_instances.py.)"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import pytest
from live_server import free_port
from team import clear_of_a_minute_end

from relay.access import shared_limits
from relay.access.limits import Admission, RateLimiter, Scope
from relay.errors import RateLimited
from relay.models.policy import Policy
from relay.ui.guard import SIGN_IN_FAILURES, SignInThrottle

# Longer than a sync and its answer, on a loaded machine too.
SYNCED_S = 10 * shared_limits.SYNC_S


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[tuple[RateLimiter, RateLimiter]]:
    # A generous timeout: a call that outlasted the default would let a request pass
    # unlimited, as designed, and miscount here.
    limiters = RateLimiter(redis_url, timeout_s=2.0), RateLimiter(redis_url, timeout_s=2.0)
    yield limiters
    for limiter in limiters:
        await limiter.aclose()


def scope(**policy: int) -> Scope:
    return Scope("key", secrets.token_hex(6), Policy(**policy))


class ScriptCalls:
    """Counts the calls a limiter makes to Redis."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, limiters: tuple[RateLimiter, ...]):
        self.count = 0
        for limiter in limiters:
            counters: Any = limiter._counters
            monkeypatch.setattr(counters, "_script", self._counting(counters._script))

    def _counting(self, script: Any) -> Any:
        async def call(keys: list[str], args: list[Any]) -> Any:
            self.count += 1
            return await script(keys, args)

        return call


async def warm(pair: tuple[RateLimiter, RateLimiter], key: Scope) -> list[Admission]:
    """One admission each (asked of Redis: neither knows the key yet), then a sync, after
    which each knows the other is there."""
    held = [await limiter.admit([key], 1) for limiter in pair]
    await asyncio.sleep(SYNCED_S)
    return held


async def test_far_from_the_limit_two_limiters_stay_within_the_bound(
    pair: tuple[RateLimiter, RateLimiter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both admit as fast as they can, locally, until the window is full: together they
    admit the limit, never less, and at most SLACK of it more, asking Redis a fraction of
    the time."""
    clear_of_a_minute_end(15.0)
    rpm = 4_000
    key = scope(rpm=rpm)
    await warm(pair, key)
    calls = ScriptCalls(monkeypatch, pair)
    admitted = 2

    async def until_refused(limiter: RateLimiter) -> None:
        nonlocal admitted
        while True:
            try:
                await limiter.admit([key], 1)
            except RateLimited:
                return
            admitted += 1
            await asyncio.sleep(0)  # the other limiter, and the syncs, run between

    await asyncio.gather(until_refused(pair[0]), until_refused(pair[1]))
    assert rpm <= admitted <= rpm + shared_limits.SLACK * rpm
    assert calls.count < admitted / 4, (calls.count, admitted)
    await asyncio.sleep(SYNCED_S)
    for limiter in pair:  # once full, full for both
        with pytest.raises(RateLimited):
            await limiter.admit([key], 1)


async def test_near_the_limit_the_count_is_exact_across_limiters(
    pair: tuple[RateLimiter, RateLimiter],
) -> None:
    """Requests slower than a sync, alternating between the limiters, near the limit:
    exactly the limit passes, the last headers count down one by one, and both refuse."""
    clear_of_a_minute_end(15.0)
    rpm = 1_000
    key = scope(rpm=rpm)
    await warm(pair, key)
    for _ in range(rpm - 60):  # far: counted locally, mostly
        await pair[0].admit([key], 1)
    await asyncio.sleep(SYNCED_S)
    remaining = []
    for index in range(100):
        try:
            admission = await pair[index % 2].admit([key], 1)
        except RateLimited as refusal:
            assert refusal.headers["x-ratelimit-remaining-requests"] == "0"
            break
        remaining.append(int(admission.headers["x-ratelimit-remaining-requests"]))
        await asyncio.sleep(shared_limits.SYNC_S / 2)
    assert len(remaining) == 58  # 1,000 less the two warming and the 940 before
    assert remaining[-10:] == list(range(9, -1, -1))
    for limiter in pair:
        refusal = await refused(limiter, key)
        assert "1000 requests per minute" in refusal.message


async def refused(limiter: RateLimiter, key: Scope) -> RateLimited:
    with pytest.raises(RateLimited) as raised:
        await limiter.admit([key], 1)
    return raised.value


async def test_requests_at_once_near_the_limit_are_exact_across_limiters(
    pair: tuple[RateLimiter, RateLimiter],
) -> None:
    """Leases taken locally count for the other limiter: the slots fill up exactly, and one
    freed on one limiter is taken on the other."""
    most = 500
    key = scope(max_concurrent=most)
    first, second = pair
    held = list(zip(pair, await warm(pair, key), strict=True))
    held += [(first, await first.admit([key], 1)) for _ in range(most - 40)]
    await asyncio.sleep(SYNCED_S)
    while True:
        limiter = pair[len(held) % 2]
        try:
            held.append((limiter, await limiter.admit([key], 1)))
        except RateLimited as refusal:
            assert "500 requests at once" in refusal.message
            break
        await asyncio.sleep(shared_limits.SYNC_S / 2)
    assert len(held) == most
    await refused(first, key)
    await settle(*held.pop(5), 0)  # one taken locally, on the first limiter
    await asyncio.sleep(SYNCED_S)
    held.append((second, await second.admit([key], 1)))
    await refused(second, key)
    for limiter, admission in held:
        await settle(limiter, admission, 0)


async def settle(limiter: RateLimiter, admission: Admission, tokens: int) -> None:
    waiting = limiter.settle(admission, tokens)
    if waiting is not None:
        await waiting


async def fill(limiter: RateLimiter, key: Scope, fast: int = 0) -> list[Admission]:
    """Leases from `limiter` until it is refused: the first `fast` as fast as it can, then
    slower than a sync (near the limit, where counts are exact)."""
    taken = []
    while True:
        try:
            taken.append(await limiter.admit([key], 1))
        except RateLimited:
            return taken
        await asyncio.sleep(0 if len(taken) < fast else shared_limits.SYNC_S / 2)


async def test_the_local_leases_of_a_limiter_that_stops_syncing_lapse(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that dies holding leases taken locally (it never settles them, it stops
    syncing) frees them within LIVE_S, not at their 15-minute deadline."""
    monkeypatch.setattr(shared_limits, "LIVE_S", 0.5)
    most = 2_000
    key = scope(max_concurrent=most)
    gone, staying = RateLimiter(redis_url, timeout_s=2.0), RateLimiter(redis_url, timeout_s=2.0)
    try:
        first = await warm((gone, staying), key)
        await settle(gone, first[0], 0)  # taken in Redis: it would hold its slot 15 minutes
        lost = [await gone.admit([key], 1) for _ in range(100)]  # local, all but a few
        await asyncio.sleep(SYNCED_S)
        held = [first[1], *await fill(staying, key, fast=most - 200)]
        assert len(held) + len(lost) == most
        # It dies: it stops syncing, its leases are never settled.
        counters: Any = gone._counters
        counters._syncing.cancel()
        await asyncio.sleep(shared_limits.LIVE_S + SYNCED_S)
        freed = await fill(staying, key)
        # Those taken locally: those taken in Redis hold their slots.
        assert 85 <= len(freed) <= 100, len(freed)
        for admission in held + freed:
            await settle(staying, admission, 0)
    finally:
        await staying.aclose()
        await gone.aclose()


async def test_sign_ins_are_still_throttled_while_the_shared_store_is_down() -> None:
    """The API's limits let requests through while Redis fails; guessing keys in the console
    stays limited (per process), and a sign-in that did not fail holds nothing afterwards."""
    limiter = RateLimiter(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    throttle = SignInThrottle(limiter)
    try:
        for _ in range(SIGN_IN_FAILURES):
            attempt = await throttle.admit("192.0.2.7")
            assert attempt.limiter is throttle.fallback
            await attempt.end(failed=True)
        with pytest.raises(RateLimited):
            await throttle.admit("192.0.2.7")
        attempt = await throttle.admit("192.0.2.8")  # another address is let in
        await attempt.end(failed=False)
        assert attempt.admission.lease is None  # freed
    finally:
        await limiter.aclose()
