"""Races at a background run's start: a cancel at the moment a worker claims a queued run,
and submits at once against the bound on waiting runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from relay_fixtures import fake_routes

from relay.api.app import create_app
from relay.config import Settings
from relay.errors import UpstreamError
from relay.protocol import create_request
from relay.runs.queue import conninfo
from relay.runs.runner import Runner

TENANT = "default"


def _settings(database_url: str, **extra: Any) -> Settings:
    return Settings(database_url=database_url, routes=fake_routes(), **extra)


@asynccontextmanager
async def _running(settings: Settings) -> AsyncIterator[Runner]:
    app = create_app(settings).app  # type: ignore[attr-defined]
    async with app.router.lifespan_context(app):
        yield app.state.runner


def _ignore(*_: Any) -> None:
    pass


async def _submit(runner: Runner, model: str = "fake-slow") -> tuple[dict[str, Any], bool]:
    request = create_request({"model": model, "input": "x", "background": True})
    return await runner.submit(
        request, tenant=TENANT, session_id=None, key_id=None, on_settled=_ignore
    )


@pytest.mark.postgres
async def test_a_run_cancelled_as_it_is_claimed_never_runs(postgres_url: str) -> None:
    """The cancel's transaction ends the queued run while the worker's claim waits on its
    row: the claim must fail, and the run neither start nor be billed."""
    # No job worker here: the test hands the job to the runner itself.
    settings = _settings(postgres_url, background_worker=False)
    async with _running(settings) as runner:
        response, here = await _submit(runner)
        assert not here
        billed: list[str] = []
        account = runner.accounting_for

        def accounting_for(tenant: str, key_id: str | None, model: str) -> Any:
            billed.append(model)
            return account(tenant, key_id, model)

        runner.accounting_for = accounting_for
        async with await psycopg.AsyncConnection.connect(conninfo(postgres_url)) as cancel:
            # What request_cancel does to a run nobody took, held open...
            await cancel.execute("DELETE FROM runs WHERE response_id = %s", (response["id"],))
            await cancel.execute(
                "UPDATE responses SET status = 'cancelled' WHERE id = %s", (response["id"],)
            )
            take = asyncio.ensure_future(runner.run_queued(response["id"]))
            await _until_blocked(cancel)
            await cancel.commit()  # ...committed while the claim waits on the run's row
            await asyncio.wait({take}, timeout=10)
            take.cancel()
            assert billed == []
            status = await cancel.execute(
                "SELECT status FROM responses WHERE id = %s", (response["id"],)
            )
            assert await status.fetchone() == ("cancelled",)
            assert not await runner.log.in_flight(response["id"])


async def _until_blocked(conn: psycopg.AsyncConnection[Any]) -> None:
    """Until another connection waits on a lock this one holds."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
    async with await psycopg.AsyncConnection.connect(conn.info.dsn, autocommit=True) as watch:
        for _ in range(200):
            row = await (await watch.execute(query)).fetchone()
            if row is not None and row[0]:
                return
            await asyncio.sleep(0.02)
    raise AssertionError("the claim never waited on the cancel")


async def test_submits_at_once_never_exceed_the_queue_bound(tmp_path: Any) -> None:
    settings = _settings(
        f"sqlite:///{tmp_path}/relay.db", background_max_running=1, background_max_queued=2
    )
    async with _running(settings) as runner:
        answers = await asyncio.gather(
            *(_submit(runner) for _ in range(12)), return_exceptions=True
        )
        accepted = [answer for answer in answers if not isinstance(answer, BaseException)]
        refused = [answer for answer in answers if isinstance(answer, UpstreamError)]
        # One may already hold the running slot; two wait.
        assert len(accepted) <= 3 and len(accepted) + len(refused) == 12, answers
        for response, _ in accepted:
            await runner.cancel(TENANT, response["id"])
