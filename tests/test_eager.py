"""until_suspended: a coroutine run in the calling task until it first waits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, cast

import pytest

from relay.eager import Suspended, until_suspended


async def test_until_suspended_returns_what_needs_no_wait() -> None:
    async def ready() -> int:
        return 7

    assert until_suspended(ready()) == 7


async def test_until_suspended_resumes_the_rest_where_it_stopped() -> None:
    steps: list[str] = []

    async def later() -> int:
        steps.append("first step")
        await asyncio.sleep(0.01)
        steps.append("resumed")
        return 8

    rest = until_suspended(later())
    assert isinstance(rest, Suspended)
    assert steps == ["first step"]
    assert await rest == 8
    assert steps == ["first step", "resumed"]


async def test_cancelling_the_awaiter_cancels_the_suspended_rest() -> None:
    seen: list[str] = []

    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def awaiter() -> None:
        rest = until_suspended(forever())
        assert isinstance(rest, Suspended)
        await rest

    task = asyncio.ensure_future(awaiter())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]


async def test_an_error_after_resuming_reaches_the_awaiter() -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("upstream broke")

    rest = until_suspended(fails())
    assert isinstance(rest, Suspended)
    with pytest.raises(ValueError, match="upstream broke"):
        await rest


async def test_cancel_runs_the_cleanup_of_a_begun_async_generator_step() -> None:
    seen: list[str] = []

    async def upstream() -> AsyncIterator[int]:
        try:
            await asyncio.sleep(60)
            yield 1
        except asyncio.CancelledError:
            await asyncio.sleep(0)  # cleanup that waits, like storing where a run stopped
            seen.append("cleaned up")
            raise

    events = upstream()
    step = until_suspended(cast(Coroutine[Any, Any, int], events.__anext__()))
    assert isinstance(step, Suspended)
    await step.cancel()
    assert seen == ["cleaned up"]
    await events.aclose()  # not "already running": the step is over
