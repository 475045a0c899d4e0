"""The server-side tool loop: one response, several model turns. After a turn whose model
called tools Relay runs (relay.engine.server_tools), the calls run (concurrently, bounded),
their items finish, and the model is asked again with their outputs, until it answers, calls
a tool the client runs, asks for an approval, or reaches a bound (`max_tool_calls`, the step
cap, the deadline; the last turn is then offered no tools, so that it answers).

`Run.events()` drives it between turns; a response without server-side tools has no loop and
never comes here. Cancelling the run (a client that leaves, a cancel) cancels the calls in
flight with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relay.engine import server_tools
from relay.engine.builder import Event, ResponseBuilder, ServerCall
from relay.engine.prepared import Prepared
from relay.engine.server_tools import ServerTools
from relay.errors import RelayError
from relay.models.policy import NANOS_PER_USD
from relay.models.tools import ToolSettings
from relay.observe.metrics import Metrics
from relay.tools.egress import EgressPolicy
from relay.tools.images import ImagesBackend, Partial
from relay.tools.mcp import McpClient
from relay.tools.web_search import SearchBackend

if TYPE_CHECKING:
    from relay.engine.run import Run


class TurnFailed(Exception):
    """A later turn of the loop could not be opened: the response fails with this."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class ToolRuntime:
    """What running server-side tools takes, one per application: the settings, the MCP
    client, the search backend and the images endpoint (None: web search, image generation
    are not run here), and each project's egress policy."""

    settings: ToolSettings
    mcp: McpClient
    search: SearchBackend | None
    policy_for: Callable[[str], Awaitable[EgressPolicy]]
    metrics: Metrics
    images: ImagesBackend | None = None

    @property
    def runs(self) -> frozenset[str]:
        """The hosted tool types run here: mcp, and the others whose backend is configured."""
        kinds = {"mcp"}
        if self.search is not None:
            kinds |= server_tools.WEB_SEARCH_TYPES
        if self.images is not None:
            kinds.add(server_tools.IMAGE_TYPE)
        return frozenset(kinds)

    async def aclose(self) -> None:
        await self.mcp.aclose()
        if self.search is not None:
            await self.search.aclose()
        if self.images is not None:
            await self.images.aclose()


@dataclass(slots=True)
class ToolLoop:
    runtime: ToolRuntime
    prepared: Prepared
    server: ServerTools
    policy: EgressPolicy
    truncate: bool
    include_sources: bool
    deadline: float  # time.monotonic() past which no tool runs and no turn opens
    steps: int = 1  # model turns so far
    done: bool = False
    # What the model reads of this response's search calls, by item id.
    outputs: dict[str, str] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # calls run, by kind
    images: int = 0  # images drawn (priced per image: one that failed costs nothing)

    async def step(self, run: Run) -> AsyncIterator[list[Event]]:
        """After a model turn: run its server calls, then open the next turn into
        `run.deltas`; `done` when the response ends with this turn."""
        builder = run.builder
        if builder.finish_incomplete:
            self.done = True
            return
        closed, pending = builder.end_turn()
        if closed:
            yield closed
        if not pending:
            self.done = True
            return
        async for batch in self._run_all(builder, pending):
            yield batch
        if builder.client_calls or builder.approvals:
            # The client has calls to run (or to approve): the response ends here, and goes
            # on in the client's next request.
            self.done = True
            return
        if time.monotonic() >= self.deadline:
            builder.cut_short("time_limit")
            self.done = True
            return
        await self._next_turn(run)

    async def _run_all(
        self, builder: ResponseBuilder, calls: list[ServerCall]
    ) -> AsyncIterator[list[Event]]:
        """Run `calls` at once (at most `max_parallel` at a time), each finished as it ends,
        and the partial images of image calls told as they come."""
        started: list[Event] = []
        for call in calls:
            started += builder.server_call_started(call)
        if started:
            yield started
        bound = asyncio.Semaphore(self.runtime.settings.max_parallel)
        citable = builder.citable
        # What the calls tell, in the order they tell it: a partial image (its fields), or
        # their end (None). Events are made here, in this task, so that they are numbered
        # in the order they go out.
        news: asyncio.Queue[tuple[ServerCall, dict[str, Any] | None]] = asyncio.Queue()
        tasks = {
            id(call): asyncio.ensure_future(self._told(bound, call, citable, news))
            for call in calls
        }
        try:
            while tasks:
                batch: list[Event] = []
                told = [await news.get()]
                while not news.empty():
                    told.append(news.get_nowait())
                for call, partial in told:
                    if partial is not None:
                        batch += builder.server_call_progress(call, partial)
                        continue
                    await tasks.pop(id(call))  # done, or about to be: its failure raised
                    batch += builder.server_call_done(call)
                yield batch
        finally:
            for task in tasks.values():
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)

    async def _told(
        self,
        bound: asyncio.Semaphore,
        call: ServerCall,
        citable: dict[str, str],
        news: asyncio.Queue[tuple[ServerCall, dict[str, Any] | None]],
    ) -> None:
        try:
            await self._bounded(
                bound, call, citable, lambda fields: news.put_nowait((call, fields))
            )
        finally:
            news.put_nowait((call, None))

    async def run_before(self, calls: list[ServerCall]) -> None:
        """Approved calls, run before the first turn: they open the stream, whole."""
        bound = asyncio.Semaphore(self.runtime.settings.max_parallel)
        await asyncio.gather(*(self._bounded(bound, call, {}, _unseen) for call in calls))
        for call in calls:
            done = "completed" if call.item["status"] == "completed" else "failed"
            call.progress = ("response.mcp_call.in_progress", f"response.mcp_call.{done}")
            self.server.opening.append(call)

    async def _bounded(
        self,
        bound: asyncio.Semaphore,
        call: ServerCall,
        citable: dict[str, str],
        on_partial: Partial,
    ) -> None:
        async with bound:
            started = time.monotonic()
            try:
                async with asyncio.timeout(max(self.deadline - started, 0.001)):
                    await self._run(call, citable, on_partial)
            except TimeoutError:
                _timed_out(call)
            seconds = time.monotonic() - started
        if call.for_model is not None:
            self.outputs[call.item["id"]] = call.for_model
        kind = call.item["type"]
        self.calls[kind] = self.calls.get(kind, 0) + 1
        if kind == "image_generation_call" and call.item["status"] == "completed":
            self.images += 1
        self.runtime.metrics.tool_called(kind, call.item["status"], seconds)

    def cost_nanos(self) -> int:
        """What the calls run cost, at the operator's prices per call."""
        settings = self.runtime.settings
        search = settings.web_search
        usd = self.calls.get("mcp_call", 0) * settings.mcp.price_per_call_usd
        if search is not None:
            usd += self.calls.get("web_search_call", 0) * search.price_per_search_usd
        if settings.images is not None:
            usd += self.images * settings.images.price_per_image_usd
        return round(usd * NANOS_PER_USD)

    def _run(
        self, call: ServerCall, citable: dict[str, str], on_partial: Partial
    ) -> Coroutine[Any, Any, None]:
        runtime = self.runtime
        item = call.item
        if item["type"] == "mcp_call":
            entry = self.server.entry(item["server_label"])
            return server_tools.run_mcp(call, entry, runtime.mcp, self.policy)
        if item["type"] == "image_generation_call":
            assert runtime.images is not None
            return server_tools.run_image(call, self.server, runtime.images, on_partial)
        assert runtime.search is not None
        return server_tools.run_search(
            call, self.server, runtime.search, self.include_sources, citable
        )

    async def _next_turn(self, run: Run) -> None:
        builder = run.builder
        self.steps += 1
        output = run.response["output"]
        context = server_tools.for_upstream(
            output,
            requests=server_tools.earlier_requests(self.prepared.upstream_history),
            outputs=self.outputs,
            search_name=self.server.search_name,
            image_name=self.server.image_name,
        )
        plan = self.prepared.tools
        limit = builder.max_calls
        last = self.steps >= self.runtime.settings.max_steps or (
            limit is not None and builder.calls_made >= limit
        )
        if last or plan.choice == "none":
            turn_plan = dataclasses.replace(plan, offered=[], choice="none", must_call=False)
        else:
            turn_plan = dataclasses.replace(plan, choice="auto", must_call=False)
        prepared = dataclasses.replace(
            self.prepared,
            upstream_items=[*self.prepared.upstream_items, *context],
            tools=turn_plan,
        )
        try:
            deployment, opened = await run.engine.open(prepared, truncate=self.truncate)
        except RelayError as error:
            raise TurnFailed(error.code or "server_error", error.message) from None
        run.next_turn(deployment, opened)
        builder.next_turn()


def _timed_out(call: ServerCall) -> None:
    item = call.item
    item["status"] = "failed"
    if item["type"] == "mcp_call":
        item["error"] = {
            "type": "http_error",
            "code": 504,
            "message": "The MCP server did not answer before the response's deadline.",
        }
    elif item["type"] == "image_generation_call":
        message = "The image was not drawn before the response's deadline."
        item["error"] = {"type": "image_generation_error", "code": "timeout", "message": message}
        call.for_model = message
    else:
        call.for_model = "The search did not finish before the response's deadline."


def _unseen(fields: dict[str, Any]) -> None:
    """Partial images of calls run before the first turn: they open the stream whole, so
    there is nobody to show them to (only approved MCP calls run then)."""
