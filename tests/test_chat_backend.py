"""Relay in front of a real chat-completions server on loopback: the wire, end to end."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from chat_upstream import MODELS, UPSTREAM_KEY, ChatUpstream
from conformance import assert_valid_response, check_stream
from live_server import relay_server
from relay_fixtures import checked_client, sdk_client, sse_events

from relay.config import RouteConfig, Settings
from relay.engine.compaction import SUMMARY_HEADING

KEY_ENV = "RELAY_TEST_UPSTREAM_KEY"
SCRIPTS = [*MODELS, "small_context", "http_429", "http_500", "http_401", "http_400"]


def backend_routes(chat_upstream: ChatUpstream) -> list[RouteConfig]:
    def route(model: str, script: str, **settings: Any) -> RouteConfig:
        return RouteConfig(
            model=model,
            base_url=chat_upstream.base_url,
            api_key_env=KEY_ENV,
            upstream_model=script,
            **settings,
        )

    return [
        *(route(f"up-{name}", name) for name in SCRIPTS),
        route("up-count-vllm", "echo", count_tokens="vllm"),
        route("up-count-llama_cpp", "echo", count_tokens="llama_cpp"),
        route("up-timeout-before", "slow_headers", timeout_s=0.5),
        route("up-timeout-mid", "stall", timeout_s=0.5),
        route("up-echo-replay", "echo", replay_reasoning=True),
        route("up-flaky", "http_500", fallbacks=["up-echo"]),
        route("up-role-only-then-echo", "role_only", fallbacks=["up-echo"]),
        route("up-error-first-then-echo", "error_first", fallbacks=["up-echo"]),
    ]


@pytest.fixture(scope="module")
def backend_url(
    chat_upstream: ChatUpstream, database_url: str, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[str]:
    monkeypatch_module.setenv(KEY_ENV, UPSTREAM_KEY)
    settings = Settings(database_url=database_url, routes=backend_routes(chat_upstream))
    with relay_server(settings) as url:
        yield url


@pytest.fixture
def up(backend_url: str) -> Iterator[httpx.Client]:
    with checked_client(backend_url) as session:
        yield session


def messages(upstream: ChatUpstream) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = upstream.last["messages"]
    return sent


def test_chain_rebuilds_context_without_old_instructions(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    first = up.post(
        "/v1/responses",
        json={"model": "up-echo", "input": "alpha beta", "instructions": "Old rules."},
    ).json()
    assert first["output_text"] == "alpha beta"
    second = up.post(
        "/v1/responses",
        json={
            "model": "up-echo",
            "input": "gamma",
            "instructions": "New rules.",
            "previous_response_id": first["id"],
        },
    ).json()
    third = up.post(
        "/v1/responses",
        json={"model": "up-echo", "input": "delta", "previous_response_id": second["id"]},
    )
    assert third.status_code == 200
    assert messages(chat_upstream) == [
        {"role": "user", "content": "alpha beta"},
        {"role": "assistant", "content": "alpha beta"},
        {"role": "user", "content": "gamma"},
        {"role": "assistant", "content": "gamma"},
        {"role": "user", "content": "delta"},
    ]
    up.post(
        "/v1/responses",
        json={
            "model": "up-echo",
            "input": "x",
            "instructions": "New rules.",
            "previous_response_id": first["id"],
        },
    )
    assert messages(chat_upstream)[0] == {"role": "system", "content": "New rules."}


@pytest.mark.parametrize("no_input", [{}, {"input": []}])
def test_a_continuation_without_input_sends_the_chain(
    up: httpx.Client, chat_upstream: ChatUpstream, no_input: dict[str, Any]
) -> None:
    first = up.post("/v1/responses", json={"model": "up-echo", "input": "alpha beta"}).json()
    again = up.post(
        "/v1/responses",
        json={"model": "up-echo", "previous_response_id": first["id"], **no_input},
    ).json()
    assert again["status"] == "completed"
    assert messages(chat_upstream) == [
        {"role": "user", "content": "alpha beta"},
        {"role": "assistant", "content": "alpha beta"},
    ]
    assert up.get(f"/v1/responses/{again['id']}/input_items").json()["data"] == []
    up.post(
        "/v1/responses",
        json={"model": "up-echo", "input": "gamma", "previous_response_id": again["id"]},
    )
    assert [m["content"] for m in messages(chat_upstream)] == [
        "alpha beta",
        "alpha beta\n\nalpha beta",  # two assistant turns in a row make one chat message
        "gamma",
    ]


def test_a_remembered_chain_sends_what_storage_rebuilds(
    up: httpx.Client, chat_upstream: ChatUpstream, database_url: str
) -> None:
    """Relay keeps recent conversations in memory; continuing one must send the upstream the
    very messages that a Relay rebuilding the chain from storage sends."""
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    chain = [
        {"model": "up-tools", "input": "weather in Oslo?", "tools": tools},
        {"model": "up-reasoning", "input": "and in Bergen?"},
        {"model": "up-echo", "input": [{"role": "assistant", "content": "I said so."}]},
        {"model": "up-echo", "input": "thanks", "instructions": "Be brief."},
    ]
    ids: list[str] = []
    for body in chain:
        answer = up.post(
            "/v1/responses", json={**body, **({"previous_response_id": ids[-1]} if ids else {})}
        )
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["id"])
    # The next turn starts with an assistant message, which must merge with the history's.
    follow_up = {
        "model": "up-echo",
        "input": [{"role": "assistant", "content": "Also:"}, {"role": "user", "content": "ok"}],
        "instructions": "Rules.",
    }
    settings = Settings(
        database_url=database_url, routes=backend_routes(chat_upstream), history_cache_items=0
    )
    with relay_server(settings) as url, checked_client(url) as rebuilding:
        for response_id in ids:
            sent = []
            for server in (up, rebuilding):
                answer = server.post(
                    "/v1/responses", json={**follow_up, "previous_response_id": response_id}
                )
                assert answer.status_code == 200, answer.text
                sent.append(messages(chat_upstream))
            assert sent[0] == sent[1]
            roles = [message["role"] for message in sent[0]]
            assert all(a != b for a, b in itertools.pairwise(roles) if a == "assistant")
    assert any(message.get("tool_calls") for message in sent[0])


def test_upstream_cookies_are_not_sent_back(
    backend_url: str, chat_upstream: ChatUpstream, database_url: str
) -> None:
    # By host name: cookie jars keep nothing for bare IP addresses anyway.
    route = RouteConfig(
        model="up-named",
        base_url=chat_upstream.base_url.replace("127.0.0.1", "localhost"),
        api_key_env=KEY_ENV,
        upstream_model="echo",
    )
    settings = Settings(database_url=database_url, routes=[route])
    with relay_server(settings) as url, checked_client(url) as relay:
        for _ in range(2):
            answer = relay.post("/v1/responses", json={"model": "up-named", "input": "hi"})
            assert answer.status_code == 200, answer.text
    assert chat_upstream.headers[-1]["host"].startswith("localhost")
    assert "cookie" not in chat_upstream.headers[-1]


def test_tool_round_trip_keeps_calls_in_the_chain(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        }
    ]
    events = sse_events(
        up,
        {
            "model": "up-tools",
            "input": "weather in Oslo?",
            "tools": tools,
            "tool_choice": "required",
        },
    )
    first = check_stream(events)
    call = first["output"][-1]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    sent = chat_upstream.last
    assert sent["tool_choice"] == "required"
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["tools"][0]["function"]["strict"] is True
    second = up.post(
        "/v1/responses",
        json={
            "model": "up-echo",
            "previous_response_id": first["id"],
            "tools": tools,
            "input": [
                {"type": "function_call_output", "call_id": call["call_id"], "output": "-3 C"}
            ],
        },
    )
    assert second.status_code == 200, second.text
    history = messages(chat_upstream)
    assert history[1]["tool_calls"][0]["id"] == call["call_id"]
    assert history[1]["tool_calls"][0]["function"]["arguments"] == call["arguments"]
    assert history[2] == {"role": "tool", "tool_call_id": call["call_id"], "content": "-3 C"}


def test_input_tokens_are_estimated_without_calling_the_upstream(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    sent = len(chat_upstream.requests)
    short = up.post("/v1/responses/input_tokens", json={"model": "up-echo", "input": "hi"}).json()
    long = up.post(
        "/v1/responses/input_tokens", json={"model": "up-echo", "input": "hi " * 400}
    ).json()
    assert short["estimated"] is True and long["estimated"] is True
    assert 0 < short["input_tokens"] < 20 and 250 < long["input_tokens"] < 600
    assert len(chat_upstream.requests) == sent


def test_a_compacted_window_reaches_the_upstream_as_its_summary(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    conversation = [
        {"role": "user", "content": "The project is called Heron."},
        {"role": "assistant", "content": "Noted: Heron."},
    ]
    compacted = up.post("/v1/responses/compact", json={"model": "up-echo", "input": conversation})
    assert compacted.status_code == 200, compacted.text
    result = compacted.json()
    # The echo upstream's summary is its last user text: the request for a summary.
    continued = up.post(
        "/v1/responses",
        json={
            "model": "up-echo",
            "input": [*result["output"], {"role": "user", "content": "and then?"}],
        },
    )
    assert continued.status_code == 200, continued.text
    sent = chat_upstream.last["messages"]
    summaries = [m for m in sent if m["role"] == "assistant"]
    assert len(summaries) == 1 and summaries[0]["content"].startswith(SUMMARY_HEADING)
    assert "Summarise the conversation so far" in summaries[0]["content"]
    assert sent[-1] == {"role": "user", "content": "and then?"}
    # What is stored is the item as sent; the chain continues with it, expanded again.
    stored = up.get(f"/v1/responses/{continued.json()['id']}/input_items?order=asc").json()
    assert stored["data"][-2]["type"] == "compaction"
    again = up.post(
        "/v1/responses",
        json={"model": "up-echo", "input": "more", "previous_response_id": continued.json()["id"]},
    )
    assert again.status_code == 200
    assert any(m["content"].startswith(SUMMARY_HEADING) for m in chat_upstream.last["messages"])


@pytest.mark.parametrize("counter", ["vllm", "llama_cpp"])
def test_input_tokens_are_exact_where_the_upstream_counts(up: httpx.Client, counter: str) -> None:
    body = {"model": f"up-count-{counter}", "input": "one two three", "instructions": "be brief"}
    counted = up.post("/v1/responses/input_tokens", json=body).json()
    # The loopback upstream's tokens: each message's words after a role word.
    assert counted == {
        "object": "response.input_tokens",
        "input_tokens": len(["system:", "be", "brief", "user:", "one", "two", "three"]),
        "estimated": False,
    }


def test_schemas_are_checked_before_the_upstream_is_called(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    # Valid, with the parts of JSON Schema agents use ($defs, $ref, anyOf, enum, format).
    valid = {
        "$defs": {"unit": {"enum": ["c", "f"]}},
        "type": "object",
        "properties": {
            "city": {"type": "string", "format": "hostname"},
            "unit": {"$ref": "#/$defs/unit"},
            "when": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["city"],
    }
    tool = {"type": "function", "name": "get_weather", "parameters": valid}
    answer = up.post("/v1/responses", json={"model": "up-tools", "input": "x", "tools": [tool]})
    assert answer.status_code == 200
    assert chat_upstream.last["tools"][0]["function"]["parameters"] == valid
    sent = len(chat_upstream.requests)
    broken = {**tool, "parameters": {**valid, "required": "city"}}
    refused = up.post("/v1/responses", json={"model": "up-tools", "input": "x", "tools": [broken]})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "tools[0].parameters"
    assert "'city' is not of type 'array'" in refused.json()["error"]["message"]
    assert len(chat_upstream.requests) == sent


def test_parameters_are_translated_not_dropped(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    answer = up.post(
        "/v1/responses",
        json={
            "model": "up-echo",
            "input": "x",
            "temperature": 0.3,
            "top_p": 0.9,
            "top_k": 40,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "seed": 7,
            "max_output_tokens": 64,
            "user": "u1",
            "safety_identifier": "s1",
            "prompt_cache_key": "k1",
            "service_tier": "flex",
            "reasoning": {"effort": "low"},
            "text": {
                "verbosity": "low",
                "format": {
                    "type": "json_schema",
                    "name": "thing",
                    "schema": schema,
                    "strict": True,
                },
            },
        },
    )
    assert answer.status_code == 200, answer.text
    sent = chat_upstream.last
    assert sent["model"] == "echo" and sent["stream"] is True
    for key, value in {
        "temperature": 0.3,
        "top_p": 0.9,
        "top_k": 40,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "seed": 7,
        "max_tokens": 64,
        "user": "u1",
        "safety_identifier": "s1",
        "prompt_cache_key": "k1",
        "service_tier": "flex",
        "reasoning_effort": "low",
        "verbosity": "low",
    }.items():
        assert sent[key] == value, key
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": True},
    }
    body = answer.json()
    assert body["text"]["format"]["name"] == "thing" and body["temperature"] == 0.3
    assert body["service_tier"] == "flex" and body["reasoning"]["effort"] == "low"


def test_reasoning_content_becomes_reasoning_items(up: httpx.Client) -> None:
    for model in ("up-reasoning", "up-reasoning_alt"):
        folded = check_stream(sse_events(up, {"model": model, "input": "why?"}))
        kinds = [item["type"] for item in folded["output"]]
        assert kinds == ["reasoning", "message"], model
        assert folded["output"][0]["content"][0]["text"]


def test_logprobs_are_returned_when_included(up: httpx.Client) -> None:
    events = sse_events(
        up,
        {
            "model": "up-echo",
            "input": "one two",
            "top_logprobs": 2,
            "include": ["message.output_text.logprobs"],
        },
    )
    folded = check_stream(events)
    logprobs = folded["output"][0]["content"][0]["logprobs"]
    assert [entry["token"] for entry in logprobs] == ["one ", "two"]
    assert all(len(entry["top_logprobs"]) == 2 for entry in logprobs)


def test_upstream_length_and_refusal(up: httpx.Client) -> None:
    cut = check_stream(sse_events(up, {"model": "up-length", "input": "x"}))
    assert cut["status"] == "incomplete"
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"}
    refused = check_stream(sse_events(up, {"model": "up-refusal", "input": "x"}))
    assert refused["output"][0]["content"][0]["type"] == "refusal"


def test_upstream_errors_before_the_stream(up: httpx.Client) -> None:
    limited = up.post("/v1/responses", json={"model": "up-http_429", "input": "x", "stream": True})
    assert limited.status_code == 429 and limited.headers["retry-after"] == "7"
    assert limited.json()["error"]["type"] == "rate_limit_error"
    refused = up.post("/v1/responses", json={"model": "up-http_401", "input": "x"})
    assert refused.status_code == 502
    assert UPSTREAM_KEY not in refused.text
    bad = up.post("/v1/responses", json={"model": "up-http_400", "input": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    fell_back = up.post("/v1/responses", json={"model": "up-flaky", "input": "saved"}).json()
    assert fell_back["model"] == "up-echo" and fell_back["output_text"] == "saved"


@pytest.mark.parametrize("model", ["up-drop_mid_stream", "up-error_chunk", "up-malformed"])
def test_upstream_failure_mid_stream_is_reported_and_stored(up: httpx.Client, model: str) -> None:
    events = sse_events(up, {"model": model, "input": "some words here"})
    folded = check_stream(events)
    assert events[-2]["type"] == "error" and folded["status"] == "failed"
    assert UPSTREAM_KEY not in json.dumps(events)
    stored = up.get(f"/v1/responses/{folded['id']}").json()
    assert stored == folded
    assert_valid_response(stored)


@pytest.mark.parametrize("model", ["up-done_unfinished", "up-truncated"])
def test_a_stream_cut_short_after_some_text_fails_saying_so(up: httpx.Client, model: str) -> None:
    """No finish_reason (with or without [DONE]): the answer is not whole, whatever the body's
    end looked like; the text that came is kept, marked incomplete."""
    events = sse_events(up, {"model": model, "input": "some words here"})
    folded = check_stream(events)
    assert folded["status"] == "failed"
    assert folded["error"]["code"] == events[-2]["code"] == "upstream_truncated"
    assert folded["output"][0]["status"] == "incomplete"
    assert folded["output_text"] == "some words here"
    answer = up.post("/v1/responses", json={"model": model, "input": "more words"}).json()
    assert (answer["status"], answer["error"]["code"]) == ("failed", "upstream_truncated")


@pytest.mark.parametrize("script", ["role_only", "error_first"])
def test_a_stream_that_fails_before_any_answer_is_retried_and_failed_over(
    up: httpx.Client, chat_upstream: ChatUpstream, script: str
) -> None:
    """A 200 whose stream ends after the role chunk, or whose first chunk is an error, is a
    failure before the first byte: retried (the route's 1 retry), then the fallback serves."""
    fallback = "up-role-only-then-echo" if script == "role_only" else "up-error-first-then-echo"
    chat_upstream.requests.clear()
    answer = up.post("/v1/responses", json={"model": fallback, "input": "saved words"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["status"], body["model"], body["output_text"]) == (
        "completed",
        "up-echo",
        "saved words",
    )
    assert [sent["model"] for sent in chat_upstream.requests] == [script, script, "echo"]
    alone = up.post("/v1/responses", json={"model": f"up-{script}", "input": "x"})
    assert alone.status_code == 502, alone.text
    if script == "role_only":
        assert alone.json()["error"]["code"] == "upstream_truncated"
    streamed = up.post(
        "/v1/responses", json={"model": f"up-{script}", "input": "x", "stream": True}
    )
    assert streamed.status_code == 502 and streamed.json()["error"]["message"]


def test_official_client_against_a_chat_backend(backend_url: str) -> None:
    with sdk_client(backend_url) as client:
        with client.responses.stream(model="up-split", input="framing survives") as stream:
            final = stream.get_final_response()
        assert final.output_text == "framing survives"
        assert client.responses.retrieve(final.id).output_text == "framing survives"


def test_truncation_auto_drops_oldest_turns_and_disabled_refuses(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    previous = None
    for word in ("one", "two", "three"):
        answer = up.post(
            "/v1/responses",
            json={"model": "up-echo", "input": word, "previous_response_id": previous},
        )
        previous = answer.json()["id"]
    refused = up.post(
        "/v1/responses",
        json={"model": "up-small_context", "input": "four", "previous_response_id": previous},
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    truncated = up.post(
        "/v1/responses",
        json={
            "model": "up-small_context",
            "input": "four",
            "previous_response_id": previous,
            "instructions": "Rules.",
            "truncation": "auto",
        },
    )
    assert truncated.status_code == 200, truncated.text
    assert truncated.json()["truncation"] == "auto"
    assert messages(chat_upstream) == [
        {"role": "system", "content": "Rules."},
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "three"},
        {"role": "user", "content": "four"},
    ]


def test_truncation_auto_keeps_a_long_conversation_within_the_window(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    conversation = up.post("/v1/conversations", json={}).json()["id"]
    for word in ("one", "two", "three"):
        body = {"model": "up-echo", "input": word, "conversation": conversation}
        assert up.post("/v1/responses", json=body).status_code == 200
    body = {"model": "up-small_context", "input": "four", "conversation": conversation}
    refused = up.post("/v1/responses", json=body)
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    truncated = up.post("/v1/responses", json={**body, "truncation": "auto"})
    assert truncated.status_code == 200, truncated.text
    assert [message["content"] for message in messages(chat_upstream)] == [
        "three",
        "three",
        "four",
    ]
    # The conversation keeps every turn; only what the upstream was sent was cut.
    items = up.get(f"/v1/conversations/{conversation}/items", params={"limit": 100}).json()
    assert len(items["data"]) == 8


def test_allowed_tools_limit_what_the_upstream_sees_and_may_call(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    tools = [
        {"type": "function", "name": name, "parameters": {"type": "object"}}
        for name in ("read", "write", "delete")
    ]
    choice = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "write"}],
    }
    answer = up.post(
        "/v1/responses",
        json={"model": "up-tools", "input": "x", "tools": tools, "tool_choice": choice},
    ).json()
    assert [t["function"]["name"] for t in chat_upstream.last["tools"]] == ["write"]
    assert chat_upstream.last["tool_choice"] == "required"
    assert answer["output"][0]["name"] == "write"
    assert [t["name"] for t in answer["tools"]] == ["read", "write", "delete"]
    assert answer["tool_choice"] == choice
    forced = up.post(
        "/v1/responses",
        json={
            "model": "up-tools",
            "input": "x",
            "tools": tools,
            "tool_choice": {"type": "function", "name": "read"},
        },
    )
    assert chat_upstream.last["tool_choice"] == {"type": "function", "function": {"name": "read"}}
    assert forced.json()["output"][0]["name"] == "read"
    none = up.post(
        "/v1/responses",
        json={"model": "up-echo", "input": "x", "tools": tools, "tool_choice": "none"},
    )
    assert "tools" not in chat_upstream.last and none.json()["output"][0]["type"] == "message"


def test_a_call_outside_tool_choice_fails_the_response(up: httpx.Client) -> None:
    tools = [{"type": "function", "name": "read", "parameters": {"type": "object"}}]
    events = sse_events(up, {"model": "up-rogue_tool", "input": "x", "tools": tools})
    assert [e["type"] for e in events][-2:] == ["error", "response.failed"]
    assert events[-1]["response"]["error"]["code"] == "invalid_tool_call"
    assert "not_offered" in events[-1]["response"]["error"]["message"]
    required = sse_events(
        up, {"model": "up-echo", "input": "x", "tools": tools, "tool_choice": "required"}
    )
    assert required[-1]["response"]["status"] == "failed"


def test_item_reference_sends_the_stored_item_upstream(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    first = up.post("/v1/responses", json={"model": "up-echo", "input": "remember the tide"})
    message_id = first.json()["output"][0]["id"]
    second = up.post(
        "/v1/responses",
        json={
            "model": "up-echo",
            "input": [
                {"type": "item_reference", "id": message_id},
                {"role": "user", "content": "and?"},
            ],
        },
    )
    assert second.status_code == 200, second.text
    assert messages(chat_upstream) == [
        {"role": "assistant", "content": "remember the tide"},
        {"role": "user", "content": "and?"},
    ]


def test_sealed_reasoning_survives_a_store_false_transcript(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    first = up.post(
        "/v1/responses",
        json={
            "model": "up-reasoning",
            "input": "why?",
            "store": False,
            "include": ["reasoning.encrypted_content"],
        },
    ).json()
    reasoning, answer = first["output"]
    assert reasoning["content"][0]["text"] == "Let me think."
    sealed = reasoning["encrypted_content"]
    assert sealed and "think" not in sealed
    # Replayed the way Codex does: the whole transcript, the reasoning without its text.
    replayed = {
        "type": "reasoning",
        "id": reasoning["id"],
        "summary": [],
        "encrypted_content": sealed,
    }
    transcript = [{"role": "user", "content": "why?"}, replayed, answer]
    for route, expected in (("up-echo-replay", "Let me think."), ("up-echo", None)):
        body = {"model": route, "input": [*transcript, {"role": "user", "content": "and?"}]}
        assert up.post("/v1/responses", json=body).status_code == 200
        assistant = chat_upstream.last["messages"][1]
        assert assistant["role"] == "assistant" and assistant["content"] == "Done."
        assert assistant.get("reasoning_content") == expected
    # Content Relay did not seal (another provider's) is left alone, never an error.
    foreign = {**replayed, "encrypted_content": "gAAAAAB-sealed-by-someone-else"}
    body = {"model": "up-echo-replay", "input": [transcript[0], foreign, answer]}
    assert up.post("/v1/responses", json=body).status_code == 200
    assert "reasoning_content" not in chat_upstream.last["messages"][1]


def test_stored_reasoning_is_replayed_where_the_route_takes_it(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    first = up.post("/v1/responses", json={"model": "up-reasoning", "input": "why?"}).json()
    body = {"model": "up-echo-replay", "input": "and?", "previous_response_id": first["id"]}
    assert up.post("/v1/responses", json=body).status_code == 200
    assert chat_upstream.last["messages"][1]["reasoning_content"] == "Let me think."


CRM = {
    "type": "namespace",
    "name": "crm",
    "description": "The customer database.",
    "tools": [
        {
            "type": "function",
            "name": "lookup",
            "description": "Find a customer.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ],
}
WEATHER_TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


def test_namespace_tools_go_upstream_flat_and_come_back_named(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    body = {"model": "up-tools", "input": "find them", "tools": [CRM, WEATHER_TOOL]}
    first = up.post("/v1/responses", json=body).json()
    offered = [tool["function"]["name"] for tool in chat_upstream.last["tools"]]
    assert offered == ["crm__lookup", "get_weather"]
    [call] = first["output"]
    assert (call["type"], call["namespace"], call["name"]) == ("function_call", "crm", "lookup")
    assert first["tools"][0]["type"] == "namespace"  # echoed as sent, as OpenAI does
    # Continued, from storage and as a store:false transcript: the call goes back flat.
    output = {"type": "function_call_output", "call_id": call["call_id"], "output": "Ada"}
    for continuation in (
        {"previous_response_id": first["id"], "input": [output]},
        {"input": [{"role": "user", "content": "find them"}, call, output], "store": False},
    ):
        answer = up.post("/v1/responses", json={"model": "up-echo", **continuation})
        assert answer.status_code == 200, answer.text
        assistant = chat_upstream.last["messages"][1]
        assert assistant["tool_calls"][0]["function"]["name"] == "crm__lookup"


def test_tool_choice_names_a_namespaced_function(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    forced = {"type": "function", "name": "lookup", "namespace": "crm"}
    body = {"model": "up-tools", "input": "x", "tools": [WEATHER_TOOL, CRM], "tool_choice": forced}
    answer = up.post("/v1/responses", json=body).json()
    assert chat_upstream.last["tool_choice"] == {
        "type": "function",
        "function": {"name": "crm__lookup"},
    }
    assert answer["tool_choice"] == forced
    assert answer["output"][0]["namespace"] == "crm"
    allowed = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "lookup", "namespace": "crm"}],
    }
    up.post("/v1/responses", json={**body, "tool_choice": allowed})
    assert [tool["function"]["name"] for tool in chat_upstream.last["tools"]] == ["crm__lookup"]
    missing = {**body, "tool_choice": {"type": "function", "name": "lookup"}}
    assert up.post("/v1/responses", json=missing).status_code == 400  # it lives in crm


PATCH_TOOL = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Apply a patch.",
    "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin Patch" /.+/'},
}


def test_custom_tools_travel_as_functions_of_one_string(
    up: httpx.Client, chat_upstream: ChatUpstream
) -> None:
    # The tools script calls the first tool offered with {"city": "Paris"}: not the
    # {"input": ...} shape, so the input is the arguments as they came.
    code = {
        "type": "custom",
        "name": "code",
        "format": {"type": "grammar", "syntax": "regex", "definition": "[0-9]{3}"},
    }
    body = {"model": "up-tools", "input": "patch it", "tools": [PATCH_TOOL, code]}
    events = sse_events(up, body)
    offered, regex = (tool["function"] for tool in chat_upstream.last["tools"])
    assert offered["name"] == "apply_patch"
    assert offered["parameters"]["required"] == ["input"]
    assert "lark grammar" in offered["description"] and "Begin Patch" in offered["description"]
    # A regex grammar is also the input's JSON Schema pattern, for upstreams that enforce it.
    assert regex["parameters"]["properties"]["input"]["pattern"] == "^([0-9]{3})$"
    call = events[-1]["response"]["output"][0]
    assert (call["type"], call["name"]) == ("custom_tool_call", "apply_patch")
    assert call["input"] == '{"city": "Paris"}'
    kinds = [event["type"] for event in events]
    assert "response.custom_tool_call_input.done" in kinds
    assert "response.function_call_arguments.delta" not in kinds
    # Its output comes back as input; the call and the output go upstream as a tool round.
    output = {"type": "custom_tool_call_output", "call_id": call["call_id"], "output": "done"}
    answer = up.post(
        "/v1/responses",
        json={
            "model": "up-echo",
            "input": [output],
            "previous_response_id": events[-1]["response"]["id"],
            "tools": [PATCH_TOOL],
        },
    )
    assert answer.status_code == 200, answer.text
    sent = chat_upstream.last["messages"]
    replayed = sent[1]["tool_calls"][0]["function"]
    assert replayed["name"] == "apply_patch"
    assert orjson.loads(replayed["arguments"]) == {"input": '{"city": "Paris"}'}
    assert sent[2] == {"role": "tool", "tool_call_id": call["call_id"], "content": "done"}
    items = up.get(f"/v1/responses/{answer.json()['id']}/input_items").json()["data"]
    assert items[0]["type"] == "custom_tool_call_output"


def test_tool_choice_can_force_a_custom_tool(up: httpx.Client, chat_upstream: ChatUpstream) -> None:
    forced = {"type": "custom", "name": "apply_patch"}
    body = {
        "model": "up-tools",
        "input": "x",
        "tools": [WEATHER_TOOL, PATCH_TOOL],
        "tool_choice": forced,
    }
    answer = up.post("/v1/responses", json=body).json()
    assert chat_upstream.last["tool_choice"] == {
        "type": "function",
        "function": {"name": "apply_patch"},
    }
    assert answer["output"][0]["type"] == "custom_tool_call"
    wrong_kind = {**body, "tool_choice": {"type": "function", "name": "apply_patch"}}
    assert up.post("/v1/responses", json=wrong_kind).status_code == 400


def test_upstream_timeouts_are_408_before_the_stream_and_a_failure_after(up: httpx.Client) -> None:
    for stream in (False, True):
        before = up.post(
            "/v1/responses", json={"model": "up-timeout-before", "input": "x", "stream": stream}
        )
        assert before.status_code == 408
        assert before.json()["error"]["code"] == "request_timeout"
    events = sse_events(up, {"model": "up-timeout-mid", "input": "one two three"})
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "request_timeout"
    assert failed["output"][0]["status"] == "incomplete"  # the word that came is kept
