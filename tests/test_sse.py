"""EventStreamResponse at the ASGI level: which events go out in which write."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from relay.api.sse import DONE, FLUSH_BYTES, EventStreamResponse

Batch = list[dict[str, Any]]


def event(kind: str, sequence: int) -> dict[str, Any]:
    return {"type": kind, "sequence_number": sequence}


START = [event("response.created", 0), event("response.in_progress", 1)]
FIRST = [event("response.output_item.added", 2), event("response.output_text.delta", 3)]
END = [event("response.completed", 4)]


class Client:
    """The ASGI side: records each body write as the event types it carried."""

    def __init__(self) -> None:
        self.writes: list[list[str]] = []
        self.gone = asyncio.Event()

        self.done = False

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] != "http.response.body":
            return
        assert not self.done, "a write after [DONE]"
        body: bytes = message["body"]
        if body.endswith(DONE):
            body, self.done = body.removesuffix(DONE), True
            assert not message["more_body"]
        frames = [f for f in body.split(b"\n\n") if f]
        if frames:
            self.writes.append([orjson.loads(f.split(b"data: ")[1])["type"] for f in frames])

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def stream(events: AsyncIterator[Batch], client: Client) -> None:
    response = EventStreamResponse(events, keepalive_s=60)
    await response({"type": "http"}, client.receive, client.send)


async def test_start_joins_the_first_output_when_it_is_ready_at_once() -> None:
    async def events() -> AsyncIterator[Batch]:
        yield START
        yield FIRST
        yield END

    client = Client()
    await stream(events(), client)
    assert client.writes == [
        ["response.created", "response.in_progress", *(e["type"] for e in FIRST)],
        ["response.completed"],  # with [DONE], in the last write
    ]
    assert client.done


def deltas(first: int, count: int, text: str = "word") -> list[Batch]:
    return [
        [{"type": "response.output_text.delta", "sequence_number": n, "delta": text}]
        for n in range(first, first + count)
    ]


async def test_each_batch_is_written_as_it_comes_and_the_end_with_done() -> None:
    """The run's steps are not looked ahead of (they run in the request's task): each batch
    is written as it comes, the terminal one in the closing write with [DONE]."""

    async def events() -> AsyncIterator[Batch]:
        yield START
        yield FIRST
        for batch in deltas(4, 3):
            yield batch
        yield [event("response.completed", 7)]

    client = Client()
    await stream(events(), client)
    assert client.writes[1:] == [["response.output_text.delta"]] * 3 + [["response.completed"]]
    assert client.done


async def test_what_is_ready_goes_out_before_waiting_for_the_upstream() -> None:
    client = Client()

    async def events() -> AsyncIterator[Batch]:
        yield START
        yield FIRST
        yield deltas(4, 1)[0]
        await asyncio.sleep(0.01)  # the upstream pauses: the delta before must be out already
        assert client.writes[-1] == ["response.output_text.delta"]
        yield deltas(5, 1)[0]
        yield [event("response.completed", 6)]

    await stream(events(), client)
    assert client.writes[1:] == [
        ["response.output_text.delta"],
        ["response.output_text.delta"],
        ["response.completed"],
    ]


async def test_a_step_runs_in_the_request_task_with_its_context() -> None:
    """What the run does inside a step sees the request's task and context vars, and a
    timeout it sets cancels its own work, never another task's."""
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker")
    seen: list[object] = []
    caller = None

    async def events() -> AsyncIterator[Batch]:
        token = marker.set("in the run")
        yield START
        seen.append(asyncio.current_task())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)  # an upstream wait that times out
        yield FIRST
        marker.reset(token)  # the token was made in this same context
        seen.append(asyncio.current_task())
        yield END

    async def request() -> None:
        nonlocal caller
        caller = asyncio.current_task()
        await stream(events(), Client())

    await asyncio.wait_for(request(), 5)
    assert seen == [caller, caller]


async def test_no_write_grows_far_past_the_flush_size() -> None:
    big = "x" * 1000

    async def events() -> AsyncIterator[Batch]:
        yield START
        yield FIRST
        for batch in deltas(4, 300, big):
            yield batch

    sizes: list[int] = []
    client = Client()
    inner = client.send

    async def send(message: dict[str, Any]) -> None:
        sizes.append(len(message.get("body", b"")))
        await inner(message)

    await EventStreamResponse(events(), keepalive_s=60)({"type": "http"}, client.receive, send)
    assert sum(len(w) for w in client.writes[1:]) == 300
    assert len(client.writes) > 2
    assert max(sizes) < FLUSH_BYTES + 2000


async def test_a_slow_upstream_never_holds_created_back() -> None:
    client = Client()

    async def events() -> AsyncIterator[Batch]:
        yield START
        for _ in range(50):  # the first delta is late: created must be out meanwhile
            if client.writes:
                break
            await asyncio.sleep(0.01)
        assert client.writes == [["response.created", "response.in_progress"]]
        yield FIRST
        yield END

    await stream(events(), client)
    assert client.writes == [
        ["response.created", "response.in_progress"],
        [e["type"] for e in FIRST],
        ["response.completed"],
    ]


async def test_a_stream_with_nothing_after_the_start_still_sends_it() -> None:
    async def events() -> AsyncIterator[Batch]:
        yield START

    client = Client()
    await stream(events(), client)
    assert client.writes == [["response.created", "response.in_progress"]]


async def test_a_bug_while_waiting_for_the_first_output_sends_the_start_once() -> None:
    async def events() -> AsyncIterator[Batch]:
        yield START
        await asyncio.sleep(0.01)  # the start is written meanwhile
        raise RuntimeError("a bug below the stream")

    client = Client()
    await stream(events(), client)
    assert client.writes == [["response.created", "response.in_progress"], ["error"]]


async def test_a_bug_after_the_start_still_sends_the_start_then_an_error() -> None:
    async def events() -> AsyncIterator[Batch]:
        yield START
        raise RuntimeError("a bug below the stream")

    client = Client()
    await stream(events(), client)
    assert client.writes == [["response.created", "response.in_progress", "error"]]


async def test_a_disconnect_while_waiting_for_the_first_output_closes_the_events() -> None:
    closed = asyncio.Event()

    async def events() -> AsyncIterator[Batch]:
        try:
            yield START
            await asyncio.sleep(60)  # an upstream that never answers
            yield FIRST
        finally:
            closed.set()

    client = Client()
    task = asyncio.ensure_future(stream(events(), client))
    await asyncio.sleep(0.05)
    client.gone.set()
    await asyncio.wait_for(task, 5)
    assert closed.is_set()
    assert client.writes == [["response.created", "response.in_progress"]]


async def test_a_disconnect_during_a_blocked_write_still_finalises_the_events() -> None:
    """The write before waiting on the upstream blocks (a client that stopped reading), then
    the client leaves: the upstream step already begun must be cancelled and the events
    closed as the run expects (their cleanup may await), not left half-run."""
    finalised = asyncio.Event()

    async def events() -> AsyncIterator[Batch]:
        try:
            yield START
            yield FIRST
            yield deltas(4, 1)[0]
            await asyncio.sleep(60)  # the upstream is slow: the delta is written meanwhile
            yield END
        except (asyncio.CancelledError, GeneratorExit):
            # Where it stood (a step, or between steps): Run.events handles both alike.
            await asyncio.sleep(0)  # e.g. storing where the run stopped
            finalised.set()
            raise

    client = Client()
    inner = client.send

    async def send(message: dict[str, Any]) -> None:
        await inner(message)
        if len(client.writes) == 2:
            await asyncio.sleep(60)  # the transport is paused: this write never drains

    task = asyncio.ensure_future(
        EventStreamResponse(events(), keepalive_s=60)({"type": "http"}, client.receive, send)
    )
    await asyncio.sleep(0.05)
    client.gone.set()
    await asyncio.wait_for(task, 5)
    assert finalised.is_set()


async def test_an_event_that_cannot_be_framed_ends_the_stream_with_the_next_number() -> None:
    async def events() -> AsyncIterator[Batch]:
        yield START
        yield [event("response.output_item.added", 2), {**event("bad", 3), "x": {1, 2}}]

    numbers: list[int] = []
    client = Client()
    inner = client.send

    async def send(message: dict[str, Any]) -> None:
        body: bytes = message.get("body", b"")
        for line in body.split(b"\n"):
            if line.startswith(b"data: {"):
                numbers.append(orjson.loads(line[6:])["sequence_number"])
        await inner(message)

    await EventStreamResponse(events(), keepalive_s=60)({"type": "http"}, client.receive, send)
    assert client.writes[-1][-1] == "error"
    assert numbers == [0, 1, 2, 3]  # the unframed event's number goes to the error, once


async def test_a_cancel_during_the_cleanup_after_a_disconnect_waits_for_it() -> None:
    """The client leaves, the run starts recording where it stopped, and then the request
    itself is cancelled (a server shutting down): the run's cleanup, shielded as Run.events
    shields its save, still runs to its end, and the request's cancel is raised, not
    swallowed."""
    finalised = asyncio.Event()
    cleaning = asyncio.Event()

    async def store() -> None:
        await asyncio.sleep(0.05)  # storing where the run stopped
        finalised.set()

    async def events() -> AsyncIterator[Batch]:
        try:
            yield START
            await asyncio.sleep(60)
            yield FIRST
        except asyncio.CancelledError:
            cleaning.set()
            saving = asyncio.ensure_future(store())
            await asyncio.shield(saving)
            raise

    client = Client()
    task = asyncio.ensure_future(stream(events(), client))
    await asyncio.sleep(0.01)
    client.gone.set()
    await asyncio.wait_for(cleaning.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    await asyncio.wait_for(finalised.wait(), 5)
