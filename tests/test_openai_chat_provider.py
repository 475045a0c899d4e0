"""OpenAIChatProvider against a real loopback chat-completions server (no mocks)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from chat_upstream import UPSTREAM_KEY, ChatUpstream

from relay.models.deployments import OpenAIChatConfig
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
from relay.providers.openai_chat import OpenAIChatProvider, build
from relay.providers.upstream import SSEDecoder

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
CLOCK = {"type": "function", "name": "get_time", "description": None, "parameters": None}


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def make_request(
    model: str = "echo",
    *,
    items: list[dict[str, Any]] | None = None,
    instructions: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, str] = "auto",
    parallel_tool_calls: bool = True,
    want_logprobs: bool = False,
    effort: str | None = None,
    **fields: Any,
) -> ProviderRequest:
    """`fields` make up the CreateResponse; `effort` is the merged reasoning effort, which the
    engine works out from reasoning.effort and the top-level reasoning_effort."""
    return ProviderRequest(
        upstream_model=model,
        request=CreateResponse.model_validate({"model": "public-model", **fields}),
        instructions=instructions,
        items=items if items is not None else [user("hello there")],
        tools=tools or [],
        tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls,
        want_logprobs=want_logprobs,
        reasoning_effort=effort,
    )


@pytest.fixture
async def provider(chat_upstream: ChatUpstream) -> AsyncIterator[OpenAIChatProvider]:
    chat_upstream.reset()
    provider = OpenAIChatProvider(chat_upstream.base_url, UPSTREAM_KEY)
    yield provider
    await provider.aclose()


async def collect(provider: OpenAIChatProvider, request: ProviderRequest) -> list[Delta]:
    stream = await provider.open(request)
    return [delta async for delta in stream]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas if isinstance(d, TextDelta))


async def failure(provider: OpenAIChatProvider, request: ProviderRequest) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await collect(provider, request)
    return caught.value


# Request translation ----------------------------------------------------------------------------


async def test_full_request_is_translated_exactly(
    provider: OpenAIChatProvider, chat_upstream: ChatUpstream
) -> None:
    items: list[dict[str, Any]] = [
        {
            "type": "message",
            "role": "developer",
            "content": [{"type": "input_text", "text": "Be brief."}],
        },
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is in this picture?"},
                {
                    "type": "input_image",
                    "image_url": "https://example.com/cat.png",
                    "detail": "low",
                },
                {
                    "type": "input_file",
                    "filename": "a.pdf",
                    "file_data": "data:application/pdf;base64,AAA=",
                },
            ],
        },
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "hm"}]},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}],
        },
        {
            "type": "function_call",
            "call_id": "call_a",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
        {"type": "function_call", "call_id": "call_b", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {
            "type": "function_call_output",
            "call_id": "call_b",
            "output": [{"type": "input_text", "text": "noon"}, {"type": "input_text", "text": "!"}],
        },
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "refusal", "refusal": "No."}],
        },
        user("thanks"),
    ]
    request = make_request(
        items=items,
        instructions="You are Relay.",
        tools=[WEATHER, CLOCK],
        tool_choice={"name": "get_weather"},
        parallel_tool_calls=False,
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        presence_penalty=0.1,
        frequency_penalty=-0.1,
        seed=7,
        user="u1",
        safety_identifier="safe-1",
        prompt_cache_key="ck",
        service_tier="flex",
        max_output_tokens=256,
        text={
            "format": {
                "type": "json_schema",
                "name": "answer",
                "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
                "strict": True,
            },
            "verbosity": "low",
        },
        reasoning={"effort": "high"},
        effort="high",
    )
    await collect(provider, request)
    assert chat_upstream.last == {
        "model": "echo",
        "messages": [
            {"role": "system", "content": "You are Relay."},
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.png", "detail": "low"},
                    },
                    {
                        "type": "file",
                        "file": {
                            "filename": "a.pdf",
                            "file_data": "data:application/pdf;base64,AAA=",
                        },
                    },
                ],
            },
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    },
                    {
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
            {"role": "tool", "tool_call_id": "call_b", "content": "noon!"},
            {"role": "assistant", "content": "No."},
            {"role": "user", "content": "thanks"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": WEATHER["parameters"],
                    "strict": True,
                },
            },
            {"type": "function", "function": {"name": "get_time"}},
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "presence_penalty": 0.1,
        "frequency_penalty": -0.1,
        "seed": 7,
        "user": "u1",
        "safety_identifier": "safe-1",
        "prompt_cache_key": "ck",
        "service_tier": "flex",
        "max_tokens": 256,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
                "strict": True,
            },
        },
        "verbosity": "low",
        "reasoning_effort": "high",
    }
    headers = chat_upstream.headers[-1]
    assert headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert headers["content-type"] == "application/json"


async def test_minimal_request_sends_no_optional_fields(
    provider: OpenAIChatProvider, chat_upstream: ChatUpstream
) -> None:
    await collect(provider, make_request(tool_choice="none"))
    assert chat_upstream.last == {
        "model": "echo",
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_function_calls_without_text_get_null_content(
    provider: OpenAIChatProvider, chat_upstream: ChatUpstream
) -> None:
    items = [
        user("weather?"),
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "rain"},
        {"type": "message", "role": "assistant", "content": "It rains."},
        {"type": "message", "role": "system", "content": "Stay on topic."},
    ]
    await collect(provider, make_request(items=items))
    assert chat_upstream.last["messages"] == [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        {"role": "assistant", "content": "It rains."},
        {"role": "system", "content": "Stay on topic."},
    ]


async def test_empty_assistant_message_keeps_its_turn(
    provider: OpenAIChatProvider, chat_upstream: ChatUpstream
) -> None:
    items = [user("a"), {"type": "message", "role": "assistant", "content": []}, user("b")]
    await collect(provider, make_request(items=items))
    assert chat_upstream.last["messages"] == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "b"},
    ]


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ("required", "required"),
        ({"name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
    ],
)
async def test_tool_choice_forms(
    provider: OpenAIChatProvider,
    chat_upstream: ChatUpstream,
    choice: str | dict[str, str],
    sent: Any,
) -> None:
    await collect(provider, make_request(tools=[WEATHER], tool_choice=choice))
    assert chat_upstream.last["tool_choice"] == sent
    assert chat_upstream.last["parallel_tool_calls"] is True


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"text": {"format": {"type": "json_object"}}},
            {"response_format": {"type": "json_object"}},
        ),
        ({"text": {"format": {"type": "text"}}}, {}),
        ({"effort": "low"}, {"reasoning_effort": "low"}),
        ({"reasoning": {"summary": "auto"}}, {}),
        # The engine's merge is what counts; the request's own fields are not read again.
        ({"reasoning": {"effort": "high"}, "reasoning_effort": "high"}, {}),
        ({"reasoning": {"effort": "high"}, "effort": "minimal"}, {"reasoning_effort": "minimal"}),
    ],
)
async def test_format_and_reasoning_fields(
    provider: OpenAIChatProvider,
    chat_upstream: ChatUpstream,
    fields: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    await collect(provider, make_request(**fields))
    extra = {
        k: v
        for k, v in chat_upstream.last.items()
        if k not in ("model", "messages", "stream", "stream_options")
    }
    assert extra == expected


async def test_max_tokens_param_forward_fields_and_extra_headers(
    chat_upstream: ChatUpstream,
) -> None:
    provider = OpenAIChatProvider(
        chat_upstream.base_url + "/",
        UPSTREAM_KEY,
        max_tokens_param="max_completion_tokens",
        extra_headers={"X-Title": "relay-tests"},
        forward_fields=frozenset({"provider", "plugins", "metadata"}),
    )
    try:
        request = make_request(
            max_output_tokens=64,
            provider={"order": ["groq"]},
            plugins=[{"id": "web"}],
        )
        await collect(provider, request)
    finally:
        await provider.aclose()
    body = chat_upstream.last
    assert body["max_completion_tokens"] == 64
    assert "max_tokens" not in body
    assert body["provider"] == {"order": ["groq"]}
    assert body["plugins"] == [{"id": "web"}]
    assert "metadata" not in body  # named but not set
    assert chat_upstream.headers[-1]["x-title"] == "relay-tests"


async def test_logprobs_are_requested_and_translated(
    provider: OpenAIChatProvider, chat_upstream: ChatUpstream
) -> None:
    deltas = await collect(provider, make_request(want_logprobs=True, top_logprobs=2))
    assert chat_upstream.last["logprobs"] is True
    assert chat_upstream.last["top_logprobs"] == 2
    texts = [d for d in deltas if isinstance(d, TextDelta)]
    assert texts[0] == TextDelta(
        "hello ",
        [
            {
                "token": "hello ",
                "logprob": -0.5,
                "bytes": list(b"hello "),
                "top_logprobs": [
                    {"token": "hello ", "logprob": -0.5, "bytes": list(b"hello ")},
                    {"token": "other", "logprob": -1.5, "bytes": list(b"other")},
                ],
            }
        ],
    )


@pytest.mark.parametrize(
    "part",
    [
        {"type": "input_image", "file_id": "file-123"},
        {"type": "input_file", "file_id": "file-123"},
        {"type": "input_file", "file_url": "https://example.com/a.pdf"},
    ],
)
async def test_unresolvable_parts_are_refused_before_sending(
    provider: OpenAIChatProvider, chat_upstream: ChatUpstream, part: dict[str, Any]
) -> None:
    items = [{"type": "message", "role": "user", "content": [part]}]
    with pytest.raises(ProviderError) as caught:
        await provider.open(make_request(items=items))
    error = caught.value
    assert (error.status, error.code, error.retryable) == (400, "unsupported_input", False)
    assert part["type"] in error.message
    assert chat_upstream.requests == []


# Stream translation -----------------------------------------------------------------------------


async def test_text_stream(provider: OpenAIChatProvider) -> None:
    deltas = await collect(provider, make_request(items=[user("a b c")]))
    assert deltas == [
        TextDelta("a "),
        TextDelta("b "),
        TextDelta("c"),
        UsageDelta(input_tokens=3, output_tokens=3),
        FinishDelta("stop"),
    ]


async def test_cached_tokens_reach_usage(provider: OpenAIChatProvider) -> None:
    deltas = await collect(provider, make_request(items=[user("a b c")], prompt_cache_key="k"))
    assert UsageDelta(input_tokens=3, output_tokens=3, cached_tokens=3) in deltas


@pytest.mark.parametrize("model", ["json_body", "split", "no_done"])
async def test_unusual_framings_give_the_same_deltas(
    provider: OpenAIChatProvider, model: str
) -> None:
    deltas = await collect(provider, make_request(model, items=[user("one two")]))
    texts = [d for d in deltas if isinstance(d, TextDelta)]
    # A JSON completion carries the whole text at once; a stream carries it word by word.
    assert texts == (
        [TextDelta("one two")] if model == "json_body" else [TextDelta("one "), TextDelta("two")]
    )
    assert deltas[len(texts) :] == [
        UsageDelta(input_tokens=2, output_tokens=2),
        FinishDelta("stop"),
    ]


async def test_json_body_with_tool_calls_and_reasoning(chat_upstream: ChatUpstream) -> None:
    # A non-streaming completion goes through the same translation as a stream.
    provider = OpenAIChatProvider(chat_upstream.base_url, UPSTREAM_KEY)
    try:
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{chat_upstream.base_url}/chat/completions",
                headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
                json={
                    "model": "parallel",
                    "messages": [],
                    "stream": False,
                    "tools": [{"type": "function", "function": {"name": "f"}}],
                },
            )
        assert answer.headers["content-type"] == "application/json"
        deltas = provider._completion_deltas(answer.json())
    finally:
        await provider.aclose()
    assert deltas == [
        ToolCallDelta(0, '{"city": "Paris"}', "f", "call_loop_0"),
        ToolCallDelta(1, '{"city": "Tokyo"}', "f", "call_loop_1"),
        UsageDelta(input_tokens=0, output_tokens=8),
        FinishDelta("tool_calls"),
    ]


async def test_parallel_tool_calls(provider: OpenAIChatProvider) -> None:
    deltas = await collect(provider, make_request("parallel", tools=[WEATHER]))
    calls = [d for d in deltas if isinstance(d, ToolCallDelta)]
    assert calls[0] == ToolCallDelta(0, "", "get_weather", "call_loop_0")
    assert calls[4] == ToolCallDelta(1, "", "get_weather", "call_loop_1")
    for index, city in ((0, "Paris"), (1, "Tokyo")):
        pieces = [c for c in calls if c.index == index]
        assert all(c.name is None and c.call_id is None for c in pieces[1:])
        assert "".join(c.arguments for c in pieces) == f'{{"city": "{city}"}}'
    assert deltas[-1] == FinishDelta("tool_calls")
    assert isinstance(deltas[-2], UsageDelta)


@pytest.mark.parametrize("model", ["tools", "tools_stop", "tools_repeat"])
async def test_single_tool_call_variants(provider: OpenAIChatProvider, model: str) -> None:
    deltas = await collect(provider, make_request(model, tools=[WEATHER]))
    calls = [d for d in deltas if isinstance(d, ToolCallDelta)]
    assert calls[0].name == "get_weather"
    assert calls[0].call_id == "call_loop_0"
    assert all(c.index == 0 and c.name is None and c.call_id is None for c in calls[1:])
    assert "".join(c.arguments for c in calls) == '{"city": "Paris"}'
    assert deltas[-1] == FinishDelta("tool_calls")  # Ollama's "stop" after calls included


@pytest.mark.parametrize("model", ["reasoning", "reasoning_alt"])
async def test_reasoning_stream(provider: OpenAIChatProvider, model: str) -> None:
    deltas = await collect(provider, make_request(model, items=[user("x")]))
    assert deltas == [
        ReasoningDelta("Let me "),
        ReasoningDelta("think."),
        TextDelta("Done."),
        UsageDelta(input_tokens=1, output_tokens=3, reasoning_tokens=2),
        FinishDelta("stop"),
    ]


async def test_refusal_and_length(provider: OpenAIChatProvider) -> None:
    refusal = await collect(provider, make_request("refusal"))
    assert (
        "".join(d.text for d in refusal if isinstance(d, RefusalDelta)) == "I can't help with that."
    )
    length = await collect(provider, make_request("length"))
    assert text_of(length) == "This is cut short"
    assert length[-1] == FinishDelta("length")


async def test_closing_a_stream_early_releases_the_connection(provider: OpenAIChatProvider) -> None:
    unstarted = await provider.open(make_request())
    await unstarted.aclose()  # type: ignore[attr-defined]
    assert unstarted._response.released  # type: ignore[attr-defined]
    started = await provider.open(make_request())
    assert isinstance(await anext(started), TextDelta)
    await started.aclose()  # type: ignore[attr-defined]
    assert started._response.released  # type: ignore[attr-defined]
    assert (
        text_of(await collect(provider, make_request(items=[user("still fine")]))) == "still fine"
    )


# Errors -----------------------------------------------------------------------------------------


async def test_rate_limit(provider: OpenAIChatProvider) -> None:
    error = await failure(provider, make_request("http_429"))
    assert (error.status, error.code, error.retryable, error.retry_after) == (
        429,
        "rate_limit_exceeded",
        True,
        "7",
    )
    assert "Scripted failure 429" in error.message


@pytest.mark.parametrize(
    ("code", "status"), [(500, 502), (502, 502), (503, 503), (408, 502), (409, 502)]
)
async def test_retryable_statuses(provider: OpenAIChatProvider, code: int, status: int) -> None:
    error = await failure(provider, make_request(f"http_{code}"))
    assert error.retryable
    assert error.status == status
    assert f"Scripted failure {code}" in error.message


@pytest.mark.parametrize("code", [400, 413, 422])
async def test_invalid_request_statuses(provider: OpenAIChatProvider, code: int) -> None:
    error = await failure(provider, make_request(f"http_{code}"))
    assert (error.status, error.code, error.retryable) == (400, "upstream_invalid_request", False)
    assert f"Scripted failure {code} for model http_{code}." in error.message


async def test_not_found_is_the_upstreams_problem(provider: OpenAIChatProvider) -> None:
    """A wrong base URL or a model missing upstream: retryable, so fallbacks are tried."""
    error = await failure(provider, make_request("http_404"))
    assert (error.status, error.code, error.retryable) == (502, "upstream_not_found", True)
    assert "Scripted failure 404 for model http_404." in error.message


@pytest.mark.parametrize(
    ("mistake", "called"),
    [
        ("", "/chat/completions"),  # /v1 left out
        ("/v1/chat/completions", "/v1/chat/completions/chat/completions"),  # the endpoint in it
        ("/api", "/api/chat/completions"),  # another server's prefix
    ],
)
async def test_a_wrong_base_url_is_named_with_the_url_it_made(
    chat_upstream: ChatUpstream, monkeypatch: pytest.MonkeyPatch, mistake: str, called: str
) -> None:
    """The mistakes differ only in the URL the request went to: the message names it, the
    deployment and how it was made, never the key's variable's value."""
    root = chat_upstream.base_url.removesuffix("/v1")
    monkeypatch.setenv("UPSTREAM_KEY_VAR", UPSTREAM_KEY)
    config = OpenAIChatConfig(
        name="vllm-1", base_url=f"{root}{mistake}?v=1", api_key_env="UPSTREAM_KEY_VAR"
    )
    provider = build(config)
    try:
        error = await failure(provider, make_request())
    finally:
        await provider.aclose()
    assert (error.status, error.code, error.retryable) == (502, "upstream_not_found", True)
    assert error.message == (
        f"the upstream has no such endpoint or model (HTTP 404 from {root}{called}, the "
        "base_url of deployment 'vllm-1' followed by /chat/completions: check its base_url "
        "and upstream_model): Not Found"
    )


async def test_a_refused_key_names_the_deployment_and_its_variable(
    chat_upstream: ChatUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "sk-wrong-key-that-must-stay-secret-42"
    monkeypatch.setenv("VLLM_KEY", wrong)
    configs = [
        OpenAIChatConfig(name="vllm-1", base_url=chat_upstream.base_url, api_key_env="VLLM_KEY"),
        OpenAIChatConfig(name="vllm-2", base_url=chat_upstream.base_url),
    ]
    messages = []
    for config in configs:
        provider = build(config)
        try:
            messages.append((await failure(provider, make_request())).message)
        finally:
            await provider.aclose()
    assert messages == [
        "the upstream refused the credentials of deployment 'vllm-1' (HTTP 401); it sent its "
        "key, from the environment variable VLLM_KEY",
        "the upstream refused the credentials of deployment 'vllm-2' (HTTP 401); it sent no "
        "key: set its api_key_env to the variable that holds one",
    ]


async def test_unknown_upstream_model_quotes_the_upstream_without_secrets(
    provider: OpenAIChatProvider,
) -> None:
    error = await failure(provider, make_request(f"nope-{UPSTREAM_KEY}"))
    assert (error.status, error.code, error.retryable) == (502, "upstream_not_found", True)
    assert "does not exist" in error.message
    assert "nope-[redacted]" in error.message
    assert UPSTREAM_KEY not in str(error)


async def test_wrong_key_never_leaks(chat_upstream: ChatUpstream) -> None:
    wrong = "sk-wrong-key-that-must-stay-secret-42"
    async with httpx.AsyncClient() as client:  # the upstream itself echoes the key back
        raw = await client.get(
            f"{chat_upstream.base_url}/models", headers={"Authorization": f"Bearer {wrong}"}
        )
    assert wrong in raw.text
    provider = OpenAIChatProvider(chat_upstream.base_url, wrong)
    try:
        error = await failure(provider, make_request())
    finally:
        await provider.aclose()
    assert (error.status, error.code, error.retryable) == (502, "upstream_auth_failed", False)
    for text in (str(error), repr(error), error.message, repr(error.args)):
        assert wrong not in text


async def test_scripted_403_is_an_auth_failure(provider: OpenAIChatProvider) -> None:
    error = await failure(provider, make_request("http_403"))
    assert (error.status, error.code, error.retryable) == (502, "upstream_auth_failed", False)
    assert UPSTREAM_KEY not in str(error)


async def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = OpenAIChatProvider(f"http://127.0.0.1:{port}/v1", "sk-some-secret-value-123")
    try:
        error = await failure(provider, make_request())
    finally:
        await provider.aclose()
    assert (error.status, error.code, error.retryable) == (502, "upstream_unreachable", True)
    assert "sk-some-secret" not in str(error)


async def test_timeout_is_a_retryable_408(chat_upstream: ChatUpstream) -> None:
    provider = OpenAIChatProvider(chat_upstream.base_url, UPSTREAM_KEY, timeout_s=0.2)
    try:
        error = await failure(provider, make_request("slow_headers"))
    finally:
        await provider.aclose()
    assert (error.status, error.code, error.retryable) == (408, "request_timeout", True)


async def test_drop_mid_stream_raises_after_the_first_deltas(provider: OpenAIChatProvider) -> None:
    stream = await provider.open(make_request("drop_mid_stream", items=[user("a b c d")]))
    seen: list[Delta] = []
    with pytest.raises(ProviderError) as caught:
        async for delta in stream:
            seen.append(delta)
    assert seen == [TextDelta("a "), TextDelta("b ")]
    assert caught.value.retryable
    assert caught.value.status == 502


async def test_error_chunk_raises(provider: OpenAIChatProvider) -> None:
    error = await failure(provider, make_request("error_chunk"))
    assert "The server had an error while processing your request." in error.message
    assert error.status == 502


async def test_error_chunk_with_an_http_code(provider: OpenAIChatProvider) -> None:
    error = await failure(provider, make_request("error_chunk_429"))
    assert (error.status, error.code, error.retryable) == (429, "rate_limit_exceeded", True)
    assert "Rate limit exceeded upstream" in error.message


async def test_malformed_chunk_raises_provider_error(provider: OpenAIChatProvider) -> None:
    error = await failure(provider, make_request("malformed"))
    assert "could not read" in error.message


async def test_stream_ending_without_finish_raises(provider: OpenAIChatProvider) -> None:
    stream = await provider.open(make_request("truncated", items=[user("a b")]))
    seen: list[Delta] = []
    with pytest.raises(ProviderError, match="before it finished"):
        async for delta in stream:
            seen.append(delta)
    assert text_of(seen) == "a b"


def decode(pieces: list[bytes]) -> list[Any]:
    decoder = SSEDecoder()
    out = [event for piece in pieces for event in decoder.feed(piece)]
    return out + list(decoder.finish())


def every_split(body: bytes) -> list[list[bytes]]:
    return [[body[:cut], body[cut:]] for cut in range(len(body) + 1)]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n", b"\r"])
def test_sse_decoder_gives_the_same_events_wherever_the_network_splits(ending: bytes) -> None:
    body = (
        ending.join(
            [
                b": comment",
                b'data: {"a": "caf\xc3\xa9"}',
                b"",
                b"event: x",
                b"data: {",
                b'data: "b": 2}',
                b"",
            ]
        )
        + ending
        + b"data: [DONE]"
        + ending
        + ending
        + b'data: {"after": "done"}'
        + ending
        + ending
    )
    for pieces in every_split(body):
        assert decode(pieces) == [{"a": "café"}, {"b": 2}], pieces


def test_sse_decoder_ends_an_event_the_body_did_not_close() -> None:
    assert decode([b'data: {"a": 1}']) == [{"a": 1}]
    assert decode([b'data: {"a": 1}\r']) == [{"a": 1}]


def test_sse_decoder_turns_bytes_that_are_not_utf8_into_replacement_characters() -> None:
    assert decode([b'data: {"a": "x\xffy"}\n\n']) == [{"a": "x\ufffdy"}]


def test_sse_decoder_parses_a_read_lazily() -> None:
    # The first event of a read is handed over before the rest is parsed: a broken later one
    # only fails when it is reached.
    events = SSEDecoder().feed(b'data: {"a": 1}\n\ndata: {broken\n\n')
    assert next(events) == {"a": 1}
    with pytest.raises(ProviderError, match="not valid JSON"):
        next(events)
