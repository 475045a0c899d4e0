"""Prometheus metrics, named after the OpenTelemetry GenAI semantic conventions where they
name the measure (`gen_ai.server.time_to_first_token` is `gen_ai_server_time_to_first_token_seconds`
here), `relay_*` for the rest.

Relay is a server to its clients and a client of its upstreams, so both sides of the
conventions apply: `gen_ai_server_request_duration_seconds` is a response end to end as the
client saw it, `gen_ai_client_operation_duration_seconds` the time Relay spent on the upstream.

Label sets are bounded by the configuration (models, deployments, endpoints, error codes);
projects and keys become labels only where the operator asks (`metrics_labels`). What a
deployment records is bound to its labels once (`DeploymentMeter`), so a response costs no
label lookups.

With `--workers N` each worker writes its values to files in PROMETHEUS_MULTIPROC_DIR
(prometheus_client's multiprocess mode, chosen when the library is imported) and a scrape of
any worker, or of the supervisor's `metrics_port`, sums them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from relay.errors import StartupError
from relay.observe import MULTIPROCESS_DIR, PROVIDER_NAMES
from relay.observe.tally import CounterTally, Tallies

if TYPE_CHECKING:
    from relay.engine.run import Engine
    from relay.models.policy import Price
    from relay.runs.runner import Runner
    from relay.storage.database import Database

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Labels an operator may add to the token and cost counters (one series per project or key).
OPTIONAL_LABELS = ("project", "key_id")

# The GenAI conventions' advised bucket boundaries, widened where a gateway's answers run long.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
)  # fmt: skip
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
PER_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
TOKEN_BUCKETS = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216,
)  # fmt: skip


class Metrics:
    """Every metric of one application. Each has its own registry, so that several
    applications in one process (tests) count apart."""

    def __init__(self, labels: Sequence[str] = ()) -> None:
        self.labels = tuple(name for name in OPTIONAL_LABELS if name in labels)
        self.registry = registry = CollectorRegistry()
        # What requests add, added up apart from the series (relay.observe.tally).
        self.tallies = Tallies()
        model = ("gen_ai_request_model", "deployment")

        def histogram(
            name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
        ) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self.http_requests = Counter(
            "relay_http_requests",
            "HTTP requests (WebSocket connections included, status 101), by how they ended.",
            ("method", "endpoint", "status", "error_code"),
            registry=registry,
        )
        self.http_duration = histogram(
            "relay_http_request_duration_seconds",
            "HTTP requests, from their arrival to their last byte.",
            ("endpoint",),
            DURATION_BUCKETS,
        )
        self.request_duration = histogram(
            "gen_ai_server_request_duration_seconds",
            "Responses, from their request's arrival to their end.",
            model,
            DURATION_BUCKETS,
        )
        self.time_to_first_token = histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Responses, from their request's arrival to the upstream's first output.",
            model,
            TTFT_BUCKETS,
        )
        self.time_per_output_token = histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Responses of two or more output tokens: the time each token after the first took.",
            model,
            PER_TOKEN_BUCKETS,
        )
        self.upstream_duration = histogram(
            "gen_ai_client_operation_duration_seconds",
            "The upstream's part of a response: from asking it to the end of its answer.",
            (*model, "gen_ai_provider_name"),
            DURATION_BUCKETS,
        )
        self.token_usage = histogram(
            "gen_ai_client_token_usage",
            "Tokens per response, by gen_ai_token_type (input, output).",
            (*model, "gen_ai_token_type"),
            TOKEN_BUCKETS,
        )
        self.responses = Counter(
            "relay_responses",
            "Responses settled, by status and error code (every outcome; background included).",
            ("model", "deployment", "status", "error_code"),
            registry=registry,
        )
        self.tokens = Counter(
            "relay_tokens",
            "Tokens by type: input (cached included), cached, output (reasoning included), "
            "reasoning.",
            ("model", "deployment", "type", *self.labels),
            registry=registry,
        )
        self.cost = Counter(
            "relay_cost_usd",
            "What responses cost at their deployment's price, in US dollars.",
            ("model", "deployment", *self.labels),
            registry=registry,
        )
        self.attempts = Counter(
            "relay_upstream_attempts",
            "Tries on a deployment before its first byte (retries and failovers), by outcome: "
            "ok, or the failure's code.",
            ("deployment", "outcome"),
            registry=registry,
        )
        self.refusals = Counter(
            "relay_refusals",
            "Requests refused by a rate limit or a budget, by the refusal's code.",
            ("reason",),
            registry=registry,
        )
        self.active_streams = Gauge(
            "relay_active_streams",
            "Server-sent event streams being written.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.active_websockets = Gauge(
            "relay_active_websockets",
            "WebSocket connections open.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.background_runs = Gauge(
            "relay_background_runs",
            "Background responses in this instance, by state (queued: waiting for a slot).",
            ("state",),
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.swept = Counter(
            "relay_background_runs_swept",
            "Runs ended as failed because their process stopped renewing them.",
            registry=registry,
        )
        self.cooling = Gauge(
            "relay_deployment_cooling",
            "1 while a deployment cools down after repeated failures (any worker).",
            ("deployment",),
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.history_lookups = Counter(
            "relay_history_cache_lookups",
            "Chains (previous_response_id) looked up in memory, by result (hit, miss).",
            ("result",),
            registry=registry,
        )
        self.tool_calls = Counter(
            "relay_tool_calls",
            "Server-side tool calls Relay ran (mcp_call, web_search_call), by outcome.",
            ("kind", "outcome"),
            registry=registry,
        )
        self.tool_duration = histogram(
            "relay_tool_call_duration_seconds",
            "Server-side tool calls, from their start to their end.",
            ("kind",),
            DURATION_BUCKETS,
        )
        self.database_connections = Gauge(
            "relay_database_connections",
            "The database pool's connections, by state (in_use, idle).",
            ("state",),
            registry=registry,
            multiprocess_mode="livesum",
        )

    def tool_called(self, kind: str, outcome: str, seconds: float) -> None:
        """A server-side tool call ended (rare next to responses: counted as it happens)."""
        self.tool_calls.labels(kind, outcome).inc()
        self.tool_duration.labels(kind).observe(seconds)

    def meter(self, model: str, deployment: str, kind: str) -> DeploymentMeter:
        return DeploymentMeter(self, model, deployment, kind)

    def unserved(self, response: dict[str, Any]) -> None:
        """A response settled without any deployment's answer (a background run that failed
        or was cancelled before it started, a WebSocket's warm-up): counted, deployment "".
        """
        error = response.get("error")
        code = str(error.get("code") or "") if error else ""
        self.responses.labels(response["model"], "", response["status"], code).inc()

    async def aclose(self) -> None:
        """What is tallied, flushed; this process's live gauges leave the sums
        (multiprocess mode)."""
        self.tallies.flush()
        if MULTIPROCESS_DIR in os.environ:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    def serve(self, host: str, port: int) -> Callable[[], Awaitable[None]]:
        """Serve the metrics on host:port from a thread of this process (one serving
        process; with several, the supervisor serves them: `serve_summed`); what stops it."""
        from prometheus_client import start_http_server

        try:
            server, thread = start_http_server(port, host, registry=self.registry)
        except OSError as error:  # `relay worker`'s port taken: one line, not a traceback
            raise StartupError(
                f"cannot serve metrics on {host}:{port} ({error.strerror or error})"
            ) from None

        async def stop() -> None:
            server.shutdown()
            thread.join()

        return stop

    def exposition(self) -> bytes:
        """The text format of every metric, summed over the workers in multiprocess mode
        (this process's tallies flushed first; the others' are at most a second old)."""
        self.tallies.flush()
        if MULTIPROCESS_DIR not in os.environ:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    async def sample(self, engine: Engine, runner: Runner, db: Database, every_s: float) -> None:
        """Read, now and then, what is a state rather than an event (or is counted where a
        metric would cost the hot path more): a task of the process's supervisor."""
        histories = engine.histories
        hits, misses = self.history_lookups.labels("hit"), self.history_lookups.labels("miss")
        counted = (0, 0)
        while True:
            for deployment in engine.registry.deployments():
                self.cooling.labels(deployment.name).set(1 if deployment.health.cooling() else 0)
            self.background_runs.labels("running").set(runner.running)
            self.background_runs.labels("queued").set(runner.waiting)
            connections = db.connections()
            if connections is not None:
                self.database_connections.labels("in_use").set(connections[0])
                self.database_connections.labels("idle").set(connections[1])
            hits.inc(histories.hits - counted[0])
            misses.inc(histories.misses - counted[1])
            counted = (histories.hits, histories.misses)
            self.tallies.flush()
            await asyncio.sleep(every_s)


class DeploymentMeter:
    """What one deployment records, its series' tallies bound once."""

    __slots__ = (
        "_by_outcome",
        "_by_status",
        "_metrics",
        "_tokens",
        "cost",
        "deployment",
        "input_usage",
        "model",
        "output_usage",
        "request_duration",
        "time_per_output_token",
        "time_to_first_token",
        "upstream_duration",
    )

    def __init__(self, metrics: Metrics, model: str, name: str, kind: str) -> None:
        self._metrics = metrics
        self.model = model
        self.deployment = name
        provider = PROVIDER_NAMES.get(kind, kind)
        histogram = metrics.tallies.histogram
        self.request_duration = histogram(metrics.request_duration.labels(model, name))
        self.time_to_first_token = histogram(metrics.time_to_first_token.labels(model, name))
        self.time_per_output_token = histogram(metrics.time_per_output_token.labels(model, name))
        self.upstream_duration = histogram(metrics.upstream_duration.labels(model, name, provider))
        self.input_usage = histogram(metrics.token_usage.labels(model, name, "input"))
        self.output_usage = histogram(metrics.token_usage.labels(model, name, "output"))
        self._tokens: dict[str, CounterTally] = {}
        self.cost: CounterTally | None = None
        if not metrics.labels:
            self._tokens = self._token_tallies(())
            self.cost = metrics.tallies.counter(metrics.cost.labels(model, name))
        self._by_status: dict[tuple[str, str], CounterTally] = {}
        self._by_outcome: dict[str, CounterTally] = {}

    def attempted(self, outcome: str) -> None:
        """One try before the first byte: "ok", or the failure's code."""
        tally = self._by_outcome.get(outcome)
        if tally is None:
            series = self._metrics.attempts.labels(self.deployment, outcome)
            tally = self._by_outcome[outcome] = self._metrics.tallies.counter(series)
        tally.inc()

    def responded(
        self,
        response: dict[str, Any],
        timings: Timings,
        price: Price | None,
        who: tuple[str, str | None],
        tools_nanos: int = 0,
    ) -> float | None:
        """A settled response this deployment answered (usage complete): its cost in US
        dollars (its tokens at the deployment's price, and its tool calls'), when it has
        one."""
        status = response["status"]
        error = response.get("error")
        code = str(error.get("code") or "") if error else ""
        tally = self._by_status.get((status, code))
        if tally is None:
            series = self._metrics.responses.labels(self.model, self.deployment, status, code)
            tally = self._by_status[(status, code)] = self._metrics.tallies.counter(series)
        tally.inc()
        usage = response.get("usage") or {}
        input_tokens = usage.get("input_tokens") or 0
        output_tokens = usage.get("output_tokens") or 0
        cached = (usage.get("input_tokens_details") or {}).get("cached_tokens") or 0
        reasoning = (usage.get("output_tokens_details") or {}).get("reasoning_tokens") or 0
        tokens = self._tokens or self._token_tallies(self._extra(who))
        tokens["input"].inc(input_tokens)
        tokens["output"].inc(output_tokens)
        tokens["cached"].inc(cached)
        tokens["reasoning"].inc(reasoning)
        self.input_usage.observe(input_tokens)
        self.output_usage.observe(output_tokens)
        self.request_duration.observe(timings.total_s)
        self.upstream_duration.observe(timings.upstream_s)
        if timings.first_token_s is not None:
            self.time_to_first_token.observe(timings.first_token_s)
            if output_tokens > 1:
                after_first = timings.total_s - timings.first_token_s
                self.time_per_output_token.observe(after_first / (output_tokens - 1))
        if price is None and not tools_nanos:
            return None
        tokens_nanos = 0 if price is None else price.cost_nanos(input_tokens, cached, output_tokens)
        cost = (tokens_nanos + tools_nanos) / 1e9
        metrics = self._metrics
        tally = self.cost or metrics.tallies.counter(
            metrics.cost.labels(self.model, self.deployment, *self._extra(who))
        )
        tally.inc(cost)
        return cost

    def _extra(self, who: tuple[str, str | None]) -> tuple[str, ...]:
        """The values of the operator's optional labels (`metrics_labels`)."""
        project, key_id = who
        chosen = {"project": project, "key_id": key_id or ""}
        return tuple(chosen[name] for name in self._metrics.labels)

    def _token_tallies(self, extra: tuple[str, ...]) -> dict[str, CounterTally]:
        metrics = self._metrics
        return {
            kind: metrics.tallies.counter(
                metrics.tokens.labels(self.model, self.deployment, kind, *extra)
            )
            for kind in ("input", "cached", "output", "reasoning")
        }


class Timings(NamedTuple):
    """A response's times, in seconds: from its request's arrival to its end and to its
    first token; and the upstream's part, from asking it to the end."""

    total_s: float
    upstream_s: float
    first_token_s: float | None


def serve_summed(host: str, port: int) -> None:
    """Serve on host:port, from a thread of this process, the sum of every worker's metrics
    (multiprocess mode: `relay serve --workers N`'s supervisor)."""
    from prometheus_client import multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    start_http_server(port, host, registry=registry)
