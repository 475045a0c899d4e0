"""Runs in storage: the record written when a run starts (the response and its lease), lease
renewal and cancel requests, the event log of background responses, and the sweep that ends
runs whose process died.

Event rows are written in batches (every FLUSH_S, in one statement), so a stream of a
thousand deltas costs tens of transactions, not a thousand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from relay.engine.builder import error_event
from relay.observe import tracing
from relay.runs.notify import CANCEL, CHANNEL, EVENT
from relay.storage.dialects import postgresql, sqlite
from relay.storage.outage import retried
from relay.storage.sql import SqlStore, json_text
from relay.storage.tables import response_events, responses, runs

log = logging.getLogger("relay.runs")
FLUSH_S = 0.05
INTERRUPTED = (
    "The response was interrupted: the server running it stopped before it finished. "
    "Send the request again."
)
_LIVE = ("queued", "in_progress")

_RENEW = (
    update(runs)
    .where(runs.c.response_id.in_(bindparam("ids", expanding=True)))
    .values(lease_until=bindparam("until"))
)
_CANCELS = select(runs.c.response_id).where(
    runs.c.response_id.in_(bindparam("ids", expanding=True)), runs.c.cancel_requested == 1
)
_REQUEST_CANCEL = (
    update(runs)
    .where(runs.c.response_id == bindparam("rid"), runs.c.tenant == bindparam("t"))
    .values(cancel_requested=1)
)
_END = delete(runs).where(runs.c.response_id == bindparam("rid"))
# A foreground response recorded as it started whose upstream then failed to open: its
# client got an error, never its id.
_NEVER_STARTED = delete(responses).where(
    responses.c.id == bindparam("rid"),
    responses.c.tenant == bindparam("t"),
    responses.c.status == "in_progress",
)
# A queued run's request is in its record until a worker claims it: claiming clears it, so
# that a cancel (which ends only unclaimed runs at once) and a claim never both succeed.
_UNCLAIMED = (runs.c.response_id == bindparam("rid"), runs.c.request.is_not(None))
_CLAIM = update(runs).where(*_UNCLAIMED).values(lease_until=bindparam("until"), request=None)
_END_UNCLAIMED = delete(runs).where(*_UNCLAIMED)
_EVENTS_AFTER = (
    select(response_events.c.event)
    .where(
        response_events.c.response_id == bindparam("rid"),
        response_events.c.sequence_number > bindparam("after"),
    )
    .order_by(response_events.c.sequence_number)
)


# A background run waiting in the job queue is ended by the sweep after this long.
QUEUED_S = 3600


@dataclass(frozen=True, slots=True)
class QueuedRun:
    request: str  # the create body, as JSON
    session_id: str | None
    key_id: str | None


class RunLog:
    def __init__(self, store: SqlStore, lease_s: float, *, stopping: asyncio.Event) -> None:
        """`stopping`: set as the process stops; events that wait for the database are then
        dropped (the sweep closes their runs' logs)."""
        self.store = store
        self.db = store.db
        self.lease_s = lease_s
        self.stopping = stopping
        self._pending: list[dict[str, Any]] = []
        self._writer: asyncio.Task[None] | None = None

    def _until(self) -> int:
        return int(time.time() + self.lease_s)

    async def begin(
        self,
        tenant: str,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        *,
        background: bool,
        queued: QueuedRun | None = None,
    ) -> None:
        """Store the response as it starts (queued or in_progress) with its run, at once.
        `queued`: what a worker elsewhere needs to start it (it waits in the job queue,
        without a lease, for up to QUEUED_S)."""
        row = {
            "response_id": response["id"],
            "tenant": tenant,
            "background": int(background),
            "lease_until": self._until() if queued is None else int(time.time() + QUEUED_S),
            "cancel_requested": 0,
            "request": None if queued is None else queued.request,
            "session_id": None if queued is None else queued.session_id,
            "key_id": None if queued is None else queued.key_id,
        }

        with tracing.storage(self.store.dialect, "begin_run", response["id"]):
            await self.store.save_with(tenant, response, input_items, runs, row)

    async def take(self, response_id: str) -> tuple[QueuedRun, str, dict[str, Any]] | None:
        """A worker's claim on a queued run: its lease starts now. (What it needs, its tenant,
        the queued response); None when it is no longer queued (cancelled, or swept)."""

        def work(conn: Connection) -> tuple[QueuedRun, str, dict[str, Any]] | None:
            row = conn.execute(select(runs).where(runs.c.response_id == response_id)).first()
            body = conn.execute(
                select(responses.c.body).where(
                    responses.c.id == response_id, responses.c.status == "queued"
                )
            ).scalar()
            if row is None or body is None or row.request is None:
                return None
            if conn.execute(_CLAIM, {"rid": response_id, "until": self._until()}).rowcount != 1:
                return None  # cancelled (or taken by another worker) since it was read
            queued = QueuedRun(row.request, row.session_id, row.key_id)
            return queued, row.tenant, orjson.loads(body)

        return await self.db.write(work)

    async def mark_running(self, response: dict[str, Any]) -> None:
        """A queued response's stored copy, now that its run has started."""
        running = (
            update(responses)
            .where(responses.c.id == response["id"], responses.c.status == "queued")
            .values(status="in_progress", body=json_text(response))
        )
        await self.db.write_one(lambda conn: conn.execute(running))

    async def end(self, response_id: str) -> None:
        await self.db.execute_one(_END, {"rid": response_id})

    async def take_back(self, tenant: str, response_id: str) -> None:
        """A response recorded by `begin` that never started: its record and its row go."""

        def work(conn: Connection) -> None:
            conn.execute(_END, {"rid": response_id})
            conn.execute(_NEVER_STARTED, {"rid": response_id, "t": tenant})

        await self.db.write(work)

    async def renew(self, response_ids: list[str]) -> tuple[set[str], set[str]]:
        """Extend these runs' leases: (the ones whose cancel was asked for elsewhere, the ones
        no longer recorded: swept because this process stalled past its lease)."""
        if not response_ids:
            return set(), set()
        params = {"ids": response_ids, "until": self._until()}

        def work(conn: Connection) -> tuple[set[str], set[str]]:
            conn.execute(_RENEW, params)
            cancels = {row[0] for row in conn.execute(_CANCELS, {"ids": response_ids})}
            present = conn.execute(
                select(runs.c.response_id).where(runs.c.response_id.in_(response_ids))
            )
            return cancels, set(response_ids) - {row[0] for row in present}

        return await self.db.write(work)

    async def request_cancel(self, tenant: str, response_id: str) -> bool:
        """Cancel a run not running here: one still waiting in the job queue at once (its
        worker will find it gone), a running (or just claimed) one by asking its instance.
        False when no such run is in flight."""

        def work(conn: Connection) -> bool:
            body = conn.execute(
                select(responses.c.body).where(
                    responses.c.id == response_id,
                    responses.c.tenant == tenant,
                    responses.c.status == "queued",
                )
            ).scalar()
            if body is not None and conn.execute(_END_UNCLAIMED, {"rid": response_id}).rowcount:
                cancelled = {**orjson.loads(body), "status": "cancelled"}
                conn.execute(
                    update(responses)
                    .where(responses.c.id == response_id)
                    .values(status="cancelled", body=json_text(cancelled))
                )
                return True
            done = conn.execute(_REQUEST_CANCEL, {"rid": response_id, "t": tenant})
            if done.rowcount and conn.dialect.name == "postgresql":
                _signal(conn, CANCEL, response_id)
            return bool(done.rowcount)

        return await self.db.write(work)

    # events -----------------------------------------------------------------------------------

    def append(self, response_id: str, batch: list[dict[str, Any]]) -> None:
        self._pending.extend(
            {
                "response_id": response_id,
                "sequence_number": event["sequence_number"],
                "event": json_text(event),
            }
            for event in batch
        )
        if self._writer is None:
            self._writer = asyncio.ensure_future(self._write_all())

    async def flush(self) -> None:
        while self._writer is not None:
            await asyncio.shield(self._writer)

    async def _write_all(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(FLUSH_S)
                batch, self._pending = self._pending, []
                write = partial(self.db.write, partial(_insert_events, batch=batch))
                try:
                    # Waits out an outage (later events gather meanwhile, in order).
                    await retried(write, what=f"{len(batch)} stream events", until=self.stopping)
                except Exception:
                    log.exception("could not write %d stream events", len(batch))
        finally:
            self._writer = None

    async def in_flight(self, response_id: str) -> bool:
        query = select(runs.c.response_id).where(runs.c.response_id == response_id)
        return await self.db.glance(lambda conn: conn.execute(query).first() is not None)

    async def events_after(self, response_id: str, after: int) -> list[dict[str, Any]]:
        params = {"rid": response_id, "after": after}
        rows = await self.db.read(lambda conn: conn.execute(_EVENTS_AFTER, params).all())
        return [orjson.loads(row[0]) for row in rows]

    # recovery ---------------------------------------------------------------------------------

    async def sweep(self) -> list[str]:
        """End every run whose lease lapsed (its process died) as failed, with a clear
        error, and close its event log; the ids ended."""
        return await self.db.write(lambda conn: _sweep(conn, int(time.time())))


def _insert_events(conn: Connection, *, batch: list[dict[str, Any]]) -> None:
    # A row already there (the sweep closed a run whose process stalled) must not reject
    # the other runs' events of the batch.
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(response_events).on_conflict_do_nothing(
        index_elements=[response_events.c.response_id, response_events.c.sequence_number]
    )
    conn.execute(statement, batch)
    if conn.dialect.name == "postgresql":
        for response_id in {row["response_id"] for row in batch}:
            _signal(conn, EVENT, response_id)


def _signal(conn: Connection, kind: str, response_id: str) -> None:
    """A NOTIFY (relay.runs.notify), delivered when this transaction commits."""
    conn.execute(select(func.pg_notify(CHANNEL, f"{kind}:{response_id}")))


def _sweep(conn: Connection, now: int) -> list[str]:
    lapsed = conn.execute(
        select(runs.c.response_id, runs.c.background).where(runs.c.lease_until < now)
    ).all()
    ended = []
    for response_id, background in lapsed:
        # Deleting the run is the claim: of several instances sweeping, one gets the row.
        claim = delete(runs).where(runs.c.response_id == response_id, runs.c.lease_until < now)
        if conn.execute(claim).rowcount != 1:
            continue
        body = conn.execute(
            select(responses.c.body).where(
                responses.c.id == response_id, responses.c.status.in_(_LIVE)
            )
        ).scalar()
        if body is None:
            continue  # it ended after all, just before its process died
        response = orjson.loads(body)
        response.update(
            status="failed",
            completed_at=None,
            error={"code": "server_error", "message": INTERRUPTED},
        )
        conn.execute(
            update(responses)
            .where(responses.c.id == response_id)
            .values(status="failed", body=json_text(response))
        )
        if background:
            _close_log(conn, response_id, response)
        ended.append(response_id)
    return ended


def _close_log(conn: Connection, response_id: str, response: dict[str, Any]) -> None:
    """The error and response.failed events after the last one logged, so that followers
    see the stream end."""
    last = conn.execute(
        select(func.max(response_events.c.sequence_number)).where(
            response_events.c.response_id == response_id
        )
    ).scalar()
    sequence = -1 if last is None else int(last)
    events = [
        error_event(sequence + 1, "server_error", "server_error", INTERRUPTED),
        {"type": "response.failed", "sequence_number": sequence + 2, "response": response},
    ]
    conn.execute(
        insert(response_events),
        [
            {
                "response_id": response_id,
                "sequence_number": event["sequence_number"],
                "event": json_text(event),
            }
            for event in events
        ],
    )
