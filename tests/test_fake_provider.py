"""FakeProvider: every script, deterministic to the delta."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from relay.protocol import CreateResponse
from relay.providers.base import (
    Delta,
    FinishDelta,
    ProviderError,
    ProviderRequest,
    ReasoningDelta,
    RefusalDelta,
    TextDelta,
    ToolCallDelta,
    UsageDelta,
)
from relay.providers.fake import FakeProvider

WEATHER = {"type": "function", "name": "lookup_weather", "parameters": {"type": "object"}}


def make_request(
    script: str,
    *,
    said: str = "hello brave new world",
    instructions: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, str] = "auto",
    parallel_tool_calls: bool = True,
    want_logprobs: bool = False,
    **fields: Any,
) -> ProviderRequest:
    return ProviderRequest(
        upstream_model=script,
        request=CreateResponse.model_validate({"model": "fake", **fields}),
        instructions=instructions,
        items=[
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": said}]}
        ],
        tools=tools or [],
        tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls,
        want_logprobs=want_logprobs,
    )


async def run(request: ProviderRequest, provider: FakeProvider | None = None) -> list[Delta]:
    stream = await (provider or FakeProvider()).open(request)
    return [delta async for delta in stream]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas if isinstance(d, TextDelta))


def arguments(deltas: list[Delta], index: int) -> str:
    return "".join(d.arguments for d in deltas if isinstance(d, ToolCallDelta) and d.index == index)


async def test_text_echoes_the_last_user_text_word_by_word() -> None:
    deltas = await run(make_request("text", said="hi there", instructions="Be kind."))
    assert deltas == [
        TextDelta("You "),
        TextDelta("said: "),
        TextDelta("hi "),
        TextDelta("there"),
        UsageDelta(input_tokens=4, output_tokens=4),
        FinishDelta("stop"),
    ]
    assert deltas == await run(make_request("text", said="hi there", instructions="Be kind."))


async def test_input_tokens_count_every_context_word() -> None:
    request = make_request("text", said="one two")
    request.items = [
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "a b c"}],
        },
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"x": 1}'},
        {"type": "function_call_output", "call_id": "c", "output": "four five"},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "not counted"}]},
        *request.items,
    ]
    usage = [d for d in await run(request) if isinstance(d, UsageDelta)]
    assert usage[0].input_tokens == 3 + 3 + 2 + 2


async def test_logprobs_when_wanted() -> None:
    deltas = await run(make_request("text", want_logprobs=True, top_logprobs=2))
    first = deltas[0]
    assert isinstance(first, TextDelta)
    assert first.logprobs == [
        {
            "token": "You ",
            "logprob": -0.25,
            "bytes": list(b"You "),
            "top_logprobs": [
                {"token": "You ", "logprob": -0.25, "bytes": list(b"You ")},
                {"token": "alt1", "logprob": -1.25, "bytes": list(b"alt1")},
            ],
        }
    ]


async def test_tool_call_uses_the_first_tool() -> None:
    deltas = await run(make_request("tool_call", tools=[WEATHER]))
    assert deltas == [
        ToolCallDelta(index=0, name="lookup_weather"),
        ToolCallDelta(index=0, arguments='{"location": '),
        ToolCallDelta(index=0, arguments='"Par'),
        ToolCallDelta(index=0, arguments='is"}'),
        UsageDelta(input_tokens=4, output_tokens=3),
        FinishDelta("tool_calls"),
    ]
    assert json.loads(arguments(deltas, 0)) == {"location": "Paris"}


async def test_tool_call_without_tools_invents_get_weather() -> None:
    deltas = await run(make_request("tool_call"))
    assert deltas[0] == ToolCallDelta(index=0, name="get_weather")


async def test_tool_call_follows_a_forced_function() -> None:
    deltas = await run(make_request("tool_call", tools=[WEATHER], tool_choice={"name": "forced"}))
    assert deltas[0] == ToolCallDelta(index=0, name="forced")


@pytest.mark.parametrize("script", ["tool_call", "parallel_tool_calls"])
async def test_tool_choice_none_answers_in_text(script: str) -> None:
    deltas = await run(make_request(script, tools=[WEATHER], tool_choice="none"))
    assert text_of(deltas) == "You said: hello brave new world"
    assert not any(isinstance(d, ToolCallDelta) for d in deltas)
    assert deltas[-1] == FinishDelta("stop")


async def test_parallel_tool_calls() -> None:
    deltas = await run(make_request("parallel_tool_calls", tools=[WEATHER]))
    starts = [d for d in deltas if isinstance(d, ToolCallDelta) and d.name]
    assert starts == [
        ToolCallDelta(index=0, name="lookup_weather"),
        ToolCallDelta(index=1, name="lookup_weather"),
    ]
    assert json.loads(arguments(deltas, 0)) == {"location": "Paris"}
    assert json.loads(arguments(deltas, 1)) == {"location": "Tokyo"}
    assert deltas[-2:] == [UsageDelta(input_tokens=4, output_tokens=6), FinishDelta("tool_calls")]


async def test_parallel_tool_calls_off_gives_one_call() -> None:
    deltas = await run(
        make_request("parallel_tool_calls", tools=[WEATHER], parallel_tool_calls=False)
    )
    assert {d.index for d in deltas if isinstance(d, ToolCallDelta)} == {0}


async def test_reasoning() -> None:
    deltas = await run(make_request("reasoning", said="why"))
    assert deltas == [
        ReasoningDelta("Let me "),
        ReasoningDelta("think."),
        TextDelta("You "),
        TextDelta("said: "),
        TextDelta("why"),
        UsageDelta(input_tokens=1, output_tokens=5, reasoning_tokens=2),
        FinishDelta("stop"),
    ]


async def test_refusal() -> None:
    deltas = await run(make_request("refusal"))
    assert "".join(d.text for d in deltas if isinstance(d, RefusalDelta)) == (
        "I'm sorry, but I can't help with that."
    )
    assert deltas[-1] == FinishDelta("stop")


async def test_error_before_raises_in_open() -> None:
    with pytest.raises(ProviderError) as caught:
        await FakeProvider().open(make_request("error_before"))
    assert (caught.value.status, caught.value.retryable) == (503, True)


async def test_error_after_yields_text_then_raises() -> None:
    stream = await FakeProvider().open(make_request("error_after"))
    seen: list[Delta] = []
    with pytest.raises(ProviderError) as caught:
        async for delta in stream:
            seen.append(delta)
    assert text_of(seen) == "Partial answer before the failure "
    assert caught.value.status == 502


async def test_unknown_script() -> None:
    with pytest.raises(ProviderError) as caught:
        await FakeProvider().open(make_request("no_such_script"))
    error = caught.value
    assert (error.status, error.code, error.retryable) == (400, "upstream_invalid_request", False)
    assert "no_such_script" in error.message


async def test_slow_streams_ten_words_and_can_be_cancelled() -> None:
    provider = FakeProvider(slow_interval_s=0.01)
    deltas = await run(make_request("slow"), provider)
    assert text_of(deltas) == "one two three four five six seven eight nine ten"
    assert deltas[-2:] == [UsageDelta(input_tokens=4, output_tokens=10), FinishDelta("stop")]

    seen: list[Delta] = []

    async def consume() -> None:
        async for delta in await FakeProvider().open(make_request("slow")):
            seen.append(delta)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert 1 <= len(seen) <= 3  # the default pace is one word every 0.2 s


async def test_length() -> None:
    deltas = await run(make_request("length"))
    assert text_of(deltas) == "This answer is far too long to fit "
    assert deltas[-2:] == [UsageDelta(input_tokens=4, output_tokens=8), FinishDelta("length")]


async def test_json_satisfies_a_simple_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 3},
            "score": {"type": ["number", "null"]},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "kind": {"enum": ["a", "b"]},
            "inner": {"type": "object", "properties": {"x": {"const": 5}}},
        },
        "required": ["name", "age", "score", "ok", "tags", "kind", "inner"],
        "additionalProperties": False,
    }
    request = make_request(
        "json", text={"format": {"type": "json_schema", "name": "person", "schema": schema}}
    )
    value = json.loads(text_of(await run(request)))
    assert value == {
        "name": "x",
        "age": 3,
        "score": 0.0,
        "ok": True,
        "tags": ["x"],
        "kind": "a",
        "inner": {"x": 5},
    }


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"text": {"format": {"type": "json_object"}}},
        {
            "text": {
                "format": {
                    "type": "json_schema",
                    "name": "hard",
                    "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}},
                }
            }
        },
    ],
)
async def test_json_falls_back_to_ok(fields: dict[str, Any]) -> None:
    deltas = await run(make_request("json", **fields))
    assert json.loads(text_of(deltas)) == {"ok": True}
    assert deltas[-1] == FinishDelta("stop")
