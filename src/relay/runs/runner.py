"""Where background responses run in this process, and what keeps every run in flight
accounted for.

- `submit` stores a background response as queued, with its run, and starts it as a task of
  the runner's: at most `max_running` generate at once, at most `max_queued` wait (beyond
  that: 503 with retry-after). Its events go to a Feed (followers in this process) and to the
  event log (followers anywhere, and later resumptions). The client's connection has no say:
  a disconnect ends only the client's view.
- `start_record` stores a foreground stored stream as in_progress before its first event
  goes out (its id is in the client's response.created), beside the opening of its
  upstream (Engine.start); `follow_stream` keeps its lease until its end is stored.
- One loop renews the leases of this process's runs (and of its Idempotency-Key claims and
  conversation holds),
  picks up cancels asked for on another instance, and sweeps runs whose lease lapsed anywhere
  (their process died): those end as failed with a clear error, so that no id a client was
  given stays in_progress or 404s.
- While the database is unavailable, a run's end waits to be stored (its lease renewed
  meanwhile), its events wait to be logged and its followers to read them: nothing a client
  was promised is dropped. A process that stops meanwhile gives its runs up to the sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import orjson

from relay.engine import server_tools
from relay.engine.builder import TERMINAL, error_event
from relay.engine.run import Engine, Run
from relay.errors import DatabaseUnavailable, RelayError, ServerError, UpstreamError
from relay.models.policy import Settle
from relay.observe import tracing
from relay.observe.access import log_response
from relay.protocol import CreateResponse, create_request
from relay.runs.feed import Event, Feed
from relay.runs.log import QueuedRun, RunLog
from relay.runs.notify import CANCEL, EVENT
from relay.storage.outage import retried

if TYPE_CHECKING:
    from relay.runs.queue import JobQueue

log = logging.getLogger("relay.runs")
T = TypeVar("T")


class Leased(Protocol):
    """What else this process holds for as long as it lives (Idempotency-Key claims,
    conversation holds): renewed with the runs' leases."""

    async def renew(self) -> None: ...


class Runner:
    def __init__(
        self,
        engine: Engine,
        run_log: RunLog,
        *,
        max_running: int,
        max_queued: int,
        poll_s: float,
        accounting_for: AccountingFor,
        leases: Sequence[Leased],
    ) -> None:
        """`accounting_for`: how a worker opens the books of a run that another instance
        admitted (a job from the queue). `leases`: what is renewed with the runs' leases."""
        self.engine = engine
        self.accounting_for = accounting_for
        self.leases = leases
        self.log = run_log
        self.max_queued = max_queued
        self.poll_s = poll_s
        self._slots = asyncio.Semaphore(max_running)
        self._waiting = 0
        self._feeds: dict[str, Feed] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._streams: set[str] = set()  # foreground stored streams in flight here
        self._lost: set[str] = set()  # runs here whose lease lapsed (see _renew)
        self._cancelled: set[str] = set()  # runs a client cancelled
        # With PostgreSQL, signals from other instances (relay.runs.notify) wake followers
        # of logs written elsewhere at once; else they poll.
        self.signalled = False
        self._followers: dict[str, set[asyncio.Event]] = {}
        # With PostgreSQL: the job queue that hands background runs out (relay.api.app sets
        # it: the queue needs this runner to run its jobs).
        self.queue: JobQueue | None = None

    @property
    def waiting(self) -> int:
        """Background runs here waiting for a slot."""
        return self._waiting

    @property
    def running(self) -> int:
        """Background runs here generating."""
        return len(self._tasks) - self._waiting

    async def aclose(self) -> None:
        """Stop the background runs here (the supervisor stopped `keep` first)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()  # each stores where it stopped (cancelled)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.log.flush()

    # background -------------------------------------------------------------------------------

    async def submit(
        self,
        request: CreateResponse,
        *,
        tenant: str,
        session_id: str | None,
        key_id: str | None,
        on_settled: Settle,
    ) -> tuple[dict[str, Any], bool]:
        """Queue a background response: the queued response object, and whether it runs in
        this process (else a worker took it from the job queue, and `on_settled` is not
        called: that worker settles it)."""
        if self._waiting >= self.max_queued:
            raise UpstreamError(
                "Too many background responses are waiting; retry shortly.",
                status=503,
                code="background_queue_full",
                headers={"retry-after": "1"},
            )
        # Its place is taken before the first wait, so that submits at once cannot all pass
        # the check above; given back if it never starts here (then `_run` does).
        self._waiting += 1
        started = False
        try:
            response, items = await self.engine.queued(
                request, tenant=tenant, session_id=session_id
            )
            if self.queue is not None:
                # Handed out: a worker (here or elsewhere) runs it, and settles its accounting.
                # What the worker reads back, MCP servers' secrets sealed.
                body = server_tools.seal_secrets(
                    request.model_dump(mode="json", exclude_unset=True, by_alias=True),
                    self.engine.sealer,
                    tenant,
                )
                queued = QueuedRun(orjson.dumps(body).decode(), session_id, key_id)
                await self.log.begin(tenant, response, items, background=True, queued=queued)
                await self.queue.defer(response["id"], tracing.carried())
                return response, False
            await self.log.begin(tenant, response, items, background=True)
            feed = self._feeds[response["id"]] = Feed()
            self._tasks[response["id"]] = asyncio.ensure_future(
                self._run(
                    request,
                    tenant,
                    session_id,
                    key_id,
                    dict(response),
                    feed,
                    on_settled,
                    tracing.carried(),
                )
            )
            started = True
            return response, True
        finally:
            if not started:
                self._waiting -= 1

    async def run_queued(self, response_id: str, trace: dict[str, str] | None = None) -> None:
        """A job from the queue: the background run it names, here, unless it was
        cancelled (or swept) while it waited. `trace`: what the job carries of the request
        that queued it (relay.observe.tracing.carried)."""
        what = f"the start of queued response {response_id}"
        taken = await retried(
            functools.partial(self.log.take, response_id), what=what, until=self.engine.stopping
        )
        if taken is None:
            return
        queued, tenant, snapshot = taken
        body = orjson.loads(queued.request)
        request = create_request(server_tools.open_secrets(body, self.engine.sealer, tenant))
        feed = self._feeds[response_id] = Feed()
        task = asyncio.current_task()
        assert task is not None
        self._tasks[response_id] = task
        self._waiting += 1
        on_settled = self.accounting_for(tenant, queued.key_id, request.model or "")
        try:
            await self._run(
                request,
                tenant,
                queued.session_id,
                queued.key_id,
                snapshot,
                feed,
                on_settled,
                trace,
            )
        except asyncio.CancelledError:
            if response_id not in self._cancelled:
                raise  # the worker is stopping
            # A cancel asked for by a client: the job is done (the run stored as much).
            task.uncancel()
        finally:
            self._cancelled.discard(response_id)

    async def _run(
        self,
        request: CreateResponse,
        tenant: str,
        session_id: str | None,
        key_id: str | None,
        queued: dict[str, Any],
        feed: Feed,
        on_settled: Settle,
        trace: dict[str, str] | None,
    ) -> None:
        response_id = queued["id"]
        run: Run | None = None
        waiting = True
        ended = False  # its end is stored: its run record can go

        def stored(done: bool) -> None:
            nonlocal ended
            ended = done

        try:
            async with self._slots:
                self._waiting -= 1
                waiting = False
                with tracing.background(response_id, trace):
                    try:
                        run = await self.engine.start(
                            request,
                            tenant=tenant,
                            session_id=session_id,
                            response_id=response_id,
                            created_at=queued["created_at"],
                            on_settled=on_settled,
                            key_id=key_id,
                        )
                    except RelayError as error:
                        await self._failed_before_start(
                            tenant, queued, feed, error, on_settled, key_id
                        )
                        ended = True
                        return
                    run.durable, run.on_stored = True, stored
                    # As it starts (its output fills in later, in the final save).
                    self.engine.track(self.log.mark_running({**run.response, "output": []}))
                    await self._stream(run, feed)
        except asyncio.CancelledError:
            if waiting:
                self._waiting -= 1
            if run is None:  # cancelled before the run existed: waiting, or opening it
                await self._cancelled_while_queued(tenant, queued, feed, on_settled, key_id)
                ended = True
            raise
        except DatabaseUnavailable as error:
            # Its end could not be stored before the process stopped: the sweep ends it.
            log.error("background response %s left to the sweep: %s", response_id, error.reason)
        except Exception:
            log.exception("background response %s failed", response_id)
            if run is None:
                fault = ServerError("The server had an error starting the response.")
                await self._failed_before_start(tenant, queued, feed, fault, on_settled, key_id)
                ended = True
        finally:
            feed.close()
            self.engine.track(self._forget(response_id, ended))

    async def _stream(self, run: Run, feed: Feed) -> None:
        first = True
        async for batch in run.events():
            if first:
                # A background stream shows the response queued first, as OpenAI's does.
                batch[0]["response"]["status"] = "queued"
                first = False
            feed.publish(batch)
            if run.response["id"] not in self._lost:
                self.log.append(run.response["id"], batch)

    async def _failed_before_start(
        self,
        tenant: str,
        queued: dict[str, Any],
        feed: Feed,
        error: RelayError,
        on_settled: Settle,
        key_id: str | None,
    ) -> None:
        """The upstream refused before its first byte: the response fails, as a stream
        that failed would, with its error. Settled (its concurrency slot freed, its row in
        the ledger) before its save, which may wait for the database or give up."""
        failed = {
            **queued,
            "status": "failed",
            "error": {"code": error.code, "message": error.message},
        }
        on_settled(failed, None)
        self._observe(failed, tenant, key_id)
        await self._save_end(tenant, failed)
        events: list[Event] = [
            {"type": "response.created", "sequence_number": 0, "response": queued},
            error_event(1, error.type, error.code, error.message),
            {"type": "response.failed", "sequence_number": 2, "response": failed},
        ]
        feed.publish(events)
        self.log.append(queued["id"], events)

    async def _cancelled_while_queued(
        self,
        tenant: str,
        queued: dict[str, Any],
        feed: Feed,
        on_settled: Settle,
        key_id: str | None,
    ) -> None:
        cancelled = {**queued, "status": "cancelled"}
        on_settled(cancelled, None)  # settled first, as above
        self._observe(cancelled, tenant, key_id)
        await asyncio.shield(self._save_end(tenant, cancelled))
        event = {"type": "response.created", "sequence_number": 0, "response": queued}
        feed.publish([event])
        self.log.append(queued["id"], [event])

    def _observe(self, response: dict[str, Any], tenant: str, key_id: str | None) -> None:
        """A run that ended before it started: counted and logged as a run that generated
        would be (Run._observe)."""
        self.engine.registry.metrics.unserved(response)
        log_response(response, (tenant, key_id))

    async def _save_end(self, tenant: str, response: dict[str, Any]) -> None:
        """A run's end without output, stored whatever it takes (as Run stores the others),
        its input items as they were stored when it was queued."""
        save = functools.partial(self.log.store.save_response, tenant, response, None)
        what = f"the save of response {response['id']}"
        await retried(save, what=what, until=self.engine.stopping)

    async def _forget(self, response_id: str, ended: bool) -> None:
        """Done with a background run here: its lease is no longer renewed. Its record goes
        once its end is stored; else it stays, and the sweep ends the run as failed."""
        self._tasks.pop(response_id, None)
        self._feeds.pop(response_id, None)
        self._lost.discard(response_id)
        self._cancelled.discard(response_id)
        if ended:
            await self._end(response_id)

    async def _end(self, response_id: str) -> None:
        """The record of a run whose end is stored, deleted once its events are logged (a
        follower elsewhere reads the log until the record is gone)."""
        try:
            await self.log.flush()
            await self.log.end(response_id)
        except DatabaseUnavailable:
            # Its lease lapses instead: the sweep finds it ended and only deletes the record.
            log.warning("could not delete the run record of response %s", response_id)

    async def cancel(self, tenant: str, response_id: str) -> bool:
        """Cancel a background run wherever it runs: here, at once; elsewhere, through its
        run record (its instance polls every `poll_s`). False when none is in flight."""
        task = self._tasks.get(response_id)
        if task is not None:
            self._cancelled.add(response_id)
            task.cancel()
            await asyncio.wait({task})
            await self.log.flush()
            return True
        return await self.log.request_cancel(tenant, response_id)

    async def follow(self, response_id: str, after: int) -> AsyncIterator[list[Event]]:
        """A background response's events after `after`: from this process's feed while it
        runs here, else from the event log, following it until its terminal event."""
        feed = self._feeds.get(response_id)
        if feed is not None:
            async for batch in feed.follow(after):
                yield batch
            return
        wake = asyncio.Event()  # set by a signal that the log grew
        followers = self._followers.setdefault(response_id, set())
        followers.add(wake)
        try:
            while True:
                events = await self._read(self.log.events_after, response_id, after)
                if events:
                    yield events
                    after = events[-1]["sequence_number"]
                    if events[-1]["type"] in TERMINAL:
                        return
                elif not await self._read(self.log.in_flight, response_id):
                    # Ended without a terminal event (cancelled): one more read, then stop.
                    last = await self._read(self.log.events_after, response_id, after)
                    if last:
                        yield last
                    return
                else:
                    await self._grown(wake)
        finally:
            followers.discard(wake)
            if not followers:
                self._followers.pop(response_id, None)

    async def _read(self, read: Callable[..., Awaitable[T]], *args: Any) -> T:
        """A follower's read of the log, which waits out a database outage: the stream
        goes on (with keep-alives) instead of breaking."""
        return await retried(
            functools.partial(read, *args), what="a follower's read", until=self.engine.stopping
        )

    async def _grown(self, wake: asyncio.Event) -> None:
        """Until the log may have grown: a signal (relay.runs.notify), or the poll interval
        (100 ms without signals; the lease renewal interval with them, as a fallback)."""
        if not self.signalled:
            await asyncio.sleep(min(self.poll_s, 0.1))
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), self.poll_s)
        wake.clear()

    def on_signal(self, kind: str, response_id: str) -> None:
        """A signal from another instance (relay.runs.notify)."""
        if kind == EVENT:
            for wake in self._followers.get(response_id, ()):
                wake.set()
        elif kind == CANCEL:
            task = self._tasks.get(response_id)
            if task is not None:
                self._cancelled.add(response_id)
                task.cancel()

    # foreground stored streams ----------------------------------------------------------------

    def start_record(self, tenant: str) -> StreamRecord:
        """What Engine.start records a stored stream with, as it starts."""
        return StreamRecord(self.log, tenant)

    def follow_stream(self, run: Run) -> None:
        """A stored stream recorded as it started (`start_record`): its lease renewed until
        its end is stored, then its record deleted."""
        response_id = run.response["id"]
        self._streams.add(response_id)

        def ended(stored: bool) -> None:
            self._streams.discard(response_id)
            self._lost.discard(response_id)
            if stored:
                self.engine.track(self._end(response_id))
            # Not stored (the process stopped first): its run record stays, no longer
            # renewed, and the sweep ends the in_progress record as failed.

        run.durable, run.on_stored = True, ended

    # the loop ---------------------------------------------------------------------------------

    async def keep(self) -> None:
        """The upkeep loop, a task of the process's supervisor (relay.supervisor)."""
        clock = asyncio.get_running_loop().time
        next_sweep = clock() + self.log.lease_s / 2
        unreachable = False
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self._renew()
                if clock() >= next_sweep:
                    next_sweep = clock() + self.log.lease_s / 2
                    ended = await self.log.sweep()
                    if ended:
                        self.engine.registry.metrics.swept.inc(len(ended))
                        log.warning("ended %d interrupted responses: %s", len(ended), ended)
            except DatabaseUnavailable as error:
                if not unreachable:
                    log.warning("run upkeep: the database is unavailable (%s)", error.reason)
                unreachable = True
                # Leases lapsed meanwhile: once it is back, a whole lease before this
                # instance sweeps, so that every instance renews its own first.
                next_sweep = clock() + self.log.lease_s
            except Exception:
                log.exception("run upkeep failed")
            else:
                unreachable = False

    async def _renew(self) -> None:
        cancels, lost = await self.log.renew([*self._tasks, *self._streams])
        for response_id in cancels:
            task = self._tasks.get(response_id)
            if task is not None:
                self._cancelled.add(response_id)
                task.cancel()
        for response_id in lost - self._lost:
            # Swept as interrupted while it ran (this process stalled past its lease): its
            # log already ends there, so it writes no more events; its final save still
            # records how it really ended.
            log.warning("response %s lost its lease while running", response_id)
        self._lost |= lost
        # Each on its own: one that fails (logged by the upkeep) must not leave the others
        # unrenewed this turn.
        renewed = await asyncio.gather(
            *(leased.renew() for leased in self.leases), return_exceptions=True
        )
        for failure in renewed:
            if isinstance(failure, BaseException):
                raise failure


AccountingFor = Callable[[str, str | None, str], Settle]


class StreamRecord:
    """A foreground stored stream's record as it starts (relay.engine.run.StartRecord): the
    response alone, in_progress, with its run (its input items come with the final save)."""

    def __init__(self, log: RunLog, tenant: str) -> None:
        self._log = log
        self._tenant = tenant

    async def begin(self, response: dict[str, Any]) -> None:
        await self._log.begin(self._tenant, response, [], background=False)

    async def take_back(self, response_id: str) -> None:
        await self._log.take_back(self._tenant, response_id)
