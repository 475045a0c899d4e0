"""The embedded SmolLM2 model, for real: no mock of llama.cpp, no network."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest
from live_server import relay_server
from relay_fixtures import checked_client, logged_responses, sdk_client, sse_events

from relay.config import DEFAULT_ROUTE, RouteConfig, Settings, load_settings
from relay.providers.llama_local import bundled_model_path

MODEL = DEFAULT_ROUTE.model
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "celsius": {"type": "integer"}},
    "required": ["city", "celsius"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    {
        "type": "function",
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
]


@pytest.fixture(scope="module")
def local_url(
    tmp_path_factory: pytest.TempPathFactory, caplog_module: list[logging.LogRecord]
) -> Iterator[str]:
    database = Path(tmp_path_factory.mktemp("local")) / "relay.db"
    settings = Settings(
        database_url=f"sqlite:///{database}",
        routes=[
            DEFAULT_ROUTE,
            RouteConfig(
                model="smol-tiny-queue", provider="llama_cpp", max_queue=2, load="first_use"
            ),
            RouteConfig(
                model="smol-short",
                provider="llama_cpp",
                default_max_output_tokens=24,
                load="first_use",
            ),
            RouteConfig(
                model="smol-deadline", provider="llama_cpp", max_generation_s=0.5, load="first_use"
            ),
        ],
    )
    with relay_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def caplog_module() -> Iterator[list[logging.LogRecord]]:
    """Log records of the module's server start-up (caplog is per test)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("relay.local")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def local(local_url: str) -> Iterator[httpx.Client]:
    with checked_client(local_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(local_url: str) -> Iterator[openai.OpenAI]:
    with sdk_client(local_url) as client:
        yield client


def create(local: httpx.Client, **body: Any) -> dict[str, Any]:
    answer = local.post("/v1/responses", json={"model": MODEL, **body})
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def test_default_route_is_the_bundled_model(
    caplog_module: list[logging.LogRecord], local: httpx.Client, local_url: str
) -> None:
    assert load_settings().routes == [DEFAULT_ROUTE]
    assert bundled_model_path().stat().st_size > 50_000_000
    assert MODEL in {m["id"] for m in local.get("/v1/models").json()["data"]}
    # Loaded at start-up, beside the server: ready once it has.
    deadline = time.monotonic() + 30
    while (ready := httpx.get(f"{local_url}/readyz")).status_code != 200:
        assert ready.json()["checks"][f"model {MODEL}"] == "loading"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ready.json()["checks"][f"model {MODEL}"] == "ok"
    assert any("loaded SmolLM2" in r.getMessage() for r in caplog_module)


def test_text_answer_with_real_usage(sdk: openai.OpenAI) -> None:
    answer = sdk.responses.create(
        model=MODEL, input="What is the capital of France?", temperature=0, max_output_tokens=40
    )
    assert answer.output_text.strip()
    assert answer.usage is not None
    assert answer.usage.input_tokens > 10 and 0 < answer.usage.output_tokens <= 40


def test_streams_token_by_token(local: httpx.Client) -> None:
    events = sse_events(
        local,
        {"model": MODEL, "input": "Count to twenty.", "temperature": 0, "max_output_tokens": 32},
    )
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    usage = events[-1]["response"]["usage"]
    # One delta per generated token (multi-byte characters may merge a few).
    assert len(deltas) >= usage["output_tokens"] - 3 and len(deltas) > 5


def test_same_seed_same_answer(local: httpx.Client) -> None:
    body = {
        "input": "Write a sentence about cats.",
        "temperature": 1.0,
        "seed": 42,
        "max_output_tokens": 24,
    }
    first, again = create(local, **body), create(local, **body)
    assert first["output_text"] == again["output_text"]
    other = create(local, **{**body, "seed": 7})
    assert other["output_text"] != first["output_text"]


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_always_validates(local: httpx.Client, seed: int) -> None:
    answer = create(
        local,
        input="The weather in Oslo as JSON.",
        temperature=1.0,
        seed=seed,
        max_output_tokens=120,
        text={
            "format": {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}
        },
    )
    assert answer["status"] == "completed"
    jsonschema.validate(json.loads(answer["output_text"]), WEATHER)


def test_json_object_and_parse(local: httpx.Client, sdk: openai.OpenAI) -> None:
    answer = create(
        local,
        input="Describe a dog as a JSON object with a name and an age.",
        temperature=0,
        max_output_tokens=200,
        text={"format": {"type": "json_object"}},
    )
    assert answer["status"] == "completed", answer["output_text"]
    assert isinstance(json.loads(answer["output_text"]), dict)

    class Weather(pydantic.BaseModel):
        city: str
        celsius: int

    parsed = sdk.responses.parse(
        model=MODEL,
        input="Weather in Rome.",
        text_format=Weather,
        max_output_tokens=120,
        temperature=0.7,
    )
    assert isinstance(parsed.output_parsed, Weather)


def _calls(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return [item for item in answer["output"] if item["type"] == "function_call"]


@pytest.mark.parametrize("seed", range(3))
def test_required_tool_choice_always_yields_a_valid_call(local: httpx.Client, seed: int) -> None:
    answer = create(
        local,
        input="What's the weather in Paris?",
        tools=TOOLS,
        seed=seed,
        tool_choice="required",
        temperature=1.0,
        max_output_tokens=100,
    )
    calls = _calls(answer)
    assert calls and answer["status"] == "completed"
    schemas = {tool["name"]: tool["parameters"] for tool in TOOLS}
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])


def test_forced_function_none_and_parallel(local: httpx.Client) -> None:
    forced = create(
        local,
        input="Weather in Paris?",
        tools=TOOLS,
        seed=3,
        tool_choice={"type": "function", "name": "add"},
        max_output_tokens=100,
    )
    assert _calls(forced) and {c["name"] for c in _calls(forced)} == {"add"}
    jsonschema.validate(json.loads(_calls(forced)[0]["arguments"]), TOOLS[1]["parameters"])
    none = create(
        local,
        input="Weather in Paris?",
        tools=TOOLS,
        tool_choice="none",
        seed=3,
        max_output_tokens=30,
    )
    assert not _calls(none) and none["output"][0]["type"] == "message"
    for seed in range(3):
        single = create(
            local,
            input="Weather in Paris and in Rome?",
            tools=TOOLS,
            seed=seed,
            tool_choice="required",
            parallel_tool_calls=False,
            max_output_tokens=120,
        )
        assert len(_calls(single)) == 1


def test_auto_tool_choice_gives_text_or_a_valid_call(local: httpx.Client) -> None:
    events = sse_events(
        local,
        {
            "model": MODEL,
            "input": "Weather in Paris?",
            "tools": TOOLS,
            "seed": 5,
            "max_output_tokens": 100,
        },
    )
    final = events[-1]["response"]
    for call in _calls(final):
        assert call["name"] in {"get_weather", "add"}
        json.loads(call["arguments"])
    assert final["output"]


def test_max_output_tokens_gives_incomplete(local: httpx.Client) -> None:
    answer = create(local, input="Tell me a long story.", max_output_tokens=16, temperature=0)
    assert answer["status"] == "incomplete"
    assert answer["incomplete_details"] == {"reason": "max_output_tokens"}
    assert answer["usage"]["output_tokens"] == 16


def test_local_model_refuses_what_it_cannot_do(local: httpx.Client) -> None:
    image = local.post(
        "/v1/responses",
        json={
            "model": MODEL,
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}
                    ],
                }
            ],
        },
    )
    assert image.status_code == 400 and image.json()["error"]["code"] == "unsupported_input"
    logprobs = local.post("/v1/responses", json={"model": MODEL, "input": "x", "top_logprobs": 2})
    assert logprobs.status_code == 400


def test_generation_does_not_block_the_server(local_url: str, local: httpx.Client) -> None:
    finished = threading.Event()
    first_delta = threading.Event()

    def long_generation() -> None:
        with (
            httpx.Client(base_url=local_url, timeout=120) as own,
            own.stream(
                "POST",
                "/v1/responses",
                json={
                    "model": MODEL,
                    "input": "Write an essay.",
                    "max_output_tokens": 300,
                    "stream": True,
                },
            ) as answer,
        ):
            for line in answer.iter_lines():
                if "output_text.delta" in line:
                    first_delta.set()
        finished.set()

    worker = threading.Thread(target=long_generation)
    worker.start()
    assert first_delta.wait(60)
    # While tokens flow, the server answers other requests at once.
    assert local.get("/healthz").status_code == 200
    assert local.get("/v1/models").status_code == 200
    assert not finished.is_set()
    worker.join(120)


def test_bounded_queue_answers_503_with_retry_after(local_url: str) -> None:
    started = threading.Barrier(3)
    results: list[int] = []

    def busy() -> None:
        with httpx.Client(base_url=local_url, timeout=120) as own:
            started.wait()
            answer = own.post(
                "/v1/responses",
                json={
                    "model": "smol-tiny-queue",
                    # A long answer, so that the slot and the queue stay taken while the
                    # loop below knocks ("Go." was sometimes answered in a few tokens).
                    "input": "Count from 1 to 300, separated by commas.",
                    "max_output_tokens": 200,
                    "temperature": 0,
                },
            )
            results.append(answer.status_code)

    workers = [threading.Thread(target=busy) for _ in range(2)]
    for worker in workers:
        worker.start()
    started.wait()
    deadline_checks = 0
    refused = None
    while deadline_checks < 200 and len(results) < 2:
        refused = httpx.post(
            f"{local_url}/v1/responses",
            timeout=120,
            json={"model": "smol-tiny-queue", "input": "x", "max_output_tokens": 16},
        )
        if refused.status_code == 503:
            break
        deadline_checks += 1
    for worker in workers:
        worker.join(120)
    assert refused is not None and refused.status_code == 503, "no request was refused"
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "model_overloaded"
    assert results == [200, 200]


def test_disconnect_stops_generation(local_url: str, local: httpx.Client) -> None:
    with (
        httpx.Client(base_url=local_url, timeout=120) as own,
        own.stream(
            "POST",
            "/v1/responses",
            json={
                "model": MODEL,
                "input": "Write a very long essay.",
                "max_output_tokens": 2000,
                "temperature": 0,
                "stream": True,
            },
        ) as answer,
    ):
        response_id, deltas = None, 0
        for line in answer.iter_lines():
            if line.startswith("data: {") and response_id is None:
                response_id = json.loads(line[6:])["response"]["id"]
            if line.startswith("data: ") and "output_text.delta" in line:
                deltas += 1
                if deltas == 5:
                    break
    assert response_id is not None
    stored = None
    for _ in range(200):
        # Recorded from its start (in_progress), settled as it stops.
        stored = local.get(f"/v1/responses/{response_id}")
        if stored.status_code == 200 and stored.json()["status"] != "in_progress":
            break
        threading.Event().wait(0.05)
    assert stored is not None and stored.status_code == 200
    body = stored.json()
    assert body["status"] == "cancelled"
    # Stopped within a few tokens of the disconnect, not after 2,000.
    assert len(body["output"][0]["content"][0]["text"].split()) < 60


def test_an_abandoned_json_request_frees_the_worker(
    local_url: str, local: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    long = {"model": MODEL, "input": "Write a very long essay.", "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{local_url}/v1/responses", json={**long, "max_output_tokens": 4000}, timeout=1)
    # The one worker is free again: the next request does not wait for 4,000 tokens.
    short = local.post(
        "/v1/responses", json={**long, "max_output_tokens": 16}, timeout=httpx.Timeout(10)
    )
    assert short.status_code == 200 and short.json()["status"] == "incomplete"
    # This request's line (a stream an earlier test left may settle, cancelled, meanwhile:
    # its line says 200, the status its stream began with).
    [line] = [f for f in logged_responses(caplog.records, "cancelled") if f.get("status") != 200]
    stored = local.get(f"/v1/responses/{line['response_id']}").json()
    assert stored["status"] == "cancelled"
    # Stopped about when the client left (a second of generation), not after 4,000 tokens.
    assert len(stored["output_text"].split()) < 400


def test_a_schema_the_grammar_cannot_enforce_is_a_400(local: httpx.Client) -> None:
    # Valid JSON Schema, but llama.cpp's converter takes only anchored patterns.
    unanchored = {"type": "object", "properties": {"code": {"type": "string", "pattern": "[A-Z]+"}}}
    tools = [TOOLS[0], {"type": "function", "name": "lookup", "parameters": unanchored}]
    for body in (
        {"tools": tools},
        {"text": {"format": {"type": "json_schema", "name": "a", "schema": unanchored}}},
    ):
        answer = local.post("/v1/responses", json={"model": MODEL, "input": "x", **body})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["code"] == "unsupported_schema"
        assert error["param"] == (
            "tools[1].parameters" if "tools" in body else "text.format.schema"
        )


def test_a_continuation_without_input(local: httpx.Client) -> None:
    first = local.post(
        "/v1/responses", json={"model": MODEL, "input": "Say hello.", "max_output_tokens": 16}
    ).json()
    again = local.post(
        "/v1/responses",
        json={"model": MODEL, "previous_response_id": first["id"], "max_output_tokens": 16},
    )
    assert again.status_code == 200 and again.json()["output_text"]


def test_requests_without_a_limit_get_the_route_default(local: httpx.Client) -> None:
    body = create(local, model="smol-short", input="Write a very long essay.", temperature=0)
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] == 24


def test_a_generation_past_its_deadline_ends_incomplete(local: httpx.Client) -> None:
    essay = {"model": "smol-deadline", "input": "Write a very long essay.", "temperature": 0}
    body = create(local, **essay, max_output_tokens=4000)
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_generation_time"}
    assert 0 < body["usage"]["output_tokens"] < 4000
    assert body["output"][0]["status"] == "incomplete" and body["output_text"]
    events = sse_events(local, {**essay, "max_output_tokens": 4000})
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_generation_time"}


def test_input_tokens_are_exact(local: httpx.Client) -> None:
    body = {"model": MODEL, "input": "What is the weather in Oslo?", "tools": TOOLS}
    counted = local.post("/v1/responses/input_tokens", json=body).json()
    assert counted["estimated"] is False
    created = create(local, **body, max_output_tokens=16, tool_choice="none")
    # tool_choice none offers no tools: fewer tokens than the count with them.
    assert created["usage"]["input_tokens"] < counted["input_tokens"]
    answer = create(local, **body, max_output_tokens=16)
    assert answer["usage"]["input_tokens"] == counted["input_tokens"]


def test_a_namespaced_function_is_called_by_its_names(local: httpx.Client) -> None:
    crm = {"type": "namespace", "name": "crm", "description": "Customers.", "tools": [TOOLS[0]]}
    forced = {"type": "function", "name": "get_weather", "namespace": "crm"}
    body = create(
        local,
        input="Weather in Oslo?",
        tools=[crm, TOOLS[1]],
        tool_choice=forced,
        temperature=0,
        max_output_tokens=64,
    )
    call = body["output"][0]
    assert (call["type"], call["namespace"], call["name"]) == (
        "function_call",
        "crm",
        "get_weather",
    )
    assert "city" in json.loads(call["arguments"])


def test_custom_tools_on_the_embedded_model(local: httpx.Client) -> None:
    note = {"type": "custom", "name": "note", "description": "Write a short note."}
    body = create(
        local,
        input="Call note with the text: sky is blue",
        tools=[note],
        tool_choice={"type": "custom", "name": "note"},
        temperature=0,
        max_output_tokens=300,
    )
    call = body["output"][0]
    assert call["type"] == "custom_tool_call" and call["name"] == "note"
    assert call["input"] == "sky is blue"
    # A regex grammar holds the input to it; a lark one the embedded model cannot take.
    digits = {"type": "grammar", "syntax": "regex", "definition": "[0-9]{3}"}
    held = create(
        local,
        input="Call note with the text: sky is blue",
        tools=[{**note, "format": digits}],
        tool_choice={"type": "custom", "name": "note"},
        temperature=0,
        max_output_tokens=64,
    )
    assert re.fullmatch(r"[0-9]{3}", held["output"][0]["input"])
    lark = {"type": "grammar", "syntax": "lark", "definition": 'start: "a"'}
    refused = local.post(
        "/v1/responses",
        json={"model": MODEL, "input": "x", "tools": [{**note, "format": lark}]},
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "unsupported_tool_format"
