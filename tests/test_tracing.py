"""OpenTelemetry traces (relay.observe.tracing): the span tree of a request (its upstream tries,
retries and failovers among them, storage, background runs), its GenAI attributes, seed 000's
`trace` object, W3C trace context from the client and to upstreams, and what never goes on a
span. Unit tests run Relay in this process on the SDK's in-memory exporter; one runs `relay
serve` exporting over OTLP/HTTP to a receiver on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
from chat_upstream import UPSTREAM_KEY, ChatUpstream
from live_server import relay_serve, relay_server
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from otlp_receiver import OtlpReceiver, attributes_of
from pydantic import SecretStr
from websockets.sync.client import connect

from relay.config import ApiKeyConfig, RouteConfig, Settings
from relay.observe import tracing

KEY_ENV = "RELAY_TEST_TRACING_KEY"
CLIENT_KEY = "sk-client-Zr8Qw2Lx5Vn9Tb4Hm7Kc"
PROMPT = "ultramarine pelican recites"  # text that must not reach a span unless trace_content
T = TypeVar("T")
# A client's W3C trace context, and the trace seed 000's `trace` object names.
CLIENT_TRACE, CLIENT_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
SEED_TRACE, SEED_PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
# Seed 000's `trace` object: its own keys, and one of the client's (metadata).
SEED_OBJECT = {
    "trace_id": SEED_TRACE,
    "parent_span_id": SEED_PARENT,
    "trace_name": "nightly eval",
    "span_name": "grade essay",
    "generation_name": "grader",
    "customer_tier": "gold",
}


def chat(upstream: ChatUpstream, name: str, script: str, **more: Any) -> dict[str, Any]:
    return upstream.deployment(name, script, KEY_ENV, **more)


def routes(upstream: ChatUpstream) -> list[dict[str, Any]]:
    return [
        {
            # The first deployment fails twice (a try and its retry), the second answers.
            "model": "traced",
            "deployments": [
                chat(upstream, "flaky", "http_500", retries=1, retry_backoff_s=0.01),
                chat(upstream, "steady", "echo"),
            ],
        },
        {"model": "fake-text", "provider": "fake", "upstream_model": "text"},
        # Some text, then an error chunk: a failure after the stream began.
        {"model": "breaks", "deployments": [chat(upstream, "midway", "error_chunk")]},
    ]


FAILOVER = {"order": ["flaky", "steady"]}


# In this process, on the in-memory exporter -------------------------------------------------------


@pytest.fixture(scope="session")
def exporter() -> InMemorySpanExporter:
    """The process's tracer provider (Relay uses one the process has), exporting to memory."""
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    trace.set_tracer_provider(provider)
    return exported


@pytest.fixture(scope="module")
def upstream(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[ChatUpstream]:
    monkeypatch_module.setenv(KEY_ENV, UPSTREAM_KEY)
    with ChatUpstream(api_key=UPSTREAM_KEY) as server:
        yield server


@contextmanager
def traced_relay(
    upstream: ChatUpstream, exporter: InMemorySpanExporter, tmp_path: Path, **settings: Any
) -> Iterator[httpx.Client]:
    """A Relay with tracing on, in this process (on SQLite in `tmp_path` unless `settings` name
    a database), and a client of it; no spans kept from before."""
    configs = [RouteConfig.model_validate(route) for route in routes(upstream)]
    settings = {"database_url": f"sqlite:///{tmp_path}/relay.db", **settings}
    with relay_server(Settings(routes=configs, tracing=True, **settings)) as url:
        exporter.clear()
        upstream.reset()
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


def eventually(find: Callable[[], T | None], what: str, timeout_s: float = 10) -> T:
    """`find()` once it finds something (spans end as their request's last bytes go out,
    which the client may read first)."""
    deadline = time.monotonic() + timeout_s
    while (found := find()) is None:
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.02)
    return found


def request_span(exporter: InMemorySpanExporter, name: str = "POST /v1/responses") -> ReadableSpan:
    def find() -> ReadableSpan | None:
        return next((s for s in exporter.get_finished_spans() if s.name == name), None)

    return eventually(find, f"span {name!r}")


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    found = [
        span
        for span in exporter.get_finished_spans()
        if span.parent is not None and span.parent.span_id == parent.context.span_id
    ]
    return sorted(found, key=lambda span: span.start_time or 0)


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def traceparent_of(span: ReadableSpan) -> str:
    """The W3C traceparent that names `span` (with its flags, as the SDK sets them)."""
    assert span.context is not None
    return "00-{}-{}-{:02x}".format(*hex_ids(span), span.context.trace_flags)


def generation(exporter: InMemorySpanExporter, parent: ReadableSpan) -> ReadableSpan:
    """The upstream try that answered (the script that answers is echo)."""
    return next(span for span in children(exporter, parent) if span.name == "chat echo")


def ask(client: httpx.Client, headers: dict[str, str] | None = None, **body: Any) -> Any:
    answer = client.post(
        "/v1/responses", json={"model": "traced", "input": PROMPT, **body}, headers=headers
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_request_that_retried_and_failed_over(
    upstream: ChatUpstream, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    with traced_relay(upstream, exporter, tmp_path) as client:
        answer = ask(client, {"x-request-id": "req-traced-1"}, provider=FAILOVER)
        request = request_span(exporter)
        assert request.kind is SpanKind.SERVER and request.parent is None
        attributes = dict(request.attributes or {})
        assert attributes["http.request.method"] == "POST"
        assert attributes["http.route"] == "/v1/responses"
        assert attributes["http.response.status_code"] == 200
        assert attributes["relay.request_id"] == "req-traced-1"
        assert attributes["gen_ai.request.model"] == "traced"
        assert attributes["gen_ai.response.model"] == "traced"
        assert attributes["gen_ai.response.id"] == answer["id"]
        assert attributes["gen_ai.usage.input_tokens"] == answer["usage"]["input_tokens"] > 0
        assert attributes["gen_ai.usage.output_tokens"] == answer["usage"]["output_tokens"] > 0
        assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
        assert attributes["relay.response.status"] == "completed"

        tries = [span for span in children(exporter, request) if span.kind is SpanKind.CLIENT]
        tries = [span for span in tries if span.name.startswith("chat ")]
        assert [
            (s.name, s.attributes["relay.deployment"], s.attributes["relay.attempt"]) for s in tries
        ] == [  # type: ignore[index]
            ("chat http_500", "flaky", 1),
            ("chat http_500", "flaky", 2),
            ("chat echo", "steady", 1),
        ]
        for failed in tries[:2]:
            assert failed.status.status_code is StatusCode.ERROR
            assert failed.attributes["error.type"] == "upstream_error"  # type: ignore[index]
        answered = tries[2]
        assert answered.status.status_code is StatusCode.UNSET
        assert dict(answered.attributes or {}) == {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "echo",
            "gen_ai.response.model": "echo",
            "gen_ai.response.id": answer["id"],
            "gen_ai.response.finish_reasons": ("stop",),
            "gen_ai.usage.input_tokens": answer["usage"]["input_tokens"],
            "gen_ai.usage.output_tokens": answer["usage"]["output_tokens"],
            "relay.deployment": "steady",
            "relay.model": "traced",
            "relay.attempt": 1,
            "relay.response.status": "completed",
            "server.address": "127.0.0.1",
            "server.port": upstream.port,
        }
        # The generation's span lasts as long as its stream: it ends as the response settles.
        assert answered.end_time is not None and request.end_time is not None
        assert answered.end_time <= request.end_time
        # Each upstream request named its try's span, in the request's trace.
        sent = [headers["traceparent"] for headers in upstream.headers]
        assert sent == [traceparent_of(span) for span in tries]
        assert {hex_ids(span)[0] for span in tries} == {hex_ids(request)[0]}
        stored = [s for s in children(exporter, request) if s.name == "relay.store.save_response"]
        assert len(stored) == 1
        assert stored[0].attributes == {
            "db.system.name": "sqlite",
            "db.operation.name": "save_response",
            "relay.response_id": answer["id"],
        }


def test_a_client_traceparent_makes_the_request_part_of_its_trace(
    upstream: ChatUpstream, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    with traced_relay(upstream, exporter, tmp_path) as client:
        traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
        ask(client, {"traceparent": traceparent, "tracestate": "vendor=opaque"})
        request = request_span(exporter)
        assert hex_ids(request)[0] == CLIENT_TRACE
        assert request.parent is not None and request.parent.is_remote
        assert f"{request.parent.span_id:016x}" == CLIENT_SPAN
        answered = generation(exporter, request)
        assert hex_ids(answered)[0] == CLIENT_TRACE
        assert upstream.headers[-1]["traceparent"] == traceparent_of(answered)
        assert upstream.headers[-1]["tracestate"] == "vendor=opaque"


def test_without_trace_context_a_request_is_a_root(
    upstream: ChatUpstream, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    with traced_relay(upstream, exporter, tmp_path) as client:
        ask(client)
        request = request_span(exporter)
        assert request.parent is None and not request.links
        assert upstream.headers[-1]["traceparent"].split("-")[1] == hex_ids(request)[0]


def test_the_body_trace_is_the_parent_and_the_header_a_link(
    upstream: ChatUpstream, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    with traced_relay(upstream, exporter, tmp_path) as client:
        metadata = {f"key{number:02}": number for number in range(20)}
        seed = {
            **SEED_OBJECT,
            "long": "x" * 5000,
            "nested": {"not": "kept"},
            "huge": 2**63,  # beyond OTLP's 64-bit integers
            "ratio": 0.5,
            "flag": True,
            **metadata,
        }
        traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
        ask(client, {"traceparent": traceparent}, trace=seed)
        request = request_span(exporter, "grade essay")
        assert hex_ids(request)[0] == SEED_TRACE
        assert request.parent is not None and f"{request.parent.span_id:016x}" == SEED_PARENT
        [link] = request.links
        assert f"{link.context.trace_id:032x}" == CLIENT_TRACE
        assert f"{link.context.span_id:016x}" == CLIENT_SPAN
        attributes = dict(request.attributes or {})
        assert attributes["relay.trace.name"] == "nightly eval"
        kept = {k: v for k, v in attributes.items() if k.startswith("relay.trace.metadata.")}
        # Within the bounds: 16 keys at most, strings cut, only plain values.
        assert len(kept) == tracing.MAX_TRACE_METADATA
        assert kept["relay.trace.metadata.customer_tier"] == "gold"
        assert kept["relay.trace.metadata.long"] == "x" * tracing.MAX_TRACE_VALUE
        assert kept["relay.trace.metadata.ratio"] == 0.5
        assert kept["relay.trace.metadata.flag"] is True
        assert not {"relay.trace.metadata.nested", "relay.trace.metadata.huge"} & set(kept)
        answered = generation(exporter, request)
        assert answered.attributes["relay.trace.generation_name"] == "grader"  # type: ignore[index]


@pytest.mark.parametrize(
    "seed",
    [
        {"trace_id": "0" * 32, "parent_span_id": SEED_PARENT},
        {"trace_id": SEED_TRACE[:-1], "parent_span_id": SEED_PARENT},
        {"trace_id": "0x" + SEED_TRACE[2:], "parent_span_id": SEED_PARENT},
        {"trace_id": 42, "parent_span_id": SEED_PARENT},
    ],
)
def test_an_invalid_body_trace_leaves_the_parent_to_the_header(
    upstream: ChatUpstream, exporter: InMemorySpanExporter, tmp_path: Path, seed: dict[str, Any]
) -> None:
    with traced_relay(upstream, exporter, tmp_path) as client:
        ask(client, {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}, trace=seed)
        request = request_span(exporter)
        assert hex_ids(request)[0] == CLIENT_TRACE and not request.links


def test_who_asked_and_never_a_credential_or_the_prompt(
    upstream: ChatUpstream, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    keys = [ApiKeyConfig(key=SecretStr(CLIENT_KEY), tenant="acme")]
    with traced_relay(upstream, exporter, tmp_path, api_keys=keys) as client:
        headers = {"authorization": f"Bearer {CLIENT_KEY}", "x-session-id": "sess-9"}
        answer = ask(client, headers, user="end-user-3", instructions="Be terse. " + PROMPT)
        assert PROMPT in answer["output_text"]  # the upstream echoes it
        request = request_span(exporter)
        attributes = dict(request.attributes or {})
        assert attributes["relay.project"] == "acme"
        assert str(attributes["relay.key_id"]).startswith("cfg_")
        assert attributes["session.id"] == "sess-9"
        assert attributes["user.id"] == "end-user-3"
        everything = repr(
            [
                (s.name, dict(s.attributes or {}), s.events, s.status)
                for s in exporter.get_finished_spans()
            ]
        )
        for secret in (CLIENT_KEY, UPSTREAM_KEY, PROMPT, "authorization"):
            assert secret not in everything


def test_trace_content_puts_the_prompt_and_output_on_the_generation(
    upstream: ChatUpstream, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    with traced_relay(upstream, exporter, tmp_path, trace_content=True) as client:
        ask(client, instructions="Be terse.")
        request = request_span(exporter)
        attributes = dict(generation(exporter, request).attributes or {})
        assert orjson.loads(str(attributes["gen_ai.input.messages"])) == [
            {"role": "user", "parts": [{"type": "text", "content": PROMPT}]}
        ]
        [output] = orjson.loads(str(attributes["gen_ai.output.messages"]))
        assert output["role"] == "assistant" and output["finish_reason"] == "stop"
        assert PROMPT in output["parts"][0]["content"]
        assert orjson.loads(str(attributes["gen_ai.system_instructions"])) == [
            {"type": "text", "content": "Be terse."}
        ]


@pytest.mark.parametrize(("model", "status"), [("traced", "completed"), ("breaks", "failed")])
def test_a_stream_s_try_lasts_as_long_as_the_stream(
    upstream: ChatUpstream,
    exporter: InMemorySpanExporter,
    tmp_path: Path,
    model: str,
    status: str,
) -> None:
    with traced_relay(upstream, exporter, tmp_path) as client:
        body = {"model": model, "input": PROMPT, "stream": True, "provider": FAILOVER}
        with client.stream("POST", "/v1/responses", json=body) as answer:
            events = [line for line in answer.iter_lines() if line.startswith("data: {")]
        last = orjson.loads(events[-1].removeprefix("data: "))
        assert last["response"]["status"] == status
        request = request_span(exporter)
        spans = {span.name: span for span in children(exporter, request)}
        generation = spans.get("chat echo") or spans["chat error_chunk"]
        # Recorded beside the upstream's opening (it may start before the try), done before
        # the first event; stored once the stream ended, before the last: the try's span
        # covers the stream in between.
        recorded, stored = spans["relay.store.begin_run"], spans["relay.store.save_response"]
        assert generation.start_time is not None and generation.end_time is not None
        assert recorded.start_time is not None and stored.start_time is not None
        assert recorded.end_time is not None
        assert recorded.start_time < recorded.end_time < generation.end_time
        assert generation.end_time <= stored.start_time
        attributes = dict(generation.attributes or {})
        assert attributes["relay.response.status"] == status
        assert attributes["gen_ai.response.id"] == last["response"]["id"]
        if status == "failed":
            assert generation.status.status_code is StatusCode.ERROR
            assert attributes["error.type"] == "server_error"
            assert attributes["gen_ai.response.finish_reasons"] == ("error",)
        else:
            assert generation.status.status_code is StatusCode.UNSET
            assert attributes["gen_ai.usage.output_tokens"] > 0  # type: ignore[operator]


def test_a_chain_is_loaded_and_the_response_stored_under_the_request(
    upstream: ChatUpstream, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    # Nothing kept in memory: the chain is read from storage.
    with traced_relay(upstream, exporter, tmp_path, history_cache_items=0) as client:
        first = ask(client)
        exporter.clear()
        second = ask(client, previous_response_id=first["id"])
        request = request_span(exporter)
        names = [
            (s.name, s.attributes["relay.response_id"])
            for s in children(exporter, request)
            if s.name.startswith("relay.store")
        ]  # type: ignore[index]
        assert names == [
            ("relay.store.load_context", first["id"]),
            ("relay.store.save_response", second["id"]),
        ]


def test_a_background_run_waits_and_runs_under_its_request(
    upstream: ChatUpstream, exporter: InMemorySpanExporter, tmp_path: Path, store_url: str
) -> None:
    # On PostgreSQL the run goes through the job queue (taken by a worker task of this process,
    # which inherits nothing from the request): the job carries the request's trace.
    with traced_relay(upstream, exporter, tmp_path, database_url=store_url) as client:
        queued = ask(client, background=True, provider=FAILOVER)
        run = request_span(exporter, "relay.background.run")
        request = request_span(exporter)
        under_request = {span.name: span for span in children(exporter, request)}
        assert {"relay.store.begin_run", "relay.background.queued", "relay.background.run"} <= set(
            under_request
        )
        assert hex_ids(run)[0] == hex_ids(request)[0]
        waited = under_request["relay.background.queued"]
        assert waited.start_time is not None and request.start_time is not None
        assert request.start_time < waited.start_time < waited.end_time == run.start_time
        assert run.attributes["relay.response_id"] == queued["id"]  # type: ignore[index]
        assert run.attributes["gen_ai.response.id"] == queued["id"]  # type: ignore[index]
        assert run.attributes["relay.response.status"] == "completed"  # type: ignore[index]
        under_run = [span.name for span in children(exporter, run)]
        assert under_run == [
            "chat http_500",
            "chat http_500",
            "chat echo",
            "relay.store.save_response",
        ]


def test_a_websocket_turn_is_traced_like_a_request(
    upstream: ChatUpstream, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    with traced_relay(upstream, exporter, tmp_path) as client:
        url = str(client.base_url).replace("http://", "ws://") + "/v1/responses"
        with connect(
            url, additional_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        ) as socket:
            socket.send(
                orjson.dumps({"type": "response.create", "model": "traced", "input": "hi"}).decode()
            )
            while orjson.loads(socket.recv())["type"] != "response.completed":
                pass
        turn = request_span(exporter, "response.create /v1/responses")
        assert turn.kind is SpanKind.SERVER and hex_ids(turn)[0] == CLIENT_TRACE
        assert hex_ids(generation(exporter, turn))[0] == CLIENT_TRACE


def test_tracing_off_loads_no_opentelemetry(tmp_path: Path) -> None:
    script = f"""
import sys, httpx
from live_server import relay_server
from relay.config import RouteConfig, Settings
route = RouteConfig(model="fake-text", provider="fake", upstream_model="text")
with relay_server(Settings(database_url="sqlite:///{tmp_path}/relay.db", routes=[route])) as url:
    answer = httpx.post(url + "/v1/responses", json={{"model": "fake-text", "input": "hi"}})
    answer.raise_for_status()
print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
"""
    env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("setting", "env", "on"),
    [
        (False, {}, False),
        (True, {}, True),
        (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        (False, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        (False, {"OTEL_TRACES_EXPORTER": "otlp"}, True),
        (True, {"OTEL_SDK_DISABLED": "true"}, False),
        (
            False,
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"},
            False,
        ),
        (True, {"OTEL_TRACES_EXPORTER": "none"}, False),
        (False, {"OTEL_SERVICE_NAME": "gateway"}, False),
    ],
)
def test_when_tracing_is_on(
    monkeypatch: pytest.MonkeyPatch, setting: bool, env: dict[str, str], on: bool
) -> None:
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert tracing.wanted(Settings(tracing=setting)) is on


# relay serve, over OTLP/HTTP ----------------------------------------------------------------------


def test_relay_serve_exports_the_span_tree_over_otlp(tmp_path: Path) -> None:
    with ChatUpstream(api_key=UPSTREAM_KEY) as upstream, OtlpReceiver() as receiver:
        env = {
            "RELAY_DATABASE_URL": f"sqlite:///{tmp_path}/relay.db",
            "RELAY_ROUTES": orjson.dumps(routes(upstream)).decode(),
            KEY_ENV: UPSTREAM_KEY,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",  # ms: spans reach the receiver at once
        }
        with relay_serve(env) as relay:
            seed = SEED_OBJECT
            answer = httpx.post(
                f"{relay.url}/v1/responses",
                json={"model": "traced", "input": PROMPT, "provider": FAILOVER, "trace": seed},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            body = answer.json()
            request = eventually(
                lambda: next((s for s in receiver.spans if s.name == "grade essay"), None),
                "request span at the receiver",
            )
            # A trace id alone: a root span in that trace.
            alone = "5" * 32
            httpx.post(
                f"{relay.url}/v1/responses",
                json={"model": "fake-text", "input": "hi", "trace": {"trace_id": alone}},
                timeout=30,
            ).raise_for_status()
            rooted = eventually(
                lambda: next(
                    (
                        s
                        for s in receiver.spans
                        if s.trace_id.hex() == alone and s.name == "POST /v1/responses"
                    ),
                    None,
                ),
                "request span in the named trace",
            )
        assert rooted.parent_span_id == b""

    assert request.trace_id.hex() == SEED_TRACE and request.parent_span_id.hex() == SEED_PARENT
    assert request.kind == request.SPAN_KIND_SERVER
    attributes = attributes_of(request.attributes)
    assert attributes["http.route"] == "/v1/responses"
    assert attributes["relay.trace.name"] == "nightly eval"
    assert attributes["relay.trace.metadata.customer_tier"] == "gold"
    assert attributes["gen_ai.response.id"] == body["id"]
    assert attributes["gen_ai.usage.output_tokens"] == body["usage"]["output_tokens"]
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert receiver.resources[0]["service.name"] == "relay"

    tries = sorted(
        (
            s
            for s in receiver.spans
            if s.parent_span_id == request.span_id and s.name.startswith("chat ")
        ),
        key=lambda span: span.start_time_unix_nano,
    )
    described = [
        (
            span.name,
            attributes_of(span.attributes)["relay.deployment"],
            attributes_of(span.attributes)["relay.attempt"],
            span.status.code,
        )
        for span in tries
    ]
    error, unset = tries[0].status.STATUS_CODE_ERROR, tries[0].status.STATUS_CODE_UNSET
    assert described == [
        ("chat http_500", "flaky", 1, error),
        ("chat http_500", "flaky", 2, error),
        ("chat echo", "steady", 1, unset),
    ]
    generation = attributes_of(tries[2].attributes)
    assert generation["gen_ai.provider.name"] == "openai"
    assert generation["gen_ai.response.id"] == body["id"]
    assert generation["gen_ai.usage.input_tokens"] == body["usage"]["input_tokens"]
    assert generation["relay.trace.generation_name"] == "grader"
    # What the upstream that answered received: the trace, and its try's span as the parent.
    assert upstream.headers[2]["traceparent"] == f"00-{SEED_TRACE}-{tries[2].span_id.hex()}-01"
    assert all(PROMPT not in repr(span) for span in receiver.spans)
