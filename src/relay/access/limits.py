"""Rate limits: requests and tokens per minute, and requests at once, per key and per project.

The per-minute windows are the `limits` library's sliding window counters, in this process's
memory or, with `redis_url`, in Redis, so that every instance counts against one window.
Concurrency is not a window but a count of leases, which `limits` does not offer: in memory a
counter, in Redis a sorted set of leases scored by their deadline, so that the leases of a
process that died lapse instead of holding their slots forever.

Redis being unreachable does not stop traffic: the check is skipped (and logged once a minute).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from limits import RateLimitItem, RateLimitItemPerMinute, WindowStats
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from relay.access.policy import Policy
from relay.errors import RateLimited

log = logging.getLogger("relay.limits")
# A lease outlives its request by at most this long when its process dies holding it.
LEASE_S = 15 * 60
_REDIS_PREFIX = "relay:concurrent:"
_QUIET_S = 60.0


_PROCESS = secrets.token_hex(8)  # lease ids: unique across instances sharing a Redis
_LEASES = itertools.count()


@lru_cache(maxsize=1024)
def _per_minute(amount: int) -> RateLimitItemPerMinute:
    return RateLimitItemPerMinute(amount)


class Windows(Protocol):
    """The part of a `limits` limiter Relay uses (the async API)."""

    async def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool: ...

    async def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats: ...


class InMemoryWindows:
    """Sliding window counters in this process: `limits`' algorithm (a fixed window's count
    plus the previous window's, weighted by how much of it the sliding window still covers),
    written here because `limits`' in-memory storages expire keys with a task per hit (async)
    or a timer thread every 10 ms (sync): 68 us a request for the requests-per-minute check,
    where these counters take a few (docs/design.md). Redis goes through `limits`."""

    _SWEEP_AT = 10_000  # entries; older windows are dropped when there are more

    def __init__(self) -> None:
        # key -> [index of the current window, its count, the previous window's count]
        self._counts: dict[str, list[int]] = {}

    def _window(
        self, item: RateLimitItem, identifiers: tuple[str, ...], now: float
    ) -> tuple[list[int], float]:
        """The key's counts, moved on to the window `now` falls in, and the previous
        window's weight."""
        length = item.get_expiry()
        index, into = divmod(now, length)
        key = item.key_for(*identifiers)
        counts = self._counts.get(key)
        if counts is None:
            if len(self._counts) >= self._SWEEP_AT:
                self._sweep(int(index))
            counts = self._counts[key] = [int(index), 0, 0]
        elif counts[0] != index:
            previous = counts[1] if counts[0] == index - 1 else 0
            counts[:] = [int(index), 0, previous]
        return counts, 1 - into / length

    def _sweep(self, index: int) -> None:
        for key, counts in list(self._counts.items()):
            if counts[0] < index - 1:
                del self._counts[key]

    async def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        counts, weight = self._window(item, identifiers, time.time())
        if math.floor(counts[2] * weight + counts[1]) + cost > item.amount:
            return False
        counts[1] += cost
        return True

    async def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        now = time.time()
        counts, weight = self._window(item, identifiers, now)
        current, previous = counts[1], counts[2]
        remaining = max(0, item.amount - math.floor(previous * weight + current))
        length = item.get_expiry()
        window_ends_in = length * weight
        # The next unit to free up: one of the previous window's, as its weight falls, or
        # the current window's, when it ends.
        reset_in = window_ends_in % (length / previous) if previous else window_ends_in
        if not (current or previous):
            reset_in = 0.0
        return WindowStats(now + reset_in, remaining)


@dataclass(slots=True)
class Scope:
    """One limited owner: ('key', id) or ('project', id), and its policy."""

    kind: str
    owner: str
    policy: Policy

    @property
    def name(self) -> str:
        return f"{self.kind} '{self.owner}'"


@dataclass(slots=True)
class Admission:
    """What one admitted request holds: its concurrency leases, and the headers to send."""

    scopes: list[Scope]
    headers: dict[str, str] = field(default_factory=dict)
    leases: list[tuple[Scope, str]] = field(default_factory=list)


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: '250ms', '12s', '1m30s'."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


class RateLimiter:
    def __init__(self, redis_url: str | None = None) -> None:
        self._redis: Any = None
        self._windows: Windows
        if redis_url:
            import redis.asyncio

            storage = RedisStorage(
                "async+" + redis_url, implementation="redispy", wrap_exceptions=True
            )
            self._windows = SlidingWindowCounterRateLimiter(storage)
            self._redis = redis.asyncio.Redis.from_url(redis_url)
        else:
            self._windows = InMemoryWindows()
        # In memory as in Redis: the leases of each owner, with their deadlines, so that a
        # slot whose request never settled (a stream whose client left before it began)
        # lapses instead of leaking.
        self._running: dict[str, dict[str, float]] = {}
        self._warned = -_QUIET_S

    async def admit(self, scopes: list[Scope], estimated_tokens: int) -> Admission:
        """Count one request against every scope, or raise RateLimited (429) naming the
        limit it is over. Tokens are only tested here (the estimate of the input); the real
        count is added by `record` when the response is settled."""
        admission = Admission(scopes)
        checks = []
        for scope in scopes:
            checks += [
                self._requests(scope, admission),
                self._tokens(scope, estimated_tokens, admission),
                self._acquire(scope, admission),
            ]
        if self._redis is None:
            # In memory a check takes microseconds: one after the other, no tasks.
            outcomes: list[BaseException | None] = []
            for check in checks:
                try:
                    await check
                    outcomes.append(None)
                except Exception as error:
                    outcomes.append(error)
        else:
            # Each check is a round trip to Redis: all at once, so a request waits for
            # about two (a window's hit, then its numbers), not for six.
            outcomes = await asyncio.gather(*checks, return_exceptions=True)
        refusals = [outcome for outcome in outcomes if isinstance(outcome, RateLimited)]
        if refusals:
            await self.release(admission)
            raise refusals[0]
        for outcome in outcomes:
            if isinstance(outcome, Exception):  # the shared store is down: let it through
                self._warn(outcome)
            elif isinstance(outcome, BaseException):
                raise outcome
        return admission

    async def record(self, admission: Admission, tokens: int) -> None:
        """Add a settled response's tokens to its scopes' windows (up to what is left: the
        window is then full until it slides)."""
        try:
            for scope in admission.scopes:
                tpm = scope.policy.tpm
                if tpm is None or tokens <= 0:
                    continue
                item = _per_minute(tpm)
                if not await self._windows.hit(
                    item, scope.kind, scope.owner, "tokens", cost=tokens
                ):
                    stats = await self._windows.get_window_stats(
                        item, scope.kind, scope.owner, "tokens"
                    )
                    if stats.remaining > 0:
                        await self._windows.hit(
                            item, scope.kind, scope.owner, "tokens", cost=stats.remaining
                        )
        except Exception as error:
            self._warn(error)

    async def release(self, admission: Admission) -> None:
        leases, admission.leases = admission.leases, []
        for scope, lease in leases:
            key = _REDIS_PREFIX + scope.kind + ":" + scope.owner
            try:
                if self._redis is None:
                    self._running.get(key, {}).pop(lease, None)
                else:
                    await self._redis.zrem(key, lease)
            except Exception as error:
                self._warn(error)

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def _requests(self, scope: Scope, admission: Admission) -> None:
        rpm = scope.policy.rpm
        if rpm is None:
            return
        item = _per_minute(rpm)
        allowed = await self._windows.hit(item, scope.kind, scope.owner, "requests")
        stats = await self._windows.get_window_stats(item, scope.kind, scope.owner, "requests")
        reset_in = max(0.0, stats.reset_time - time.time())
        self._header(admission, "requests", rpm, stats.remaining, reset_in)
        if not allowed:
            raise self._refusal(scope, f"{rpm} requests per minute", reset_in, admission)

    async def _tokens(self, scope: Scope, estimated: int, admission: Admission) -> None:
        tpm = scope.policy.tpm
        if tpm is None:
            return
        item = _per_minute(tpm)
        stats = await self._windows.get_window_stats(item, scope.kind, scope.owner, "tokens")
        reset_in = max(0.0, stats.reset_time - time.time())
        self._header(admission, "tokens", tpm, stats.remaining, reset_in)
        # A request larger than the whole window could never pass: it passes when the
        # window is empty.
        if stats.remaining < min(estimated, tpm) or stats.remaining <= 0:
            raise self._refusal(scope, f"{tpm} tokens per minute", reset_in, admission)

    async def _acquire(self, scope: Scope, admission: Admission) -> None:
        limit = scope.policy.max_concurrent
        if limit is None:
            return
        key = _REDIS_PREFIX + scope.kind + ":" + scope.owner
        lease = f"{_PROCESS}:{next(_LEASES)}"
        if self._redis is None:
            now = time.monotonic()
            leases = self._running.setdefault(key, {})
            if len(leases) >= limit:
                for held, deadline in list(leases.items()):
                    if deadline < now:
                        del leases[held]
            if len(leases) >= limit:
                raise self._refusal(
                    scope, f"{limit} request{'s' if limit > 1 else ''} at once", 1.0, admission
                )
            leases[lease] = now + LEASE_S
        else:
            now = time.time()
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(key, "-inf", now)
                pipe.zadd(key, {lease: now + LEASE_S})
                pipe.zcard(key)
                pipe.expire(key, LEASE_S)
                _, _, running, _ = await pipe.execute()
            if running > limit:
                await self._redis.zrem(key, lease)
                raise self._refusal(
                    scope, f"{limit} request{'s' if limit > 1 else ''} at once", 1.0, admission
                )
        admission.leases.append((scope, lease))

    @staticmethod
    def _header(
        admission: Admission, kind: str, limit: int, remaining: int, reset_in: float
    ) -> None:
        """The headers OpenAI clients read; with a key and a project limited, the tighter."""
        name = f"x-ratelimit-remaining-{kind}"
        current = admission.headers.get(name)
        if current is not None and int(current) <= remaining:
            return
        admission.headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        admission.headers[name] = str(remaining)
        admission.headers[f"x-ratelimit-reset-{kind}"] = duration(reset_in)

    @staticmethod
    def _refusal(scope: Scope, what: str, reset_in: float, admission: Admission) -> RateLimited:
        wait = max(reset_in, 0.05)
        headers = {
            **admission.headers,
            "retry-after": str(math.ceil(wait)),
            "retry-after-ms": str(math.ceil(wait * 1000)),
        }
        return RateLimited(
            f"Rate limit reached for {scope.name}: {what}. Try again in {duration(wait)}.",
            headers=headers,
        )

    def _warn(self, error: Exception) -> None:
        now = time.monotonic()
        if now - self._warned >= _QUIET_S:
            self._warned = now
            log.warning("rate limits not checked: the limits store failed (%s)", error)
