"""Rate limits: requests and tokens per minute, and requests at once, per key and per project.

Admission is all or nothing: every limit of every scope a request falls under is read first,
and the request is counted (a unit of each requests window, a lease in each concurrency set)
only when none of them refuses. A refused request counts against nothing, so a refusal by one
limit never uses up another's window, and the `x-ratelimit-remaining-*` headers say what was
counted.

The windows are sliding window counters: a fixed minute's count plus the previous minute's,
weighted by how much of it the sliding window still covers. Requests at once are a set of
leases with deadlines, so that the leases of a process that died lapse instead of holding
their slots forever. Both live in this process's memory or, with `redis_url`, in Redis
(`shared_limits.py`: counted locally while far from a limit and synced every few
milliseconds; near it, one Lua script reads, decides and counts; docs/design.md, "Rate
limits"). Tokens: the input
is estimated from the body's size and only tested at admission; the real usage is added when
the response settles, up to what the window has left.

Redis being unreachable does not stop traffic: the check is skipped (and logged once a minute).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple, Protocol

from relay.errors import RateLimited
from relay.models.policy import Policy
from relay.supervisor import process_id

log = logging.getLogger("relay.limits")
WINDOW_S = 60
# A lease outlives its request by at most this long when its process dies holding it.
LEASE_S = 15 * 60
_QUIET_S = 60.0
_RESTING_S = 1.0  # after a failure of the limits store, how long requests skip it
_LIMITERS = itertools.count()

Limit = Literal["requests", "tokens", "concurrent"]
CHECKS: tuple[Limit, ...] = ("requests", "tokens", "concurrent")  # in the order tested


@dataclass(slots=True)
class Scope:
    """One limited owner: ('key', id) or ('project', id), and its policy."""

    kind: str
    owner: str
    policy: Policy

    @property
    def name(self) -> str:
        return f"{self.kind} '{self.owner}'"

    def key(self, limit: Limit) -> str:
        """Where `limit` of this owner is counted (a Redis key, or a dict's in memory)."""
        return f"relay:{limit}:{self.kind}:{self.owner}"


@dataclass(frozen=True, slots=True)
class Window:
    """A per-minute limit as read at one moment: the current minute's count, the previous
    minute's, and how much of the current minute has passed (0 to 1)."""

    limit: int
    current: int
    previous: int
    elapsed: float

    def left(self) -> int:
        return max(0, self.limit - math.floor(self.previous * (1 - self.elapsed) + self.current))

    def admits(self, cost: int) -> bool:
        # A request larger than the whole window could never pass: it passes when the
        # window is empty. (The Redis script decides the same way.)
        left = self.left()
        return left > 0 and left >= min(cost, self.limit)

    def reset_in(self) -> float:
        """Seconds until a unit frees up: one of the previous minute's, as its weight falls,
        or, with none, the current minute's, when it ends."""
        ends_in = WINDOW_S * (1 - self.elapsed)
        if self.previous:
            return ends_in % (WINDOW_S / self.previous)
        return ends_in if self.current else 0.0


@dataclass(frozen=True, slots=True)
class Reading:
    """One scope's limits as admission found them, before anything was counted; None where
    the scope has no such limit."""

    requests: Window | None
    tokens: Window | None
    running: tuple[int, int] | None  # (leases held, the most allowed)


class Refusal(NamedTuple):
    scope: int  # its index among the request's scopes
    limit: Limit


def first_refusal(readings: Sequence[Reading], estimated: int) -> Refusal | None:
    """The first limit that refuses the request, in scope order, or None."""
    for index, reading in enumerate(readings):
        if reading.requests is not None and not reading.requests.admits(1):
            return Refusal(index, "requests")
        if reading.tokens is not None and not reading.tokens.admits(estimated):
            return Refusal(index, "tokens")
        if reading.running is not None and reading.running[0] >= reading.running[1]:
            return Refusal(index, "concurrent")
    return None


class Counters(Protocol):
    """Where the windows and leases are kept."""

    async def admit(
        self, scopes: Sequence[Scope], estimated: int, lease: str
    ) -> tuple[list[Reading], Refusal | None]:
        """Read every limit of `scopes`; when none refuses, count the request and hold
        `lease` in every concurrency set, in the same step."""

    def settle(
        self, scopes: Sequence[Scope], lease: str | None, tokens: int
    ) -> Awaitable[None] | None:
        """Free `lease` and add `tokens` to the token windows, up to what each has left:
        at once (None), or what to await for it."""

    async def aclose(self) -> None: ...

    async def ping(self) -> None:
        """Raise unless the store answers (readiness)."""


class MemoryCounters:
    """The counters of this process: dicts, read and changed without waiting, so that no
    other request's admission interleaves."""

    _SWEEP_AT = 10_000  # windows; older ones are dropped when there are more

    def __init__(self) -> None:
        # key -> [the current minute, its count, the previous minute's count]
        self._windows: dict[str, list[int]] = {}
        # key -> lease -> its deadline (monotonic)
        self._leases: dict[str, dict[str, float]] = {}

    async def admit(
        self, scopes: Sequence[Scope], estimated: int, lease: str
    ) -> tuple[list[Reading], Refusal | None]:
        now, clock = time.time(), time.monotonic()
        readings: list[Reading] = []
        counted: list[list[int]] = []
        holders: list[dict[str, float]] = []
        for scope in scopes:
            policy = scope.policy
            requests = tokens = running = None
            if policy.rpm is not None:
                counts, requests = self._window(scope.key("requests"), policy.rpm, now)
                counted.append(counts)
            if policy.tpm is not None:
                _, tokens = self._window(scope.key("tokens"), policy.tpm, now)
            if policy.max_concurrent is not None:
                held = self._held(scope.key("concurrent"), policy.max_concurrent, clock)
                running = (len(held), policy.max_concurrent)
                holders.append(held)
            readings.append(Reading(requests, tokens, running))
        refusal = first_refusal(readings, estimated)
        if refusal is None:
            for counts in counted:
                counts[1] += 1
            for held in holders:
                held[lease] = clock + LEASE_S
        return readings, refusal

    def settle(self, scopes: Sequence[Scope], lease: str | None, tokens: int) -> None:
        now = time.time()
        for scope in scopes:
            if lease is not None:
                self._leases.get(scope.key("concurrent"), {}).pop(lease, None)
            tpm = scope.policy.tpm
            if tpm is not None and tokens > 0:
                counts, window = self._window(scope.key("tokens"), tpm, now)
                counts[1] += min(tokens, window.left())

    async def aclose(self) -> None:
        pass

    async def ping(self) -> None:
        pass  # memory always answers

    def _window(self, key: str, limit: int, now: float) -> tuple[list[int], Window]:
        """The key's counts, moved on to the minute `now` falls in, and what they say."""
        minute, into = divmod(now, WINDOW_S)
        counts = self._windows.get(key)
        if counts is None:
            if len(self._windows) >= self._SWEEP_AT:
                self._sweep(int(minute))
            counts = self._windows[key] = [int(minute), 0, 0]
        elif counts[0] != minute:
            previous = counts[1] if counts[0] == minute - 1 else 0
            counts[:] = [int(minute), 0, previous]
        return counts, Window(limit, counts[1], counts[2], into / WINDOW_S)

    def _sweep(self, minute: int) -> None:
        for key, counts in list(self._windows.items()):
            if counts[0] < minute - 1:
                del self._windows[key]

    def _held(self, key: str, most: int, clock: float) -> dict[str, float]:
        """The key's leases; those whose deadline passed are dropped when they could
        matter (the set is full)."""
        leases = self._leases.setdefault(key, {})
        if len(leases) >= most:
            for lease, deadline in list(leases.items()):
                if deadline < clock:
                    del leases[lease]
        return leases


@dataclass(slots=True)
class Admission:
    """What one admitted request holds: its lease (in every concurrency set of its scopes),
    and the headers to send."""

    scopes: list[Scope]
    lease: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: '250ms', '12s', '1m30s'."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


class RateLimiter:
    def __init__(self, redis_url: str | None = None, *, timeout_s: float = 0.05) -> None:
        # Lease ids, unique across the processes sharing a Redis (and the limiters of one
        # process): made here.
        self._process = f"{process_id()}.{next(_LIMITERS)}"
        self._leases = itertools.count()
        self._counters: Counters = MemoryCounters()
        if redis_url:
            from relay.access.shared_limits import SharedCounters

            self._counters = SharedCounters(redis_url, timeout_s, self._process)
        # After a failure the store is left alone for _RESTING_S: requests pass at once
        # rather than each waiting out the bound.
        self._resting_until = 0.0
        self._warned = -_QUIET_S

    async def admit(self, scopes: list[Scope], estimated_tokens: int) -> Admission:
        """Count one request against every scope, or raise RateLimited (429) naming the
        limit it is over, having counted nothing. Tokens are only tested here (the estimate
        of the input); the real count is added by `settle`."""
        lease = f"{self._process}:{next(self._leases)}"
        if self._resting_until and time.monotonic() < self._resting_until:
            return Admission(scopes)
        try:
            readings, refusal = await self._counters.admit(scopes, estimated_tokens, lease)
        except Exception as error:  # the shared store is down: let it through
            self._failed(error)
            return Admission(scopes)
        self._resting_until = 0.0
        if refusal is None:
            return Admission(scopes, lease, _headers(readings, counted=True))
        raise _refused(scopes[refusal.scope], readings[refusal.scope], refusal.limit, readings)

    def settle(self, admission: Admission, tokens: int) -> Awaitable[None] | None:
        """Free what an admitted request held and add its tokens (its settled usage; 0 for
        one that never started) to its scopes' windows, up to what each has left: a window
        is then full until it slides. Done at once in memory, and with Redis for a request
        admitted locally (None); else what to await for it (it never raises: a failure lets
        the next requests pass)."""
        lease, admission.lease = admission.lease, None
        waiting = self._counters.settle(admission.scopes, lease, tokens)
        return None if waiting is None else self._guarded(waiting)

    async def _guarded(self, waiting: Awaitable[None]) -> None:
        try:
            await waiting
        except Exception as error:
            self._failed(error)

    async def aclose(self) -> None:
        await self._counters.aclose()

    async def ping(self) -> None:
        """Raise unless the limits' store answers (readiness; Redis when configured)."""
        await self._counters.ping()

    def _failed(self, error: Exception) -> None:
        now = time.monotonic()
        self._resting_until = now + _RESTING_S
        if now - self._warned >= _QUIET_S:
            self._warned = now
            log.warning(
                "rate limits not checked: the limits store failed (%s); requests pass "
                "unlimited until it answers again",
                type(error).__name__ if isinstance(error, TimeoutError) else error,
            )


def _headers(readings: Sequence[Reading], counted: bool) -> dict[str, str]:
    """The headers OpenAI clients read, after the request was counted (or not); with a key
    and a project limited, the tighter of each."""
    headers: dict[str, str] = {}
    for reading in readings:
        if reading.requests is not None:
            requests = reading.requests
            if counted:
                requests = replace(requests, current=requests.current + 1)
            _header(headers, "requests", requests)
        if reading.tokens is not None:
            _header(headers, "tokens", reading.tokens)
    return headers


def _header(headers: dict[str, str], kind: str, window: Window) -> None:
    name = f"x-ratelimit-remaining-{kind}"
    remaining = window.left()
    current = headers.get(name)
    if current is not None and int(current) <= remaining:
        return
    headers[f"x-ratelimit-limit-{kind}"] = str(window.limit)
    headers[name] = str(remaining)
    headers[f"x-ratelimit-reset-{kind}"] = duration(window.reset_in())


def _refused(
    scope: Scope, reading: Reading, limit: Limit, readings: Sequence[Reading]
) -> RateLimited:
    window = {"requests": reading.requests, "tokens": reading.tokens}.get(limit)
    if window is not None:
        what, reset_in = f"{window.limit} {limit} per minute", window.reset_in()
    else:
        most = scope.policy.max_concurrent or 0
        what, reset_in = f"{most} request{'s' if most > 1 else ''} at once", 1.0
    wait = max(reset_in, 0.05)
    headers = {
        **_headers(readings, counted=False),
        "retry-after": str(math.ceil(wait)),
        "retry-after-ms": str(math.ceil(wait * 1000)),
    }
    return RateLimited(
        f"Rate limit reached for {scope.name}: {what}. Try again in {duration(wait)}.",
        headers=headers,
    )
