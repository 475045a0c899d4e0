"""One owner of a process's background work: named tasks, closed in one defined order (the
application's included), and ids made in each process, not at import."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
from pathlib import Path

import pytest
from relay_fixtures import fake_routes

from relay import heap
from relay.access.limits import RateLimiter
from relay.api.app import create_app
from relay.config import Settings
from relay.supervisor import Supervisor


async def test_closes_in_reverse_order_of_start_and_past_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed: list[str] = []
    supervisor = Supervisor()

    def closer(name: str, fail: bool = False) -> None:
        async def close() -> None:
            closed.append(name)
            if fail:
                raise RuntimeError(name)

        supervisor.closes(name, close)

    closer("store")
    closer("engine", fail=True)
    task = supervisor.start("loop", asyncio.Event().wait())
    closer("last")
    assert task.get_name() == "relay:loop"
    assert supervisor.names == ["last", "loop", "engine", "store"]
    await supervisor.aclose()
    assert closed == ["last", "engine", "store"]
    assert task.cancelled()
    assert "closing engine failed" in caplog.text


def _lease(_: int) -> str:
    async def admit() -> str:
        admission = await RateLimiter().admit([], 0)
        assert admission.lease is not None
        return admission.lease

    return asyncio.run(admit())


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_processes_started_after_import_make_their_own_lease_ids(method: str) -> None:
    """Workers forked from a parent that imported Relay (and even limited requests there)
    must not share rate limit lease ids in one Redis."""
    parent = _lease(0)
    children = []
    for number in range(2):  # a pool of its own each: two processes, whatever the scheduling
        with multiprocessing.get_context(method).Pool(1) as pool:
            children.append(pool.apply(_lease, (number,)))
    prefixes = {lease.partition(":")[0] for lease in [parent, *children]}
    assert len(prefixes) == 3, [parent, *children]


async def test_the_application_names_its_tasks_and_closes_in_order(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(database_url=store_url, routes=fake_routes())
    app = create_app(settings).app  # type: ignore[attr-defined]
    caplog.set_level(logging.DEBUG, logger="relay")
    shared = ["run signals", "job worker", "job queue"] if "postgresql" in store_url else []
    async with app.router.lifespan_context(app):
        names = {task.get_name() for task in asyncio.all_tasks()}
        expected = {"relay:run upkeep", "relay:metrics sampling"}
        assert {*expected, *(f"relay:{name}" for name in shared[:2])} <= names
    closing = [
        record.args[0]  # type: ignore[index]
        for record in caplog.records
        if record.msg == "closing %s"
    ]
    assert closing == [
        "waits for the database",
        "metrics sampling",
        "metrics",
        "run upkeep",
        *shared,
        "runs",
        "engine",
        "tools",
        "access",
        "providers",
        "store",
    ]


async def test_what_start_up_built_is_out_of_the_collectors_sight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full collection under load must not walk the worker's start-up heap (the p99's
    pauses): once the application has started, that heap is frozen (once a process)."""
    monkeypatch.setattr(heap, "_frozen", False)  # as in a fresh worker
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'relay.db'}", routes=fake_routes())
    app = create_app(settings).app  # type: ignore[attr-defined]
    gc.unfreeze()
    try:
        async with app.router.lifespan_context(app):
            frozen = gc.get_freeze_count()
        # Schemas, routes, providers and modules: far more than a request's garbage.
        assert frozen > 50_000, frozen
        gc.unfreeze()
        async with app.router.lifespan_context(app):
            assert gc.get_freeze_count() == 0  # not again in the same process
    finally:
        gc.unfreeze()
