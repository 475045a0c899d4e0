"""Rate limits shared by every instance through Redis, with Redis off the request's path
while a limit is far from full (docs/design.md, "Rate limits").

Each process keeps a view of every shared counter it uses: what Redis last reported (every
process's counts) plus what this process counted since. Far from a limit, a request is
admitted against that view and counted here; a task sends what was counted and reads the
counters back every SYNC_S, one script call for all of them. Near a limit, or with a view
too old, the request goes to Redis as before: one script sends what this process counted for
those counters, reads, decides and counts, atomically.

The error bound: a process admits locally at most SLACK / P of a limit before Redis has it
(P: the processes syncing, which Redis counts), and only while its view leaves 2 x SLACK of
the limit free, so the admissions Redis cannot see are at most SLACK of the limit, and a
window admits at most limit x (1 + SLACK) (docs/design.md gives the argument). Limits under
P / SLACK (100 per process) are always checked in Redis: exact, as before.

Requests at once: a lease taken in Redis is a member of a sorted set scored by its deadline;
a lease taken locally only adds one to this process's count, which the syncs write in a
hash beside the set and which counts while the process is alive (it syncs), so the local
leases of a process that died lapse within LIVE_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay.access.limits import (
    CHECKS,
    LEASE_S,
    WINDOW_S,
    Limit,
    Reading,
    Refusal,
    Scope,
    Window,
)

# The share of each limit that the processes together may admit unseen by Redis.
SLACK = 0.01
SYNC_S = 0.02  # how often a process sends its counts and reads the counters back
FRESH_S = 0.25  # a view older than this (Redis slow or down) admits nothing locally
# A counter unused this long is no longer read: a sync costs 5 us of CPU a counter read
# (and 0.17 ms a call), so a counter used every KEEP_S + FRESH_S pays at most five reads a
# request. One used less often goes to Redis, whose answer makes its view fresh again.
KEEP_S = 0.1
LIVE_S = 5.0  # a process that has not synced for this long is dead: its leases lapse
_REGISTRY = "relay:limits:processes"
_US = 1_000_000

# Every call may first add what this process counted locally (the "flush"). Windows are
# hashes {m: minute, c: its count, p: the previous minute's count}; the leases taken in
# Redis, sorted sets scored by deadline (ms); those taken locally, a hash {process: count}
# beside each set. Times are Redis's own (TIME), so that every instance reads the same
# minute. Replies are integers: Lua numbers reach Redis truncated.
_SCRIPT = """
local time = redis.call('TIME')
local now_us = tonumber(time[1]) * 1000000 + tonumber(time[2])
local now_ms = math.floor(now_us / 1000)
local length_us = tonumber(ARGV[2]) * 1000000
local lease_ms = tonumber(ARGV[3]) * 1000
local process = ARGV[4]
local minute = math.floor(now_us / length_us)
local weight = 1 - (now_us % length_us) / length_us
-- KEYS[1] is the registry of live processes; the rest, and ARGV from 5, are read in order.
local key_at, arg_at = 1, 4
local function next_key() key_at = key_at + 1; return KEYS[key_at] end
local function next_arg() arg_at = arg_at + 1; return ARGV[arg_at] end
local function next_number() return tonumber(next_arg()) end

local function read(key)
  local state = redis.call('HMGET', key, 'm', 'c', 'p')
  local at = tonumber(state[1])
  if at == minute then return tonumber(state[2]), tonumber(state[3]) end
  if at == minute - 1 then return 0, tonumber(state[2]) end
  return 0, 0
end

local function left(limit, current, previous)
  return math.max(0, limit - math.floor(previous * weight + current))
end

local function write(key, current, previous)
  redis.call('HSET', key, 'm', minute, 'c', current, 'p', previous)
  redis.call('PEXPIRE', key, 2 * length_us / 1000)
end

-- The leases held: those in the set, and the local counts of the processes still alive.
local function held(leases, counts)
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms)
  local total = redis.call('ZCARD', leases)
  local fields = redis.call('HGETALL', counts)
  for index = 1, #fields, 2 do
    local alive = redis.call('ZSCORE', KEYS[1], fields[index])
    if alive and tonumber(alive) > now_ms then
      total = total + tonumber(fields[index + 1])
    end
  end
  return total
end

-- What this process counted locally: the number of window entries, then per entry (a key)
-- its minute and count; the number of lease counts, then per count (a key) the leases this
-- process holds locally (a number, not a change: a call that times out and ran anyway, or
-- is sent again, sets the same).
for _ = 1, next_number() do
  local key = next_key()
  local at = next_number()
  local count = next_number()
  local current, previous = read(key)
  if at == minute then
    write(key, current + count, previous)
  elseif at == minute - 1 then
    write(key, current, previous + count)
  end
end
for _ = 1, next_number() do
  local key = next_key()
  local count = next_number()
  if count > 0 then
    redis.call('HSET', key, process, count)
    redis.call('PEXPIRE', key, lease_ms)
  else
    redis.call('HDEL', key, process)
  end
end

local op = ARGV[1]
if op == 'sync' then
  -- ARGV: this process's registration (ms), the number of windows and of lease sets to
  -- read. KEYS: the windows, then per lease set the set and its counts. Returns the time
  -- (us), the live processes, then per window its counts, per lease set the leases held.
  redis.call('ZADD', KEYS[1], now_ms + next_number(), process)
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
  redis.call('PEXPIRE', KEYS[1], lease_ms)
  local found = {now_us, redis.call('ZCARD', KEYS[1])}
  local windows, sets = next_number(), next_number()
  for _ = 1, windows do
    local current, previous = read(next_key())
    table.insert(found, current)
    table.insert(found, previous)
  end
  for _ = 1, sets do
    local leases = next_key()
    table.insert(found, held(leases, next_key()))
  end
  return found
end

if op == 'admit' then
  -- ARGV: the number of scopes, the lease, its seconds, the estimated tokens, then per
  -- scope rpm, tpm and max_concurrent (0: none). KEYS: per scope its requests window,
  -- tokens window, leases and lease counts. Returns the time (us), the refused check (0:
  -- none; else 3 * scope + 1, 2 or 3), then per scope the requests window's counts, the
  -- tokens window's and the leases held.
  local scopes, lease, cost = next_number(), next_arg(), next_number()
  local first_key, first_arg = key_at, arg_at
  local found, refused = {}, 0
  for scope = 0, scopes - 1 do
    local keys, limits = first_key + 4 * scope, first_arg + 3 * scope
    local rpm, tpm, most = tonumber(ARGV[limits + 1]), tonumber(ARGV[limits + 2]),
      tonumber(ARGV[limits + 3])
    local rc, rp, tc, tp, taken = 0, 0, 0, 0, 0
    if rpm > 0 then rc, rp = read(KEYS[keys + 1]) end
    if tpm > 0 then tc, tp = read(KEYS[keys + 2]) end
    if most > 0 then taken = held(KEYS[keys + 3], KEYS[keys + 4]) end
    if refused == 0 then
      local tokens_left = left(tpm, tc, tp)
      if rpm > 0 and left(rpm, rc, rp) < 1 then
        refused = 3 * scope + 1
      elseif tpm > 0 and (tokens_left <= 0 or tokens_left < math.min(cost, tpm)) then
        refused = 3 * scope + 2
      elseif most > 0 and taken >= most then
        refused = 3 * scope + 3
      end
    end
    for _, value in ipairs({rc, rp, tc, tp, taken}) do table.insert(found, value) end
  end
  if refused == 0 then
    for scope = 0, scopes - 1 do
      local keys, limits = first_key + 4 * scope, first_arg + 3 * scope
      if tonumber(ARGV[limits + 1]) > 0 then
        write(KEYS[keys + 1], found[1 + 5 * scope] + 1, found[2 + 5 * scope])
      end
      if tonumber(ARGV[limits + 3]) > 0 then
        redis.call('ZADD', KEYS[keys + 3], now_ms + lease_ms, lease)
        redis.call('PEXPIRE', KEYS[keys + 3], lease_ms)
      end
    end
  end
  return {now_us, refused, unpack(found)}
end

-- 'settle' -- ARGV: the number of scopes, the lease, the tokens, then per scope tpm (0:
-- none). KEYS: per scope its tokens window and leases.
local scopes, lease, tokens = next_number(), next_arg(), next_number()
for scope = 0, scopes - 1 do
  local window, leases = next_key(), next_key()
  redis.call('ZREM', leases, lease)
  local tpm = next_number()
  if tpm > 0 and tokens > 0 then
    local current, previous = read(window)
    local added = math.min(tokens, left(tpm, current, previous))
    if added > 0 then write(window, current + added, previous) end
  end
end
return 0
"""


@dataclass(slots=True)
class _View:
    """One shared counter as this process sees it: what Redis last reported, and what this
    process counted since."""

    read_us: int = -1  # Redis's clock at the last read applied (-1: never read)
    read_at: float = -math.inf  # this process's monotonic clock then
    used_at: float = 0.0

    def fresh(self, now: float) -> bool:
        return now - self.read_at <= FRESH_S

    def newer(self, read_us: int, now: float) -> bool:
        """Whether a reading made at `read_us` (Redis's clock), answered `now`, is newer
        than the one held, which it then replaces: calls can come back out of order."""
        if read_us < self.read_us:
            return False
        self.read_us, self.read_at = read_us, now
        return True


@dataclass(slots=True)
class _WindowView(_View):
    current: int = 0
    previous: int = 0
    minute: int = -1  # the minute Redis read it in
    pending: dict[int, int] = field(default_factory=dict)  # minute -> counted here, unsent
    sending: int = 0  # sent, not yet answered

    @property
    def unsent(self) -> int:
        return sum(self.pending.values()) + self.sending

    def window(self, limit: int, elapsed: float) -> Window:
        # What this process counted since counts in the current minute: more than it may
        # be, never less.
        return Window(limit, self.current + self.unsent, self.previous, elapsed)


@dataclass(slots=True)
class _LeaseView(_View):
    others: int = 0  # the leases held, as Redis last counted them, but this process's local ones
    mine: int = 0  # the leases this process holds locally, now
    told: int = 0  # how many of them the last call told Redis

    @property
    def held(self) -> int:
        return self.others + self.mine

    @property
    def unsent(self) -> int:
        """Leases taken here since Redis was last told."""
        return max(0, self.mine - self.told)


class _Call:
    """One script call's KEYS and ARGV: the registry first, then what this process counted
    for the views given (now sending), then the operation's own."""

    def __init__(self, op: str, process: str) -> None:
        self.keys: list[str] = [_REGISTRY]
        self.args: list[str | int] = [op, WINDOW_S, LEASE_S, process]
        self.sent: list[tuple[_WindowView, int]] = []
        self.told: dict[int, int] = {}  # id(lease view) -> the count sent

    def flush(self, windows: dict[str, _WindowView], leases: dict[str, _LeaseView]) -> None:
        entries = [
            (key, view, at, count)
            for key, view in windows.items()
            for at, count in view.pending.items()
        ]
        self.args.append(len(entries))
        for key, view, at, count in entries:
            self.keys.append(key)
            self.args += [at, count]
            self.sent.append((view, count))
            view.sending += count
            view.pending.clear()
        self.args.append(len(leases))
        for key, lease_view in leases.items():
            self.keys.append(_counts_key(key))
            self.args.append(lease_view.mine)
            self.told[id(lease_view)] = lease_view.told = lease_view.mine

    def answered(self, view: _WindowView, read_us: int, now: float) -> bool:
        """Takes back what this call carried of `view`'s counts, now in Redis; whether
        the reading should replace the view's."""
        view.sending -= sum(count for sent, count in self.sent if sent is view)
        return view.newer(read_us, now)

    def others(self, view: _LeaseView, held: int) -> int:
        """The leases held that are not this process's local ones, from a count of them
        all that this call read."""
        return held - self.told[id(view)]

    def failed(self) -> None:
        # Redis may or may not have the windows' counts: they are dropped, which admits at
        # most them more. (The lease counts are sent whole with every call.)
        for view, count in self.sent:
            view.sending -= count


def _counts_key(leases: str) -> str:
    """The hash of the local lease counts beside a set of leases."""
    return f"{leases}:local"


class SharedCounters:
    """The counters in Redis, shared by every instance, admitted locally while far from
    their limits (the module's docstring)."""

    def __init__(self, url: str, timeout_s: float, process: str) -> None:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # No retries (redis-py's default is 10, with backoff: a Redis that never answers
        # held each request for seconds); the limiter lets a request through instead.
        self._redis: Any = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        # The socket timeouts bound each read; this, each whole call (a connection from the
        # pool, the script's load after a Redis restart).
        self._bound_s = 2 * timeout_s
        self._script = self._redis.register_script(_SCRIPT)
        self._process = process
        self._windows: dict[str, _WindowView] = {}
        self._leases: dict[str, _LeaseView] = {}
        self._local: set[str] = set()  # the leases admitted here, not in Redis's sets
        self._processes = 0  # live processes, as the last sync counted them (0: none yet)
        self._offset_us = 0  # Redis's clock less this process's monotonic one
        self._syncing: asyncio.Task[None] | None = None
        self._closing = False

    async def admit(
        self, scopes: Sequence[Scope], estimated: int, lease: str
    ) -> tuple[list[Reading], Refusal | None]:
        now = time.monotonic()
        if self._syncing is None or self._syncing.done():
            self._syncing = asyncio.create_task(self._sync_forever())
        readings = self._local_readings(scopes, estimated, now)
        if readings is not None:
            self._count_locally(scopes, lease)
            return readings, None
        return await self._admit_in_redis(scopes, estimated, lease, now)

    def settle(
        self, scopes: Sequence[Scope], lease: str | None, tokens: int
    ) -> Awaitable[None] | None:
        if lease is not None and lease in self._local:
            self._local.discard(lease)
            self._settle_locally(scopes, tokens)
            return None
        concerned = [
            scope
            for scope in scopes
            if (lease is not None and scope.policy.max_concurrent is not None)
            or (tokens > 0 and scope.policy.tpm is not None)
        ]
        if not concerned:
            return None
        call = _Call("settle", self._process)
        call.flush({}, {})
        call.args += [len(concerned), lease or "", tokens]
        for scope in concerned:
            call.keys += [scope.key("tokens"), scope.key("concurrent")]
            call.args.append(scope.policy.tpm or 0)
        return self._run(call)

    async def aclose(self) -> None:
        self._closing = True
        if self._syncing is not None:
            self._syncing.cancel()
            # Bounded, and the flag ends the loop at its next turn: a test's teardown once
            # waited here for ever (not reproduced since; a cancel taken for a Redis call's
            # own timeout as it fires would do it, the loop syncing on).
            await asyncio.wait({self._syncing}, timeout=2 * self._bound_s)
        # What was counted here since the last sync, then leaving the processes counted
        # (the others' shares grow at once; the local leases stop counting); with Redis
        # down, the counts are lost and the registration lapses.
        with contextlib.suppress(Exception):
            await self._sync(time.monotonic())
            async with asyncio.timeout(self._bound_s):
                await self._redis.zrem(_REGISTRY, self._process)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._bound_s):
                await self._redis.aclose()

    async def ping(self) -> None:
        async with asyncio.timeout(self._bound_s):
            await self._redis.ping()

    # Local admission ---------------------------------------------------------------------

    def _local_readings(
        self, scopes: Sequence[Scope], estimated: int, now: float
    ) -> list[Reading] | None:
        """The readings of a request admitted locally, or None where Redis must decide:
        a view missing or old, or a limit near (or a share of it counted here unsent)."""
        processes = self._processes
        if not processes:
            return None
        now_us = int(now * _US) + self._offset_us
        minute, into = divmod(now_us, WINDOW_S * _US)
        elapsed = into / (WINDOW_S * _US)
        readings = []
        for scope in scopes:
            policy = scope.policy
            requests = tokens = None
            running = None
            if policy.rpm is not None:
                view = self._windows.get(scope.key("requests"))
                if view is None or not _far(
                    view, policy.rpm, 1, 1, processes, now, minute, elapsed
                ):
                    return None
                requests = view.window(policy.rpm, elapsed)
            if policy.tpm is not None:
                view = self._windows.get(scope.key("tokens"))
                cost = min(estimated, policy.tpm)
                # Its tokens come when the response settles; the estimate stands for them
                # against the process's allowance, so a small window (no allowance at all,
                # as the console's failed sign-ins) is decided by Redis, exactly.
                if view is None or not _far(
                    view, policy.tpm, cost, cost, processes, now, minute, elapsed
                ):
                    return None
                tokens = view.window(policy.tpm, elapsed)
            if policy.max_concurrent is not None:
                most = policy.max_concurrent
                leases = self._leases.get(scope.key("concurrent"))
                if leases is None or not leases.fresh(now):
                    return None
                allowance, margin = _shares(most, processes)
                running_now = leases.held
                if leases.unsent + 1 > allowance or running_now + 1 > most - margin:
                    return None
                running = (running_now, most)
            readings.append(Reading(requests, tokens, running))
        return readings

    def _count_locally(self, scopes: Sequence[Scope], lease: str) -> None:
        now = time.monotonic()
        for scope in scopes:
            policy = scope.policy
            if policy.rpm is not None:
                view = self._windows[scope.key("requests")]
                view.pending[view.minute] = view.pending.get(view.minute, 0) + 1
                view.used_at = now
            if policy.tpm is not None:
                self._windows[scope.key("tokens")].used_at = now
            if policy.max_concurrent is not None:
                leases = self._leases[scope.key("concurrent")]
                leases.mine += 1
                leases.used_at = now
        self._local.add(lease)

    def _settle_locally(self, scopes: Sequence[Scope], tokens: int) -> None:
        minute, into = divmod(int(time.monotonic() * _US) + self._offset_us, WINDOW_S * _US)
        elapsed = into / (WINDOW_S * _US)
        for scope in scopes:
            policy = scope.policy
            if policy.max_concurrent is not None:
                self._leases[scope.key("concurrent")].mine -= 1
            if policy.tpm is not None and tokens > 0:
                view = self._windows.setdefault(scope.key("tokens"), _WindowView())
                # Up to what the window has left, as Redis adds them.
                left = view.window(policy.tpm, elapsed).left() if view.minute == minute else tokens
                added = min(tokens, left)
                if added > 0:
                    view.pending[minute] = view.pending.get(minute, 0) + added

    # Redis -------------------------------------------------------------------------------

    async def _admit_in_redis(
        self, scopes: Sequence[Scope], estimated: int, lease: str, now: float
    ) -> tuple[list[Reading], Refusal | None]:
        windows: dict[str, _WindowView] = {}
        leases: dict[str, _LeaseView] = {}
        for scope in scopes:
            policy = scope.policy
            limited: tuple[tuple[Limit, int | None], ...] = (
                ("requests", policy.rpm),
                ("tokens", policy.tpm),
            )
            for limit, most in limited:
                if most is not None:
                    key = scope.key(limit)
                    windows[key] = self._windows.setdefault(key, _WindowView())
            if policy.max_concurrent is not None:
                key = scope.key("concurrent")
                leases[key] = self._leases.setdefault(key, _LeaseView())
        for view in [*windows.values(), *leases.values()]:
            view.used_at = now
        call = _Call("admit", self._process)
        call.flush(windows, leases)
        call.args += [len(scopes), lease, estimated]
        for scope in scopes:
            concurrent = scope.key("concurrent")
            call.keys += [
                scope.key("requests"),
                scope.key("tokens"),
                concurrent,
                _counts_key(concurrent),
            ]
            policy = scope.policy
            call.args += [policy.rpm or 0, policy.tpm or 0, policy.max_concurrent or 0]
        now_us, refused, *counts = await self._run(call)
        answered = time.monotonic()
        minute, into = divmod(now_us, WINDOW_S * _US)
        elapsed = into / (WINDOW_S * _US)
        readings = []
        for index, scope in enumerate(scopes):
            rc, rp, tc, tp, held = counts[5 * index : 5 * index + 5]
            admitted = 0 if refused else 1
            counted: tuple[tuple[Limit, int, int], ...] = (
                ("requests", rc + admitted, rp),
                ("tokens", tc, tp),
            )
            for limit, current, previous in counted:
                window = windows.get(scope.key(limit))
                if window is not None and call.answered(window, now_us, answered):
                    window.current, window.previous, window.minute = current, previous, minute
            lease_view = leases.get(scope.key("concurrent"))
            if lease_view is not None and lease_view.newer(now_us, answered):
                # A lease taken here is in Redis's set: not a local one.
                lease_view.others = call.others(lease_view, held) + admitted
            policy = scope.policy
            readings.append(
                Reading(
                    None if policy.rpm is None else Window(policy.rpm, rc, rp, elapsed),
                    None if policy.tpm is None else Window(policy.tpm, tc, tp, elapsed),
                    None if policy.max_concurrent is None else (held, policy.max_concurrent),
                )
            )
        if not refused:
            return readings, None
        index, check = divmod(refused - 1, 3)
        return readings, Refusal(index, CHECKS[check])

    async def _sync_forever(self) -> None:
        """Every SYNC_S, while any counter is in use or a local lease held: send what was
        counted here, read the counters back. A failed sync leaves the views to age: past
        FRESH_S, admissions go to Redis, where a failure lets them pass (and is logged)."""
        while not self._closing and (self._windows or self._leases or self._local):
            await asyncio.sleep(SYNC_S)
            try:
                await self._sync(time.monotonic())
            except Exception:
                continue

    async def _sync(self, now: float) -> None:
        # Counters unused for KEEP_S, with nothing of this process's to send, are let go.
        for key, window in list(self._windows.items()):
            if now - window.used_at > KEEP_S and not window.unsent:
                del self._windows[key]
        for key, lease_view in list(self._leases.items()):
            if now - lease_view.used_at > KEEP_S and not lease_view.mine and not lease_view.told:
                del self._leases[key]
        windows, leases = dict(self._windows), dict(self._leases)
        call = _Call("sync", self._process)
        call.flush(windows, leases)
        call.args += [round(LIVE_S * 1000), len(windows), len(leases)]
        call.keys += list(windows)
        for key in leases:
            call.keys += [key, _counts_key(key)]
        now_us, processes, *counts = await self._run(call)
        answered = time.monotonic()
        self._offset_us = now_us - int(answered * _US)
        self._processes = processes
        minute = now_us // (WINDOW_S * _US)
        for index, view in enumerate(windows.values()):
            if call.answered(view, now_us, answered):
                view.current, view.previous = counts[2 * index], counts[2 * index + 1]
                view.minute = minute
        for index, lease_view in enumerate(leases.values(), start=2 * len(windows)):
            if lease_view.newer(now_us, answered):
                lease_view.others = call.others(lease_view, counts[index])

    async def _run(self, call: _Call) -> Any:
        try:
            async with asyncio.timeout(self._bound_s):
                return await self._script(call.keys, call.args)
        except BaseException:
            call.failed()
            raise


def _shares(limit: int, processes: int) -> tuple[int, int]:
    """How much of `limit` a process may count before Redis has it (its allowance), and
    how much a view must leave free for a local admission (the margin): the margin covers
    every process's allowance twice over, so a full window is seen as near by every view."""
    return math.floor(SLACK * limit / processes), math.ceil(2 * SLACK * limit)


def _far(
    view: _WindowView,
    limit: int,
    counted: int,
    tested: int,
    processes: int,
    now: float,
    minute: int,
    elapsed: float,
) -> bool:
    """Whether a window's view admits locally a request that counts `counted` in it (1 in
    a requests window; in a tokens window its estimate, for what it adds when it settles)
    and needs `tested` left."""
    if not view.fresh(now) or view.minute != minute:
        return False
    allowance, margin = _shares(limit, processes)
    unsent = view.unsent
    level = math.floor(view.previous * (1 - elapsed) + view.current + unsent)
    return unsent + counted <= allowance and level + tested <= limit - margin
