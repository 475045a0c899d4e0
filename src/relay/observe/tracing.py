"""OpenTelemetry traces: a span per request (and per background run, and per WebSocket turn),
with a child span for each upstream try, for storage, and for a background run's wait.

Off by default, and then free: OpenTelemetry is not even imported, `TracingMiddleware` is not
installed, and every hook below returns at once when `TRACER` is None. On (`wanted`), each
process (each uvicorn worker, `relay worker`) makes its tracer provider as it starts (`start`,
from the standard OTEL_* variables) and flushes it as it stops.

The request's span starts late. Its parent may be in the body (seed 000's `trace` object:
`trace_id` and `parent_span_id`), which only the engine reads: the middleware notes when the
request came and the W3C `traceparent` it carried, and the span starts, dated from then, when
the engine first reads the request (`asked`), under the body's trace when it names a valid
one (the header's context becomes a link), else under the header's. A request that never
reaches the engine (a GET, a 401) starts its span as it ends. Spans are parented explicitly,
through `_TRACED` (asyncio tasks started by a request inherit it), rather than through
OpenTelemetry's current context: only an upstream try is made current, for the `traceparent`
its HTTP request carries (`outgoing`).

An upstream try that answers is the generation: its span stays open for as long as its stream
and ends when the response settles, with the usage, finish reason and response id (which the
request's span gets too). A try that fails ends at once, with `error.type`, so retries and
failovers are one span each. A background run gets a span for its wait and one for its run,
children of the request that queued it, whose trace context it carries (`carried`: with the
run's task here, in the job's arguments through the PostgreSQL job queue).

Never a credential: no header but `traceparent`/`tracestate` is read, an upstream is named by
its host alone. Prompt and output text only with `trace_content = true`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from relay import __version__
from relay.console import without_password
from relay.errors import StartupError
from relay.log_lines import REQUEST_ID
from relay.observe import PROVIDER_NAMES

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Link, Span, SpanKind, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from starlette.types import ASGIApp, Receive, Scope, Send

    from relay.config import Settings
    from relay.protocol import CreateResponse
    from relay.providers.registry import Deployment

log = logging.getLogger("relay")
TRACER: Tracer | None = None  # None: tracing is off in this process
_CONTENT = False  # trace_content: prompt and output text on the generation's span
_NOTHING: AbstractContextManager[None] = nullcontext()

# Seed 000's `trace` object: its own keys; any other is the client's metadata, kept on the
# span within these bounds.
_SEED_KEYS = frozenset({"trace_id", "parent_span_id", "trace_name", "span_name", "generation_name"})
MAX_TRACE_METADATA = 16
MAX_TRACE_KEY = 64
MAX_TRACE_VALUE = 512
_INT64 = 2**63
_TRACE_ID = re.compile(r"[0-9a-fA-F]{32}")
_SPAN_ID = re.compile(r"[0-9a-fA-F]{16}")
_QUEUED_AT = "relay-queued-at"  # beside traceparent in a background job's carrier


def wanted(settings: Settings) -> bool:
    """Whether this process traces: `tracing = true`, or an OTLP endpoint or a traces exporter
    named in the standard variables; never with OTEL_SDK_DISABLED=true or
    OTEL_TRACES_EXPORTER=none."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return settings.tracing or bool(exporters) or bool(endpoint)


def start(settings: Settings) -> Callable[[], Awaitable[None]] | None:
    """Tracing on in this process, when `wanted`: what stops it (flushing the spans not yet
    exported), or None. A tracer provider the process has already (`opentelemetry-instrument`'s,
    a test's) is used as it is; else Relay makes one from the OTEL_* variables."""
    global TRACER, _CONTENT
    if not wanted(settings):
        return None
    # Imported here: a process that does not trace never loads OpenTelemetry.
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    found = trace.get_tracer_provider()
    owned = None if isinstance(found, TracerProvider) else _provider()
    if owned is None:
        log.info("tracing: spans go to the tracer provider this process has")
    TRACER = (owned or found).get_tracer("relay", __version__)
    _CONTENT = settings.trace_content

    async def stop() -> None:
        global TRACER
        TRACER = None
        if owned is not None:
            await asyncio.to_thread(owned.shutdown)  # its last export waits for the collector

    return stop


def _provider() -> TracerProvider:
    """A provider as the OTEL_* variables describe it (the SDK reads the sampler, the batch
    processor's and the exporter's settings, span limits, resource attributes), exporting over
    OTLP/HTTP; service.name "relay" unless they name it."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class SeedTraceIds(RandomIdGenerator):
        """A root span's trace id is the one seed 000's `trace` names, when it names one
        without a parent span."""

        def generate_trace_id(self) -> int:
            return _SEED_TRACE_ID.get() or super().generate_trace_id()

        def is_trace_id_random(self) -> bool:
            return _SEED_TRACE_ID.get() is None

    resource = Resource.create()
    defaults: dict[str, str] = {}
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        defaults["service.name"] = "relay"
    if "service.version" not in resource.attributes:
        defaults["service.version"] = __version__
    provider = TracerProvider(
        resource=resource.merge(Resource(defaults)), id_generator=SeedTraceIds()
    )
    for exporter in _exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _exporters() -> list[Any]:
    """OTEL_TRACES_EXPORTER's exporters (otlp by default, console for a look at spans); a
    value Relay cannot honour stops the start-up, rather than the spans going nowhere."""
    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    exporters: list[Any] = []
    for name in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(","):
        name = name.strip()
        if name == "otlp":
            if protocol.strip() != "http/protobuf":
                raise StartupError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: Relay exports traces over "
                    "OTLP/HTTP only; set it to http/protobuf (a collector listens on 4318)"
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
            log.info("tracing: spans exported over OTLP/HTTP to %s", without_password(_endpoint()))
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
            log.info("tracing: spans written to stdout")
        elif name:
            raise StartupError(
                f"OTEL_TRACES_EXPORTER={name}: Relay exports traces with otlp or console"
            )
    return exporters


def _endpoint() -> str:
    """Where the OTLP exporter sends spans, as it reads the variables."""
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if endpoint:
        return endpoint
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318")
    return base.rstrip("/") + "/v1/traces"


# What is being traced --------------------------------------------------------------------------


_SEED_TRACE_ID: ContextVar[int | None] = ContextVar("relay_seed_trace_id", default=None)


class Traced:
    """A request, background run or WebSocket turn being traced: its span, started on first
    use (until then its attributes wait here, and its parent may still change: see the
    module's docstring). Child spans are its span's."""

    __slots__ = (
        "attributes",
        "generation",
        "kind",
        "links",
        "name",
        "parent",
        "scope",
        "seed_trace_id",
        "span",
        "started_ns",
        "tracer",
    )

    def __init__(
        self,
        tracer: Tracer,
        name: str | None,
        kind: SpanKind,
        parent: Context | None,
        attributes: dict[str, Any],
        scope: Scope | None = None,
    ) -> None:
        self.tracer = tracer
        self.name = name  # None: the route's ("POST /v1/responses"), known once it matched
        self.kind = kind
        self.parent = parent
        self.attributes = attributes
        self.scope = scope  # an HTTP request's ASGI scope
        self.links: list[Link] = []
        self.seed_trace_id: int | None = None
        self.started_ns = time.time_ns()
        self.span: Span | None = None
        self.generation: str | None = None  # seed 000's generation_name, for upstream tries

    def started(self) -> Span:
        if self.span is None:
            seeded = _SEED_TRACE_ID.set(self.seed_trace_id)
            try:
                self.span = self.tracer.start_span(
                    self.name or _route_name(self.scope),
                    self.parent,
                    self.kind,
                    self.attributes,
                    self.links,
                    self.started_ns,
                )
            finally:
                _SEED_TRACE_ID.reset(seeded)
        return self.span

    def context(self) -> Context:
        from opentelemetry.trace import set_span_in_context

        return set_span_in_context(self.started())

    def set(self, attributes: dict[str, Any]) -> None:
        if self.span is None:
            self.attributes.update(attributes)
        elif self.span.is_recording():  # not yet ended
            self.span.set_attributes(attributes)

    def follow(self, trace: dict[str, Any]) -> None:
        """Seed 000's `trace` object: its trace (and parent span) become this span's when it
        has not started yet and they are valid; its names and the client's other keys
        become attributes."""
        trace_id = _hex_id(trace.get("trace_id"), _TRACE_ID)
        span_id = _hex_id(trace.get("parent_span_id"), _SPAN_ID)
        if self.span is None and trace_id is not None:
            from opentelemetry.trace import (
                Link,
                NonRecordingSpan,
                SpanContext,
                TraceFlags,
                get_current_span,
                set_span_in_context,
            )

            if self.parent is not None:  # the header's: still related, as a link
                self.links.append(Link(get_current_span(self.parent).get_span_context()))
            if span_id is None:  # a root span in that trace (when Relay made the provider)
                self.parent, self.seed_trace_id = None, trace_id
            else:
                # Sampled: the client asked for this request in its trace.
                named = SpanContext(trace_id, span_id, True, TraceFlags(TraceFlags.SAMPLED))
                self.parent = set_span_in_context(NonRecordingSpan(named))
        span_name = _text(trace.get("span_name"))
        if self.span is None and span_name:
            self.name = span_name
        self.generation = _text(trace.get("generation_name")) or self.generation
        attributes: dict[str, Any] = {"relay.trace.name": _text(trace.get("trace_name"))}
        kept = 0
        for key, value in trace.items():
            kept_value = _attribute_value(value)
            if key in _SEED_KEYS or kept_value is None or kept == MAX_TRACE_METADATA:
                continue
            attributes[f"relay.trace.metadata.{key[:MAX_TRACE_KEY]}"] = kept_value
            kept += 1
        self.set(_present(attributes))

    def end(self, error: BaseException | None = None) -> None:
        span = self.started()
        if error is not None:
            _failed(span, error)
        span.end()


_TRACED: ContextVar[Traced | None] = ContextVar("relay_traced", default=None)


def _route_name(scope: Scope | None) -> str:
    """An HTTP server span's name: the method and the route's template (never the path, whose
    ids would make every name unique), or the method alone before a route matched."""
    if scope is None:
        return "relay"
    route = getattr(scope.get("route"), "path", None)
    return f"{scope['method']} {route}" if route else scope["method"]


def _hex_id(value: Any, shape: re.Pattern[str]) -> int | None:
    """A W3C trace or span id, as an int; None unless it is hex of the right length and not
    all zeros (which means none)."""
    if not isinstance(value, str) or not shape.fullmatch(value):
        return None
    return int(value, 16) or None


def _text(value: Any) -> str | None:
    return value[:MAX_TRACE_VALUE] if isinstance(value, str) and value else None


def _attribute_value(value: Any) -> str | bool | int | float | None:
    """A client's value as an attribute: strings (cut), booleans, numbers (an integer within
    64 bits: OTLP carries no more); None for anything else."""
    if isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else None
    return _text(value)


def _present(attributes: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attributes.items() if value is not None}


def _failed(span: Span, error: BaseException) -> None:
    """A span ended by `error`: marked failed, unless it was cancelled (a client that left, a
    process that stops), which is no failure of the work."""
    if isinstance(error, asyncio.CancelledError):
        span.set_attribute("relay.cancelled", True)
        return
    from opentelemetry.trace import Status, StatusCode

    # A ProviderError's code ("rate_limit_exceeded", "upstream_unreachable"); its message,
    # which may quote the upstream (and the upstream the prompt), stays in the log.
    code = getattr(error, "code", None)
    kind = code if isinstance(code, str) else type(error).__name__
    span.set_attribute("error.type", kind)
    span.set_status(Status(StatusCode.ERROR, kind))


# Requests ----------------------------------------------------------------------------------------


class TracingMiddleware:
    """An HTTP request's span (see the module's docstring), with the HTTP semantic
    conventions' attributes and the request id. Installed inside RequestIdMiddleware, and only
    when tracing is on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer = TRACER
        if scope["type"] != "http" or tracer is None:
            await self.app(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind

        attributes = {
            "http.request.method": scope["method"],
            "url.path": scope["path"],
            "url.scheme": scope["scheme"],
            "relay.request_id": REQUEST_ID.get(),
        }
        traced = Traced(
            tracer, None, SpanKind.SERVER, _header_context(scope["headers"]), attributes, scope
        )
        status = 0

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        error: BaseException | None = None
        current = _TRACED.set(traced)
        try:
            await self.app(scope, receive, send_status)
        except BaseException as raised:
            error = raised
            raise
        finally:
            _TRACED.reset(current)
            _ended(traced, status, error)


def _ended(traced: Traced, status: int, error: BaseException | None) -> None:
    span = traced.started()
    route = getattr(traced.scope and traced.scope.get("route"), "path", None)
    if route is not None:
        span.set_attribute("http.route", route)
        if traced.name is None:  # the route matched after the span started
            span.update_name(_route_name(traced.scope))
    if status:
        span.set_attribute("http.response.status_code", status)
    if error is None and status >= 500:
        from opentelemetry.trace import Status, StatusCode

        # A server span fails on a 5xx only: a 4xx is the client's.
        span.set_attribute("error.type", str(status))
        span.set_status(Status(StatusCode.ERROR))
    traced.end(error)


def _header_context(headers: list[tuple[bytes, bytes]]) -> Context | None:
    """The W3C trace context of a request's `traceparent` and `tracestate` headers (baggage is
    not read: Relay would forward it to third-party upstreams)."""
    carrier = {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in headers
        if name in (b"traceparent", b"tracestate")
    }
    return _extracted(carrier)


def _extracted(carrier: dict[str, str]) -> Context | None:
    """The trace context in `carrier`; None when it holds no valid one."""
    if "traceparent" not in carrier:
        return None
    from opentelemetry.trace import get_current_span

    context = _propagator().extract(carrier)
    return context if get_current_span(context).get_span_context().is_valid else None


@functools.cache
def _propagator() -> TraceContextTextMapPropagator:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def asked(request: CreateResponse, session_id: str | None = None) -> None:
    """The request as the engine reads it, on what is traced: its model, session, end user and
    seed 000's `trace` object (before any child span, so that its trace can still be the
    parent)."""
    traced = _TRACED.get() if TRACER is not None else None
    if traced is None:
        return
    if request.trace:
        traced.follow(request.trace)
    traced.set(
        _present(
            {
                "gen_ai.request.model": request.model,
                "session.id": request.session_id or session_id,
                # The end user, as the client identifies them (OpenAI's two fields for it).
                "user.id": request.user or request.safety_identifier,
            }
        )
    )


def caller(project: str | None, key_id: str | None) -> None:
    """Who the request acts for (never the key itself: its id)."""
    traced = _TRACED.get() if TRACER is not None else None
    if traced is not None:
        traced.set(_present({"relay.project": project, "relay.key_id": key_id}))


# Upstream tries ----------------------------------------------------------------------------------


def attempt(deployment: Deployment, number: int) -> AbstractContextManager[Span | None]:
    """One try on `deployment` (`number`: 1 for the first): its span is current inside (the
    upstream request carries its traceparent) and ends there if the try fails; a try that
    answers hands its open span to the run (`settled` ends it)."""
    if TRACER is None:
        return _NOTHING
    return _attempt(TRACER, deployment, number)


@contextmanager
def _attempt(tracer: Tracer, deployment: Deployment, number: int) -> Iterator[Span]:
    from opentelemetry import context
    from opentelemetry.trace import SpanKind, set_span_in_context

    traced = _TRACED.get()
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": PROVIDER_NAMES.get(deployment.kind, deployment.kind),
        "gen_ai.request.model": deployment.upstream_model,
        "relay.deployment": deployment.name,
        "relay.model": deployment.route,
        "relay.attempt": number,
    }
    base_url = getattr(deployment.config, "base_url", None)
    if base_url:
        # The host alone: a base URL may hold credentials (user:password@, a key in the query).
        url = urlsplit(base_url)
        attributes["server.address"] = url.hostname or ""
        attributes["server.port"] = url.port or (443 if url.scheme == "https" else 80)
    if traced is not None and traced.generation:
        attributes["relay.trace.generation_name"] = traced.generation
    span = tracer.start_span(
        f"chat {deployment.upstream_model}",
        None if traced is None else traced.context(),
        SpanKind.CLIENT,
        attributes,
    )
    current = context.attach(set_span_in_context(span))
    try:
        yield span
    except BaseException as error:
        _failed(span, error)
        span.end()
        raise
    finally:
        context.detach(current)


def outgoing() -> dict[str, str] | None:
    """The `traceparent` (and `tracestate`) headers of an upstream request: the current try's
    span, else what is traced (a token count's request); None when tracing is off."""
    if TRACER is None:
        return None
    from opentelemetry.trace import get_current_span

    parent = None
    if not get_current_span().get_span_context().is_valid:
        traced = _TRACED.get()
        if traced is None:
            return None
        parent = traced.context()
    carrier: dict[str, str] = {}
    _propagator().inject(carrier, parent)
    return carrier


def settled(
    attempt: Span | None,
    response: dict[str, Any],
    finish: str,
    input_items: list[dict[str, Any]],
    upstream_model: str | None,
) -> None:
    """A response settled: its outcome on what is traced, and on the try that generated it
    (`attempt`, its stream's span, which ends here). `finish`: the upstream's finish reason."""
    if TRACER is None:
        return
    usage = response.get("usage") or {}
    status = response["status"]
    finished = {"failed": "error", "cancelled": "cancelled"}.get(status, finish)
    outcome = _present(
        {
            "gen_ai.response.id": response["id"],
            "gen_ai.usage.input_tokens": usage.get("input_tokens"),
            "gen_ai.usage.output_tokens": usage.get("output_tokens"),
            "gen_ai.response.finish_reasons": (finished,),
            "relay.response.status": status,
            "session.id": response.get("session_id"),
        }
    )
    traced = _TRACED.get()
    if traced is not None:
        traced.set({**outcome, "gen_ai.response.model": response["model"]})
    if attempt is None or not attempt.is_recording():
        return
    attempt.set_attributes(outcome)
    if upstream_model is not None:
        attempt.set_attribute("gen_ai.response.model", upstream_model)
    if _CONTENT:
        attempt.set_attributes(_content(response, finished, input_items))
    if status == "failed":
        from opentelemetry.trace import Status, StatusCode

        code = str((response.get("error") or {}).get("code") or "server_error")
        attempt.set_attribute("error.type", code)
        attempt.set_status(Status(StatusCode.ERROR, code))
    attempt.end()


def ended(attempt: Span | None) -> None:
    """A try's span whose response will never settle (a run discarded unread)."""
    if attempt is not None and attempt.is_recording():
        attempt.end()


def _content(
    response: dict[str, Any], finish: str, input_items: list[dict[str, Any]]
) -> dict[str, str]:
    """The prompt and the output, in the GenAI conventions' message shapes (JSON)."""
    output = [{**message, "finish_reason": finish} for message in _messages(response["output"])]
    content = {
        "gen_ai.input.messages": orjson.dumps(_messages(input_items)).decode(),
        "gen_ai.output.messages": orjson.dumps(output).decode(),
    }
    instructions = response.get("instructions")
    if isinstance(instructions, str):
        system = [{"type": "text", "content": instructions}]
        content["gen_ai.system_instructions"] = orjson.dumps(system).decode()
    return content


def _messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    messages = []
    for item in items:
        kind = item.get("type")
        if kind == "message":
            content = item.get("content")
            parts = (
                [{"type": "text", "content": content}]
                if isinstance(content, str)
                else [_part(part) for part in content or ()]
            )
            messages.append({"role": item.get("role"), "parts": parts})
        elif kind in ("function_call", "custom_tool_call"):
            call = {
                "type": "tool_call",
                "id": item.get("call_id"),
                "name": item.get("name"),
                "arguments": item.get("arguments", item.get("input")),
            }
            messages.append({"role": "assistant", "parts": [call]})
        elif kind in ("function_call_output", "custom_tool_call_output"):
            result = {"type": "tool_call_response", "id": item.get("call_id")}
            messages.append({"role": "tool", "parts": [{**result, "response": item.get("output")}]})
        elif kind == "reasoning":
            pieces = item.get("content") or item.get("summary") or ()
            thought = {"type": "reasoning", "content": "".join(p.get("text", "") for p in pieces)}
            messages.append({"role": "assistant", "parts": [thought]})
    return messages


def _part(part: dict[str, Any]) -> dict[str, Any]:
    text = part.get("text", part.get("refusal"))
    if isinstance(text, str):
        return {"type": "text", "content": text}
    return {"type": part.get("type")}  # an image, a file: its kind only


# Storage and background runs ---------------------------------------------------------------------


def storage(system: str, operation: str, response_id: str) -> AbstractContextManager[Any]:
    """A span around a storage operation on the response `response_id`."""
    if TRACER is None:
        return _NOTHING
    return _storage(TRACER, system, operation, response_id)


@contextmanager
def _storage(tracer: Tracer, system: str, operation: str, response_id: str) -> Iterator[None]:
    from opentelemetry.trace import SpanKind

    traced = _TRACED.get()
    attributes = {
        "db.system.name": system,
        "db.operation.name": operation,
        "relay.response_id": response_id,
    }
    span = tracer.start_span(
        f"relay.store.{operation}",
        None if traced is None else traced.context(),
        SpanKind.CLIENT,
        attributes,
    )
    try:
        yield
    except BaseException as error:
        _failed(span, error)
        raise
    finally:
        span.end()


def carried() -> dict[str, str] | None:
    """What a background job carries of the request that queued it, for the worker that takes
    it (another process, maybe): its trace context and when it was queued. None when off."""
    if TRACER is None:
        return None
    traced = _TRACED.get()
    carrier = {_QUEUED_AT: str(time.time_ns())}
    _propagator().inject(carrier, None if traced is None else traced.context())
    return carrier


def background(response_id: str, carrier: dict[str, str] | None) -> AbstractContextManager[Any]:
    """A background run, from when it leaves the queue: its wait (`carrier`'s queued time
    until now) and its run, as children of the request that queued it (a root span when
    that request was not traced). What the run does is traced under it."""
    if TRACER is None:
        return _NOTHING
    return _background(TRACER, response_id, carrier or {})


@contextmanager
def _background(tracer: Tracer, response_id: str, carrier: dict[str, str]) -> Iterator[None]:
    from opentelemetry.trace import SpanKind

    parent = _extracted(carrier)
    attributes = {"relay.response_id": response_id}
    traced = Traced(tracer, "relay.background.run", SpanKind.INTERNAL, parent, attributes)
    queued_at = carrier.get(_QUEUED_AT)
    if queued_at is not None and queued_at.isdigit():
        waited = tracer.start_span(
            "relay.background.queued", parent, attributes=attributes, start_time=int(queued_at)
        )
        waited.end(traced.started_ns)
    traced.started()
    with _current(traced):
        yield


def turn(scope: Scope) -> AbstractContextManager[Any]:
    """A WebSocket turn (a `response.create` message): what is traced for it, a server span
    under the trace context of the socket's opening request."""
    if TRACER is None:
        return _NOTHING
    return _turn(TRACER, scope)


@contextmanager
def _turn(tracer: Tracer, scope: Scope) -> Iterator[None]:
    from opentelemetry.trace import SpanKind

    route = getattr(scope.get("route"), "path", scope["path"])
    attributes = {"http.route": route, "url.path": scope["path"]}
    traced = Traced(
        tracer,
        f"response.create {route}",
        SpanKind.SERVER,
        _header_context(scope["headers"]),
        attributes,
    )
    with _current(traced):
        yield


@contextmanager
def _current(traced: Traced) -> Iterator[None]:
    """`traced` as the span what runs inside is under, ended (failed, by what was raised)
    on the way out."""
    current = _TRACED.set(traced)
    error: BaseException | None = None
    try:
        yield
    except BaseException as raised:
        error = raised
        raise
    finally:
        _TRACED.reset(current)
        traced.end(error)
