"""The engine: validate against the route, build the context, open the provider (with
fallbacks), then `Run.events()`, the only producer of stream events.

Everything that can be refused is refused in `Engine.start`, before a stream exists, so bad
input and upstreams that fail before their first byte become plain HTTP errors. After that,
every outcome (completed, incomplete, failed, cancelled by a disconnect) ends in one terminal
state that is stored when store is true.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import orjson

from relay.config import DEFAULT_HISTORY_CACHE_BYTES, DEFAULT_HISTORY_CACHE_ITEMS
from relay.engine import compaction, conversation, counting, reasoning, routing, server_tools
from relay.engine.builder import Event, ResponseBuilder, ServerCall, ToolPolicyViolation
from relay.engine.checks import check_request, plan_tools, reasoning_settings, searched_tools
from relay.engine.context import (
    check_tool_outputs,
    drop_oldest_turn,
    load_history,
    parse_input,
    resolve_references,
)
from relay.engine.history import HistoryCache
from relay.engine.prepared import Prepared
from relay.engine.prompts import PromptTemplates, apply_prompt
from relay.engine.response import new_response
from relay.engine.tool_loop import ToolLoop, ToolRuntime, TurnFailed
from relay.errors import (
    DatabaseUnavailable,
    InvalidRequest,
    RateLimited,
    RelayError,
    RequestTimeout,
    ServerError,
    UpstreamError,
    UpstreamRejected,
)
from relay.ids import new_id
from relay.models.policy import Served, Settle
from relay.observe import tracing
from relay.observe.access import CURRENT, Exchange, log_response
from relay.observe.metrics import Timings
from relay.protocol import CreateResponse
from relay.providers.base import (
    Delta,
    FinishDelta,
    History,
    ProviderError,
    ProviderRequest,
    TokenCount,
)
from relay.providers.registry import Deployment, Registry
from relay.providers.upstream import TRUNCATED
from relay.sealing import Sealer
from relay.storage.base import Store
from relay.storage.conversations import ConversationStore
from relay.storage.outage import retried

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from relay.tools.egress import EgressPolicy

log = logging.getLogger("relay.engine")
T = TypeVar("T")
GENERIC_FAILURE = "The server had an error while generating the response."


def provider_error_to_http(error: ProviderError) -> RelayError:
    """An upstream failure before the stream began, as the HTTP error the client receives."""
    headers = {"retry-after": error.retry_after} if error.retry_after else {}
    if error.status == 429:
        return RateLimited(error.message, code=error.code, headers=headers)
    if error.status == 408:
        return RequestTimeout(error.message, code=error.code, headers=headers)
    if error.status == 400:
        return UpstreamRejected(error.message, code=error.code, param=error.param)
    return UpstreamError(error.message, status=error.status, code=error.code, headers=headers)


class Opened(NamedTuple):
    """A deployment's answer to a request, once it began: what it was sent, its deltas, and
    when it was asked (its throughput counts from there: streams whose opening events are
    read before the answer is the client's have their first delta by then); the try's span
    when tracing, open until the response settles."""

    request: ProviderRequest
    deltas: AsyncIterator[Delta]
    asked_at: float
    span: Span | None = None


@dataclass(slots=True)
class Run:
    """One response being generated. Iterate `events()` exactly once."""

    engine: Engine
    tenant: str
    builder: ResponseBuilder
    input_items: list[dict[str, Any]]
    deltas: AsyncIterator[Delta]
    history: History | None = None  # the chain this run continues
    # False when that chain was never stored (a WebSocket's store:false turns): a stored
    # response then keeps the chain among its own input items, so that storage alone can
    # rebuild its context.
    history_stored: bool = True
    trace: dict[str, Any] | None = None
    omitted_tools: tuple[str, ...] = ()  # hosted tool types left out (hosted_tools = "omit")
    # The deployment that answered and what it was sent (None: nothing was generated).
    deployment: Deployment | None = None
    sent: ProviderRequest | None = None
    asked_at: float = 0.0
    span: Span | None = None  # the answering try's, when tracing (relay.observe.tracing)
    on_settled: Settle | None = None
    key_id: str | None = None  # the key it was asked with (None: none, or not known here)
    # When its request arrived (time.monotonic()), and the request, when this response is its
    # answer (relay.observe.access).
    started: float = 0.0
    exchange: Exchange | None = None
    first_at: float = 0.0  # when the upstream's first delta came
    # A run whose id a client holds (a background response, a recorded stream: relay.runs):
    # its end must be stored, so the save waits out a database outage (until the engine
    # stops), its lease renewed meanwhile; `on_stored` is told whether it was.
    durable: bool = False
    on_stored: Callable[[bool], None] | None = None
    turn: conversation.Turn | None = None  # the conversation it continues, held
    loop: ToolLoop | None = None  # with server-side tools: the loop of its model turns
    # Items made before the first turn (a compaction, tool lists, approved calls): the stream
    # opens with them.
    opening: list[ServerCall] = field(default_factory=list)
    # False for a turn inside another response (compaction's summary): its usage is that
    # response's, so it has no metrics or log line of its own.
    observed: bool = True
    _unsaved: Exception | None = field(default=None)  # why the save failed
    _finished: bool = field(default=False)
    _resulting: History | None = field(default=None)

    @property
    def response(self) -> dict[str, Any]:
        return self.builder.response

    def resulting_history(self, nbytes: int | None = None) -> History:
        """The chain this response ends, for a turn that continues it (`nbytes`: the size of
        the items it added, as stored, when it was). Made once: the engine's cache and a
        WebSocket's memory share it."""
        if self._resulting is None:
            self._resulting = self._chain_after(nbytes)
        return self._resulting

    def _chain_after(self, nbytes: int | None) -> History:
        history = self.history
        if history is None:
            before, before_nbytes = [], 0
        else:
            before, before_nbytes = history.items, history.size() if nbytes is not None else 0
            history.parent = None  # one level of links, see History.parent
        return History(
            [*before, *self.input_items, *self.response["output"]],
            parent=history,
            nbytes=None if nbytes is None else before_nbytes + nbytes,
        )

    async def events(self) -> AsyncGenerator[list[Event], None]:
        """The stream, in batches: the events one step produced (the start, one upstream
        delta, the end), which a stream can send in one write."""
        builder = self.builder
        loop = self.loop
        try:
            # Not bound to a name: the start's events (two snapshots of the response) would
            # stay alive in this frame for as long as the stream is open.
            yield [*builder.start(), *(builder.opening(self.opening) if self.opening else ())]
            try:
                while True:
                    async for delta in self.deltas:
                        if not self.first_at:
                            self.first_at = time.monotonic()
                        batch = builder.feed(delta)
                        if batch:
                            yield batch
                    if loop is None:
                        break
                    self._measure(time.monotonic() - self.asked_at)
                    async for batch in loop.step(self):
                        yield batch
                    if loop.done:
                        break
                closing = builder.finish()
                if loop is None:
                    self._measure(time.monotonic() - self.asked_at)
            except ProviderError as error:
                closing = builder.fail(self._mid_stream_failure(error), error.message)
            except ToolPolicyViolation as error:
                closing = builder.fail("invalid_tool_call", str(error))
            except TurnFailed as error:
                closing = builder.fail(error.code, error.message)
            except Exception:
                # A bug of ours or a provider's: the response still ends, and is stored, as
                # failed; the details go to the log, not to the client.
                log.exception("response %s failed", builder.response["id"])
                closing = builder.fail("server_error", GENERIC_FAILURE)
            # Stored before the terminal event is sent: a client that reads the id from
            # response.completed and fetches it at once must find it.
            if not await self._persist():
                builder.mark_failed("server_error", "The response could not be stored.")
            yield closing + builder.terminal()
        except (asyncio.CancelledError, GeneratorExit):
            if not self._finished:
                builder.cancel()
                await self._persist()
            raise
        finally:
            tracing.ended(self.span)
            await _close(self.deltas)

    def next_turn(self, deployment: Deployment, opened: Opened) -> None:
        """The tool loop's next model turn, opened: its deltas are read next, and its
        deployment is the one that answered."""
        tracing.ended(self.span)
        self.deployment = deployment
        self.sent, self.deltas, self.asked_at, self.span = opened

    def _mid_stream_failure(self, error: ProviderError) -> str:
        """The error code of a failure after the stream began; the deployment's health
        hears of it like one before."""
        log.warning("upstream failed mid-stream: %s", error.message)
        if error.retryable and self.deployment is not None:
            self.deployment.health.failed()
        if error.code == TRUNCATED:
            return TRUNCATED
        return {429: "rate_limit_exceeded", 408: "request_timeout"}.get(
            error.status, "server_error"
        )

    def _measure(self, seconds: float) -> None:
        """The deployment's throughput, for provider.sort "throughput" (not of an answer that
        came whole: its tokens arrived at once)."""
        usage = self.response.get("usage") or {}
        if self.deployment is not None and seconds >= 0.005:
            self.deployment.health.measured_throughput(usage.get("output_tokens") or 0, seconds)

    async def final(self) -> dict[str, Any]:
        """Drain the events: the JSON answer is the stream, folded. A response that could not
        be stored is no answer (its id would 404): the storage error is raised instead (a 503
        while the database is unavailable)."""
        async for _ in self.events():
            pass
        if isinstance(self._unsaved, DatabaseUnavailable):
            raise self._unsaved
        if self._unsaved is not None:  # logged where it happened, with its traceback
            raise ServerError("The response could not be stored.") from None
        return self.response

    async def discard(self) -> None:
        """A run whose events will never be read: its upstream closed, its conversation
        released."""
        tracing.ended(self.span)
        await _close(self.deltas)
        if self.turn is not None:
            await self.turn.abandon()

    async def _persist(self) -> bool:
        """Charge the settled response, store it (when store is true) and end its
        conversation turn; False when storage failed. Where any of it waits, all of it is
        one task of the engine's, awaited shielded: a client leaving now, or the server
        shutting down, must neither lose its charge nor roll back a finished response nor
        leave its conversation held. (A response to charge as reported and not to store
        waits for nothing, and costs no task.)"""
        self._finished = True
        response = self.response
        if response["store"] or self.turn is not None or counting.needed(response):
            return await asyncio.shield(self.engine.track(self._settle()))
        return await self._settle()

    async def _settle(self) -> bool:
        ended = time.monotonic()
        response = self.response
        deployment = self.deployment
        span, self.span = self.span, None  # taken at once: ended here, and only here
        counted = False
        if deployment is not None and self.sent is not None:
            counted = await counting.complete_usage(deployment.provider, self.sent, response)
        tracing.settled(
            span,
            response,
            self.builder.finish_reason,
            self.input_items,
            deployment.upstream_model if deployment else None,
        )
        charged = None
        if self.on_settled is not None:
            tools_nanos = 0 if self.loop is None else self.loop.cost_nanos()
            served = (
                Served(deployment.name, deployment.config.price, counted, tools_nanos)
                if deployment
                else None
            )
            charged = self.on_settled(response, served)
        stored = True
        if response["store"] or self.turn is not None:
            stored = await self._store(response)
        self._observe(response, ended)
        if charged is not None:
            await charged
        return stored

    async def account_alone(self, on_settled: Settle | None) -> None:
        """A turn that was to be part of another response (compaction's summary) which never
        came: billed, counted and logged on its own, as the response it is."""
        self.observed = True
        self._observe(self.response, time.monotonic())
        deployment = self.deployment
        if on_settled is not None:
            served = Served(deployment.name, deployment.config.price) if deployment else None
            charged = on_settled(self.response, served)
            if charged is not None:
                await charged

    def _observe(self, response: dict[str, Any], ended: float) -> None:
        """The settled response's metrics, and its line: on its request's access line when
        it is that request's answer, else one of its own."""
        if not self.observed:
            return
        deployment = self.deployment
        cost = first_token_s = None
        if deployment is None:  # nothing generated (a WebSocket's warm-up)
            self.engine.registry.metrics.unserved(response)
        else:
            if self.first_at:
                first_token_s = self.first_at - self.started
            timings = Timings(ended - self.started, ended - self.asked_at, first_token_s)
            price = deployment.config.price
            who = (self.tenant, self.key_id)
            tools_nanos = 0 if self.loop is None else self.loop.cost_nanos()
            cost = deployment.meter.responded(response, timings, price, who, tools_nanos)
        name = deployment.name if deployment is not None else None
        exchange = self.exchange
        if exchange is not None and exchange.awaits_response:
            exchange.settled(response, name, first_token_s, cost, self.trace)
            return
        log_response(response, (self.tenant, self.key_id), name, first_token_s, cost, self.trace)

    async def _store(self, response: dict[str, Any]) -> bool:
        stored = True
        try:
            if response["store"]:
                stored = await self._save(response)
        finally:
            if self.on_stored is not None:
                self.on_stored(stored)
            if self.turn is not None:
                stored = await self._end_turn(response, stored) and stored
        return stored

    async def _save(self, response: dict[str, Any]) -> bool:
        inputs = self.input_items
        if self.history is not None and not self.history_stored:
            inputs = [*self.history.items, *inputs]
        save = functools.partial(self.engine.store.save_response, self.tenant, response, inputs)
        try:
            if self.durable:
                what = f"the save of response {response['id']}"
                nbytes = await retried(save, what=what, until=self.engine.stopping)
            else:
                nbytes = await save()
        except Exception as error:
            self._unsaved = error
            if isinstance(error, DatabaseUnavailable):
                log.error("could not store response %s: %s", response["id"], error.reason)
            else:
                log.exception("could not store response %s", response["id"])
            return False
        # (What was saved measures what the history holds only when it added to a stored
        # chain; else the history measures itself.)
        resulting = self.resulting_history(nbytes if self.history_stored else None)
        if self.turn is None:  # a conversation's turns are remembered by conversation
            self.engine.histories.put(self.tenant, response["id"], resulting)
        return True

    async def _end_turn(self, response: dict[str, Any], stored: bool) -> bool:
        """Release the conversation: with the turn's items when the response completed
        (or ended incomplete) and was stored; else as it was."""
        assert self.turn is not None
        try:
            if not stored or response["status"] not in ("completed", "incomplete"):
                await self.turn.abandon()
                return True
            # Measured by its new items only (stored, the store has told it already).
            added = len(orjson.dumps([*self.input_items, *response["output"]]))
            await self.turn.end(response, self.input_items, self.resulting_history(added))
        except Exception:
            log.exception("could not add response %s to its conversation", response["id"])
            return False
        return True


def _log_failure(deployment: Deployment, error: ProviderError) -> None:
    log.warning(
        "model %s (deployment %s) failed before the first byte: %s",
        deployment.route,
        deployment.name,
        error.message,
    )


async def _nothing_generated() -> AsyncIterator[Delta]:
    yield FinishDelta("stop")


class StartRecord(Protocol):
    """Stores a stored stream as it starts (relay.runs.runner.Runner.start_record)."""

    async def begin(self, response: dict[str, Any]) -> None: ...

    async def take_back(self, response_id: str) -> None:
        """The response never started (its upstream failed to open, or the request was
        cancelled): its record goes."""
        ...


async def _take_back(
    recording: asyncio.Future[None], record: StartRecord, response_id: str
) -> None:
    """Once `recording` is done: the record it made, taken back (none when it failed)."""
    try:
        await recording
    except BaseException:  # nothing was recorded: the failure is the request's to report
        return
    try:
        await record.take_back(response_id)
    except Exception as error:  # its lease lapses, and the sweep ends it as failed
        log.warning("could not take back the record of response %s: %s", response_id, error)


async def _close(deltas: AsyncIterator[Delta]) -> None:
    aclose = getattr(deltas, "aclose", None)
    if aclose is not None:
        await aclose()


class Engine:
    def __init__(
        self,
        registry: Registry,
        store: Store,
        *,
        echo_json_schema: bool = True,
        history_cache_items: int = DEFAULT_HISTORY_CACHE_ITEMS,
        history_cache_bytes: int = DEFAULT_HISTORY_CACHE_BYTES,
        sealer: Sealer,
        hosted_tools: str = "omit",
        conversations: ConversationStore | None = None,
        tools: ToolRuntime | None = None,
        prompt_templates: PromptTemplates | None = None,
    ) -> None:
        self.registry = registry
        # Server-side tools (None: none run here): which hosted tool types Relay runs.
        self.tools = tools
        self._server_runs: frozenset[str] = frozenset() if tools is None else tools.runs
        self.conversations = conversations
        self.prompt_templates = prompt_templates
        self.hosted_tools = hosted_tools
        self.store = store
        self.sealer = sealer
        self.echo_json_schema = echo_json_schema
        self.histories = HistoryCache(history_cache_items, history_cache_bytes)
        self._tasks: set[asyncio.Task[Any]] = set()
        # Set as the process stops: work waiting for the database then gives up.
        self.stopping = asyncio.Event()

    def track(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `work` as a task the engine owns: it outlives a cancelled request, and
        `aclose` waits for it."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def aclose(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def start(
        self,
        request: CreateResponse,
        *,
        tenant: str,
        session_id: str | None = None,
        continuing: History | None = None,
        continuing_is_stored: bool = True,
        generate: bool = True,
        on_settled: Settle | None = None,
        response_id: str | None = None,
        created_at: int | None = None,
        key_id: str | None = None,
        observed: bool = True,
        record: StartRecord | None = None,
    ) -> Run:
        """`response_id`, `created_at`: those of a background response queued earlier (see
        `queued`); a foreground response gets new ones.
        `record`: what stores a stored stream as it starts (its id is in response.created:
        it must never 404). It runs beside the upstream's opening, so that neither waits for
        the other, and the run is returned once both are done; when either fails, the
        record is taken back. (Its model is the route asked for; a fallback route that
        answers instead is in the final save.)
        `continuing`: the chain previous_response_id names, when the caller holds it (a
        WebSocket's own latest response, stored or not: `continuing_is_stored`); else it is
        read from memory or the store.
        `generate=False`: a response that only takes the request in (a WebSocket warm-up):
        no upstream call, no output, an id the next turn can continue.
        `key_id`: the key it is asked with, for metrics labelled by key.
        `observed=False`: a turn inside another response (see Run.observed)."""
        tracing.asked(request, session_id)
        exchange = CURRENT.get() if observed else None
        if exchange is not None and not exchange.awaits_response:
            exchange = None
        started = time.monotonic() if exchange is None else exchange.started
        turn = await self._begin_turn(request, tenant)
        compacted: Compacted | None = None
        response_id = response_id or new_id("resp")
        created_at = created_at or int(time.time())
        recording: asyncio.Future[None] | None = None
        opened: Opened | None = None
        try:
            prepared = await self._prepare(
                request, tenant, turn.history if turn is not None else continuing
            )
            deployment: Deployment | None = None
            loop = None
            opening: list[ServerCall] = []
            # Refused by the project's tool policy before any model turn, a compaction's too.
            policy = await self._tool_policy(prepared, tenant) if generate else None
            if generate and request.context_management:
                prepared, compacted = await self._compact_within(
                    prepared, tenant, key_id, on_settled
                )
                if compacted is not None:
                    opening.append(ServerCall(compacted.item, ("response.compaction.compacting",)))
            if generate and (prepared.tools.server is not None or prepared.answers_approvals):
                prepared, loop = await self._server_tools(prepared, policy)
                if loop is not None:
                    opening += loop.server.opening
            model = prepared.route.model
            if record is not None and request.store is not False:
                starting = self._new_response(
                    prepared, request, session_id, turn, response_id, created_at, model
                )
                recording = asyncio.ensure_future(record.begin(starting))
            if generate:
                deployment, opened = await self.open(
                    prepared, truncate=request.truncation == "auto"
                )
                model = deployment.route
            if recording is not None:
                await recording
        except BaseException:
            if opened is not None:  # its record failed (or the request was cancelled)
                tracing.ended(opened.span)
                await _close(opened.deltas)
            if recording is not None and record is not None:
                self.track(_take_back(recording, record, response_id))
            if turn is not None:
                await turn.abandon()
            if compacted is not None:  # the response never came: its compaction was spent
                await compacted.run.account_alone(on_settled)
            raise
        tools, history, items = prepared.tools, prepared.history, prepared.items
        response = self._new_response(
            prepared, request, session_id, turn, response_id, created_at, model
        )
        builder = ResponseBuilder(
            response,
            offered_tools={tool["name"] for tool in tools.offered},
            server_functions=None if loop is None else loop.server.functions,
            namespaced=tools.namespaced,
            custom_tools=tools.custom,
            search_function=tools.search_function,
            must_call=tools.must_call and generate,
            parallel_tool_calls=tools.parallel,
            max_tool_calls=request.max_tool_calls,
            reasoning_as_summary=prepared.summary is not None,
            include_logprobs=prepared.want_logprobs,
            seal_reasoning=reasoning.sealer_for(self.sealer, tenant),
            include_encrypted_reasoning="reasoning.encrypted_content" in (request.include or ()),
            # On by default when streaming, as OpenAI does; clients opt out per request.
            obfuscate=bool(request.stream)
            and (
                request.stream_options is None
                or request.stream_options.include_obfuscation is not False
            ),
        )
        if compacted is not None:
            builder.add_usage(compacted.run.response["usage"])
        return Run(
            self,
            tenant,
            builder,
            items,
            _nothing_generated() if opened is None else opened.deltas,
            history=history,
            history_stored=continuing is None or continuing_is_stored,
            trace=request.trace,
            omitted_tools=tools.omitted,
            deployment=deployment,
            sent=None if opened is None else opened.request,
            asked_at=0.0 if opened is None else opened.asked_at,
            span=None if opened is None else opened.span,
            on_settled=on_settled,
            key_id=key_id,
            started=started,
            exchange=exchange,
            turn=turn,
            loop=loop,
            opening=opening,
            observed=observed,
        )

    def _new_response(
        self,
        prepared: Prepared,
        request: CreateResponse,
        session_id: str | None,
        turn: conversation.Turn | None,
        response_id: str,
        created_at: int,
        model: str,
    ) -> dict[str, Any]:
        response = new_response(
            prepared.request,  # with its prompt template applied
            response_id=response_id,
            model=model,
            created_at=created_at,
            tools=prepared.tools.declared,
            reasoning={"effort": prepared.effort, "summary": prepared.summary},
            session_id=request.session_id or session_id,
            echo_json_schema=self.echo_json_schema,
        )
        if turn is not None:
            response["conversation"] = {"id": turn.conversation}
        return response

    async def _tool_policy(self, prepared: Prepared, tenant: str) -> EgressPolicy | None:
        """The project's policy for the request's server-side tools, having refused what it
        does not allow; None without any."""
        server, runtime = prepared.tools.server, self.tools
        if server is None or runtime is None:
            return None
        policy = await runtime.policy_for(tenant)
        server_tools.check_policy(server, policy)
        server_tools.check_images(server, runtime.settings.images)
        return policy

    async def _server_tools(
        self, prepared: Prepared, policy: EgressPolicy | None
    ) -> tuple[Prepared, ToolLoop | None]:
        """The request's server-side tools made ready before its first turn (under `policy`,
        already checked): approved calls run, each MCP server's tools listed (or found in the
        chain), and the functions they stand for offered."""
        server = prepared.tools.server
        approved = server_tools.approvals(
            server_tools.earlier_requests(prepared.history), prepared.items
        )
        runtime = self.tools
        if server is None or runtime is None or policy is None or (not server.mcp and approved):
            if approved:
                raise InvalidRequest(
                    "An approved MCP call needs its server's mcp tool in tools.", param="tools"
                )
            return prepared, None
        request = prepared.request
        context = prepared.items if prepared.history is None else prepared.history.items
        if prepared.history is not None:
            context = [*context, *prepared.items]
        await server_tools.list_tools(server, context, runtime.mcp, policy)
        loop = ToolLoop(
            runtime,
            prepared,
            server,
            policy,
            truncate=request.truncation == "auto",
            include_sources="web_search_call.action.sources" in (request.include or ()),
            deadline=time.monotonic() + runtime.settings.deadline_s,
        )
        upstream_items = prepared.upstream_items
        if approved:
            calls = [server_tools.approved_call(item) for item in approved]
            await loop.run_before(calls)
            # The first turn reads what they gave.
            ran = server_tools.for_upstream([call.item for call in calls])
            upstream_items = [*upstream_items, *ran]
        plan = prepared.tools
        server_tools.offer(server, {tool["name"] for tool in plan.functions})
        offered = plan.offered
        if plan.choice in ("auto", "required"):
            offered = [*offered, *server.offered]
        loop.prepared = dataclasses.replace(
            prepared,
            upstream_items=upstream_items,
            tools=dataclasses.replace(
                plan, offered=offered, functions=[*plan.functions, *server.offered]
            ),
        )
        return loop.prepared, loop

    async def queued(
        self, request: CreateResponse, *, tenant: str, session_id: str | None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A background response as it is answered at once: everything refusable refused
        (400s come now, not later), status `queued`; and its input items, as stored."""
        tracing.asked(request, session_id)
        prepared = await self._prepare(request, tenant, None)
        response = new_response(
            prepared.request,  # with its prompt template applied
            response_id=new_id("resp"),
            model=prepared.route.model,
            created_at=int(time.time()),
            tools=prepared.tools.declared,
            reasoning={"effort": prepared.effort, "summary": prepared.summary},
            session_id=request.session_id or session_id,
            echo_json_schema=self.echo_json_schema,
        )
        response["status"] = "queued"
        return response, prepared.items

    async def count_input_tokens(self, request: CreateResponse, *, tenant: str) -> TokenCount:
        """The input tokens the request would send to its model's first deployment."""
        tracing.asked(request)
        prepared = await self._prepare(request, tenant, None)
        first = routing.ordered(prepared.routes[0][1], prepared.preferences)[0]
        try:
            return await first.provider.count_tokens(prepared.provider_request(first))
        except ProviderError as error:
            raise provider_error_to_http(error) from None

    async def compact(
        self,
        request: CreateResponse,
        *,
        tenant: str,
        on_settled: Settle | None = None,
        key_id: str | None = None,
    ) -> dict[str, Any]:
        """POST /responses/compact: the context (input and/or previous_response_id) made into
        a shorter window by the route's model (see `relay.engine.compaction`)."""
        tracing.asked(request)
        prepared = await self._prepare(request, tenant, None)
        # The request as prepared: with its prompt template's instructions.
        run = await self._summarise(
            prepared.request, tenant, prepared.context(), on_settled=on_settled, key_id=key_id
        )
        summary = summary_of(run.response)
        context = (
            prepared.items if prepared.history is None else prepared.history.items + prepared.items
        )
        return {
            "id": new_id("resp"),
            "object": "response.compaction",
            "created_at": summary["created_at"],
            "output": [
                *compaction.kept_user_messages(context),
                compaction.seal(self.sealer, tenant, summary["output_text"]),
            ],
            "usage": summary["usage"],
        }

    async def _summarise(
        self,
        request: CreateResponse,
        tenant: str,
        context: list[dict[str, Any]],
        *,
        on_settled: Settle | None = None,
        key_id: str | None = None,
        observed: bool = True,
    ) -> Run:
        """The run of the route's model's summary of `context`, drained (its response's text
        is the summary; `summary_of` checks there is one)."""
        instructions = compaction.PROMPT
        if request.instructions:
            instructions += f"\n\nThe conversation's own instructions:\n{request.instructions}"
        ask = {"type": "message", "role": "user", "content": compaction.REQUEST}
        summarising = CreateResponse(
            model=request.model,
            models=request.models,
            input=[*context, ask],
            instructions=instructions,
            store=False,
            prompt_cache_key=request.prompt_cache_key,
            provider=request.provider,
        )
        run = await self.start(
            summarising, tenant=tenant, on_settled=on_settled, key_id=key_id, observed=observed
        )
        await run.final()
        return run

    async def _compact_within(
        self, prepared: Prepared, tenant: str, key_id: str | None, on_settled: Settle | None
    ) -> tuple[Prepared, Compacted | None]:
        """context_management: a context the upstream would read past the entry's threshold
        (counted as the route's first deployment counts text: its tokenizer, else an
        estimate) is compacted now, before the model's turn; the response opens with the
        compaction item, and its usage adds the summary's (relay.engine.compaction)."""
        entries = prepared.request.context_management or []
        threshold = entries[0].compact_threshold or compaction.DEFAULT_THRESHOLD
        context = prepared.context()
        first = routing.ordered(prepared.routes[0][1], prepared.preferences)[0]
        tokens = (await first.provider.count_text(orjson.dumps(context).decode())).tokens
        if tokens <= threshold:
            return prepared, None
        older, after = compaction.split(context)
        if not older:
            return prepared, None  # nothing but what the model must read as it is
        run = await self._summarise(prepared.request, tenant, older, key_id=key_id, observed=False)
        try:
            summary = summary_of(run.response)
        except UpstreamError:
            await run.account_alone(on_settled)
            raise
        # User messages kept as they are: about a quarter of the threshold (4 characters a
        # token).
        before = compaction.kept_user_messages(older, budget=threshold, at_least=0)
        item = compaction.seal_window(self.sealer, tenant, summary["output_text"], before, after)
        window = compaction.window(item, self.sealer, tenant)
        shorter = dataclasses.replace(prepared, upstream_items=window, upstream_history=None)
        return shorter, Compacted(item, run)

    async def _prepare(
        self, request: CreateResponse, tenant: str, continuing: History | None
    ) -> Prepared:
        """Everything refusable, refused; the context, built."""
        if request.model is None:
            raise InvalidRequest(
                "Missing required parameter: 'model'.",
                param="model",
                code="missing_required_parameter",
            )
        routes = self.registry.candidates(request.model, request.models)
        check_request(request)
        plugin = None
        if (
            request.plugins
            and self._server_runs >= server_tools.WEB_SEARCH_TYPES
            and not any("plugins" in d.forward_fields for d in routes[0].deployments)
        ):
            # Relay runs the web plugin itself: the deployments never see it.
            request, plugin = server_tools.take_web_plugin(request)
        prefs = routing.preferences(request)
        effort, summary = reasoning_settings(request)
        items = parse_input(request)
        history = continuing or await self._context(request, tenant)
        items = await resolve_references(self.store, tenant, items)
        check_tool_outputs(history, items)
        request, items = await apply_prompt(self.prompt_templates, request, tenant, items)
        # After the context: the tools that tool search loaded in it can be called too.
        none: _Loaded = ()
        earlier = none if history is None else history.derive("searched", _searched, none)
        tools = plan_tools(
            request,
            omit_hosted=self.hosted_tools == "omit",
            upstream_runs=routes[0].hosted_tools,
            server_runs=self._server_runs,
            loaded=[*earlier, *searched_tools(items)],
        )
        if plugin is not None:
            tools.server = server_tools.with_plugin(tools.server, plugin)
        choices = routing.choices(routes, request, prefs, tools.hosted)
        include = set(request.include or [])
        upstream_items, upstream_history = compaction.render(items, history, self.sealer, tenant)
        # Where Relay searches, earlier searches read as calls of its search function.
        searched_as = "web_search" if "web_search" in self._server_runs else None
        if tools.server is not None and tools.server.web_search is not None:
            searched_as = tools.server.search_name
        want_logprobs = "message.output_text.logprobs" in include or bool(request.top_logprobs)
        return Prepared(
            request,
            choices,
            prefs,
            tools,
            effort,
            summary,
            items,
            history,
            want_logprobs,
            upstream_items=server_tools.for_upstream(
                reasoning.expand(upstream_items, self.sealer, tenant),
                requests=server_tools.earlier_requests(history),
                search_name=searched_as,
            ),
            upstream_history=server_tools.expand_history(upstream_history, searched_as),
            reasoning_state=reasoning.opener_for(self.sealer, tenant),
        )

    async def _begin_turn(self, request: CreateResponse, tenant: str) -> conversation.Turn | None:
        found = conversation.conversation_id(request)
        if found is None:
            return None
        return await conversation.begin(self._conversations(), self.histories, tenant, found)

    async def _context(self, request: CreateResponse, tenant: str) -> History | None:
        found = conversation.conversation_id(request)
        if found is None:
            return await load_history(self.store, self.histories, tenant, request)
        return await conversation.context(self._conversations(), tenant, found)

    def _conversations(self) -> ConversationStore:
        if self.conversations is None:
            raise InvalidRequest("Conversations are not available here.", param="conversation")
        return self.conversations

    async def open(self, prepared: Prepared, *, truncate: bool) -> tuple[Deployment, Opened]:
        """Open the first deployment that accepts the request (routing.ordered, each with its
        retries), route after route; move on only for retryable failures that happened before
        the first byte, so a client never sees two half-answers."""
        last: ProviderError | None = None
        for _route, deployments in prepared.routes:
            for deployment in routing.ordered(deployments, prepared.preferences):
                try:
                    opened, error = await routing.attempt(
                        deployment, functools.partial(self._open_on, deployment, prepared, truncate)
                    )
                except ProviderError as error:
                    _log_failure(deployment, error)
                    raise provider_error_to_http(error) from None
                if opened is not None:
                    return deployment, opened
                assert error is not None
                _log_failure(deployment, error)
                # A refusal (a parameter, the context window) speaks for the request only
                # when nothing failed otherwise: an outage elsewhere is the better answer.
                if last is None or last.code in routing.REFUSALS:
                    last = error
        assert last is not None
        raise provider_error_to_http(last)

    @staticmethod
    async def _open_on(
        deployment: Deployment, prepared: Prepared, truncate: bool, number: int
    ) -> Opened:
        """The `number`th try on `deployment`. With truncation "auto", a context the upstream
        finds too long loses its oldest turns, until it fits or nothing is left to drop."""
        shortened: list[dict[str, Any]] | None = None
        with tracing.attempt(deployment, number) as span:
            while True:
                try:
                    request = prepared.provider_request(deployment, shortened)
                    asked_at = time.monotonic()
                    return Opened(request, await deployment.provider.open(request), asked_at, span)
                except ProviderError as error:
                    if error.code != "context_length_exceeded" or not truncate:
                        raise
                    whole = prepared.context() if shortened is None else shortened
                    shortened = drop_oldest_turn(whole)
                    if shortened is None:
                        raise


class Compacted(NamedTuple):
    """A compaction inside create: its item, and the turn that summarised (its usage is the
    response's, or its own when the response never comes)."""

    item: dict[str, Any]
    run: Run


def summary_of(response: dict[str, Any]) -> dict[str, Any]:
    """A summarising turn's response, when it gave a summary (else a 502)."""
    if response["status"] not in ("completed", "incomplete") or not response["output_text"]:
        error = response["error"] or {}
        raise UpstreamError(
            f"The model could not compact the context: {error.get('message', 'no summary')}"
        )
    return response


_Loaded = tuple[tuple[dict[str, Any], str], ...]  # tools tool search loaded, where each is


def _searched(done: _Loaded, items: list[dict[str, Any]]) -> _Loaded:
    """The tools tool search loaded in a stored chain, gathered once per history."""
    return (*done, *searched_tools(items, "previous context"))
