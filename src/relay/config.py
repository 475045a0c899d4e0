"""Configuration: a TOML file (`relay serve --config relay.toml`), overridden by RELAY_* env vars.

Secrets are never written in the file itself when avoidable: routes and API keys name the
environment variable that holds them (`api_key_env`, `key_env`).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from relay.models.deployments import PROVIDER_KINDS, DeploymentConfig, LlamaCppConfig
from relay.models.policy import NO_POLICY, Policy
from relay.models.tools import ToolSettings


class RouteConfig(BaseModel):
    """One public model name and its deployments (where it is served, chosen among per
    request; see relay.engine.routing). A route with one deployment may give that
    deployment's fields inline, beside `model`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    fallbacks: list[str] = Field(default_factory=list)
    deployments: list[DeploymentConfig] = Field(min_length=1)

    @model_validator(mode="wrap")
    @classmethod
    def _inline_deployment(
        cls, data: Any, handler: ModelWrapValidatorHandler[RouteConfig]
    ) -> RouteConfig:
        inline = isinstance(data, dict) and "deployments" not in data
        if inline:
            route = {key: data[key] for key in ROUTE_FIELDS if key in data}
            route["deployments"] = [
                {key: value for key, value in data.items() if key not in ROUTE_FIELDS}
            ]
            data = route
        try:
            return handler(data)
        except ValidationError as error:
            located = [_as_written(detail, inline) for detail in error.errors()]
            raise ValidationError.from_exception_data(error.title, located) from None

    @model_validator(mode="after")
    def _unique_deployments(self) -> RouteConfig:
        labels = [deployment.label for deployment in self.deployments]
        if len(set(labels)) != len(labels):
            raise ValueError(
                f"route '{self.model}': deployments need distinct names (got {labels})"
            )
        return self

    def api_keys(self) -> None:
        """Read every deployment's key now: a missing variable is an error at start-up."""
        for deployment in self.deployments:
            try:
                deployment.api_key()
            except ValueError as error:
                raise ValueError(f"route '{self.model}': {error}") from None


ROUTE_FIELDS = ("model", "fallbacks")


def _as_written(detail: ErrorDetails, inline: bool) -> InitErrorDetails:
    """A route's error located where the user wrote the field: without the provider kind
    pydantic adds after a deployment's index (the union's tag), and, for a route written
    inline, without the `deployments.0` it was moved into."""
    loc = list(detail["loc"])
    if loc[:1] == ["deployments"] and len(loc) > 2 and loc[2] in PROVIDER_KINDS:
        del loc[2]
    if detail["type"] == "unknown_provider":
        loc.append("provider")
    if inline and loc[:2] == ["deployments", 0]:
        del loc[:2]
    return {
        # The message as pydantic wrote it (a custom error keeps it word for word).
        "type": PydanticCustomError(detail["type"], detail["msg"]),
        "loc": tuple(loc),
        "input": detail["input"],
    }


class _SecretKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: SecretStr | None = None
    key_env: str | None = None

    def secret(self) -> str:
        if self.key is not None:
            return self.key.get_secret_value()
        if self.key_env and os.environ.get(self.key_env):
            return os.environ[self.key_env]
        raise ValueError(f"{self.describe()} has neither key nor a set key_env")

    def describe(self) -> str:
        raise NotImplementedError


class ApiKeyConfig(_SecretKey):
    """A client key from the config file and its project (`tenant`: the project's id, which
    owns what the key stores). Prefer `key_env` over an inline `key`. Keys made with the admin
    API or CLI live in the database instead."""

    tenant: str = Field(default="default", min_length=1, max_length=64)
    # More projects the key may pick with X-Project-ID, the models it may use (None: all),
    # and its own limits and budgets.
    projects: list[str] = Field(default_factory=list)
    models: list[str] | None = None
    policy: Policy = NO_POLICY

    def describe(self) -> str:
        return f"API key for tenant '{self.tenant}'"


class AdminKeyConfig(_SecretKey):
    """A key for the admin API and nothing else (X-Admin-Key)."""

    name: str = Field(default="admin", min_length=1, max_length=64)

    def describe(self) -> str:
        return f"admin key '{self.name}'"


# The one-liner that makes a sealing key, for messages that ask for one.
MAKE_SEALING_KEY = (
    "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"
)


def is_sealing_key(key: str | bytes) -> bool:
    """Whether `key` is a Fernet key, 32 bytes in url-safe base64, checked as Fernet checks it
    but without `cryptography` (about 8 MB a process), which only sealing itself needs."""
    try:
        return len(base64.urlsafe_b64decode(key)) == 32
    except ValueError:  # not base64 (binascii.Error), or not ASCII
        return False


DEFAULT_HISTORY_CACHE_ITEMS = 20_000
# 64 MiB a process: small next to what a process serving many conversations needs anyway, and
# ample for long chains (a 1,000-turn chat of short messages costs about 2 MB).
DEFAULT_HISTORY_CACHE_BYTES = 64 * 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RELAY_", env_nested_delimiter="__", extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    database_url: str = "sqlite:///./data/relay.db"
    api_keys: list[ApiKeyConfig] = Field(default_factory=list)
    admin_keys: list[AdminKeyConfig] = Field(default_factory=list)
    # Rate limits shared by every instance (redis://host:port/db); None: each process counts
    # its own.
    redis_url: SecretStr | None = None
    # The longest a Redis call may take (connecting included) before the request passes
    # unlimited: a Redis that accepts connections and never answers must not stall traffic.
    redis_timeout_s: float = Field(default=0.05, gt=0, le=10)
    # How long a process trusts what it read of a database key (revocation, expiry, limits
    # take effect within this time on every instance).
    key_cache_s: float = Field(default=5.0, ge=0)
    # Background responses: how many generate at once in a process, and how many may wait
    # (beyond: 503 with retry-after).
    background_max_running: int = Field(default=16, ge=1)
    background_max_queued: int = Field(default=1000, ge=0)
    # With PostgreSQL, background runs go through a job queue shared by every instance
    # ("auto"); "process" keeps each in the process that received it (as with SQLite).
    # `background_worker = false` makes an instance that only serves the API (`relay
    # worker` runs one that only takes jobs).
    background_queue: Literal["auto", "process"] = "auto"
    background_worker: bool = True
    # A run in flight (background, or a stored stream) holds a lease its process renews every
    # `run_poll_s` (which also picks up cancels asked for on another instance); a run whose
    # lease lapses (its process died) is ended as failed by any instance within about
    # `run_lease_s` more.
    run_lease_s: float = Field(default=30.0, ge=1)
    run_poll_s: float = Field(default=1.0, gt=0)
    # How long an Idempotency-Key's answer is kept for replays.
    idempotency_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    routes: list[RouteConfig] = Field(default_factory=list)
    # A deployment that fails this many times in a row (before its first byte, retries
    # included) is tried after every other for `cooldown_s`; then one request probes it.
    cooldown_failures: int = Field(default=3, ge=1)
    cooldown_s: float = Field(default=30.0, ge=0)
    # A comment line is sent on a stream after this many silent seconds, so proxies and
    # clients do not time the connection out while a model thinks.
    keepalive_s: float = Field(default=15.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # "json": one JSON object a line (time, level, logger, request_id, message, fields).
    log_format: Literal["text", "json"] = "text"
    # One line per request (relay.access, info level): status, caller, model, latency, tokens.
    access_log: bool = True
    # Prometheus metrics are served at /metrics (an admin key; without keys, loopback only),
    # and, when `metrics_port` is set, without authentication on metrics_host:metrics_port
    # (with --workers N, by the supervisor process, summing every worker).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Labels the token and cost counters may add: one series per project, or per key.
    metrics_labels: list[Literal["project", "key_id"]] = Field(default_factory=list)
    # OpenAI echoes a json_schema text format's schema; the Open Responses contract types it
    # as null. True follows OpenAI; False gives the contract's shape.
    echo_json_schema: bool = True
    # Larger request bodies are refused with a 413 (inline images and files count here).
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # Origins allowed to call Relay from a browser (CORS); ["*"] allows any.
    cors_origins: list[str] = Field(default_factory=list)
    # Recent conversations each process keeps in memory, so that a turn continuing one reads
    # and translates only its new items; bounded in items and in bytes (twice the size of
    # the items' JSON: the items and their upstream translation). 0 in either: always rebuild
    # from storage. One history over a quarter of the bytes is never kept.
    history_cache_items: int = Field(default=DEFAULT_HISTORY_CACHE_ITEMS, ge=0)
    history_cache_bytes: int = Field(default=DEFAULT_HISTORY_CACHE_BYTES, ge=0)
    # A WebSocket (WebSocket mode of /v1/responses) takes new turns for this long, as OpenAI's
    # 60 minutes; a client then opens a new one.
    websocket_max_age_s: float = Field(default=3600.0, gt=0)
    # Turns a WebSocket holds waiting behind the one running; more are refused with an error
    # event, so that a client sending faster than its turns run cannot fill the memory.
    websocket_max_queued_turns: int = Field(default=4, ge=1, le=1000)
    # Keys that seal what clients must give back unchanged (compaction items): Fernet keys,
    # the first seals, all open. None: one is generated into data_dir on first start.
    sealing_keys: list[SecretStr] = Field(default_factory=list)
    # Hosted tools (web_search, file_search, ...) Relay cannot run: "omit" leaves them out
    # (not offered, not echoed) and names them in the x-relay-omitted-tools header; "refuse"
    # answers a 400 naming the type. Nothing ever pretends a hosted tool ran. Omit is the
    # default because Codex CLI sends web_search on every request by default.
    hosted_tools: Literal["refuse", "omit"] = "omit"
    # Tools Relay runs for the model (relay.engine.tool_loop): the loop's bounds, which MCP
    # servers projects may reach, the web search backend.
    tools: ToolSettings = Field(default_factory=ToolSettings)
    # How a request whose body fails validation is answered: "openai", a 400 in OpenAI's error
    # envelope; "fastapi", a 422 whose `detail` lists every failure (loc, msg, type, input,
    # ctx), for clients written against platforms built on FastAPI that answer so.
    error_format: Literal["openai", "fastapi"] = "openai"
    data_dir: Path = Path("data")

    # Tracing (OpenTelemetry, relay.observe.tracing): a span per request, with its upstream
    # tries, storage and background runs, exported over OTLP/HTTP. Off by default, and then
    # free. On with `tracing = true`, or as the OpenTelemetry SDK would be: an
    # OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT or OTEL_TRACES_EXPORTER set, unless OTEL_SDK_DISABLED
    # is true. The standard OTEL_* variables configure the rest (endpoint, headers, sampler,
    # service name: "relay" unless named).
    tracing: bool = False
    # Prompt and output text on the generation's span (gen_ai.input.messages and
    # gen_ai.output.messages). Off: traces often go where prompts must not.
    trace_content: bool = False
    # The web console at /console (relay.ui); false removes its routes. A console session
    # lasts `console_session_s` from its sign-in.
    console: bool = True
    console_session_s: float = Field(default=8 * 3600.0, ge=60, le=30 * 24 * 3600.0)

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, url: str) -> str:
        # Read as text: the supervisor of `relay serve` does without SQLAlchemy. The URL is not
        # repeated (it may hold a password).
        backend, _, driver = url.partition("://")[0].lower().partition("+")
        if backend == "postgresql" and driver != "asyncpg":
            raise ValueError(
                "PostgreSQL is reached through asyncpg: write postgresql+asyncpg://user@host/db"
            )
        if backend not in ("sqlite", "postgresql"):
            raise ValueError("use sqlite:///path/to/relay.db or postgresql+asyncpg://user@host/db")
        return url

    @field_validator("redis_url")
    @classmethod
    def _supported_redis(cls, url: SecretStr | None) -> SecretStr | None:
        # The URL is not repeated (it may hold a password).
        scheme = "" if url is None else url.get_secret_value().partition("://")[0].lower()
        if url is not None and scheme not in ("redis", "rediss", "unix"):
            raise ValueError("use redis://host:6379/0 (or rediss://, unix://)")
        return url

    @field_validator("sealing_keys")
    @classmethod
    def _fernet_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if not all(is_sealing_key(key.get_secret_value()) for key in keys):
            raise ValueError(
                f"a sealing key must be 32 url-safe base64-encoded bytes ({MAKE_SEALING_KEY})"
            )
        return keys

    @model_validator(mode="after")
    def _leases_renewed_in_time(self) -> Settings:
        if self.run_poll_s * 3 > self.run_lease_s:
            raise ValueError(
                f"run_poll_s ({self.run_poll_s}) must be at most a third of run_lease_s "
                f"({self.run_lease_s}): a lease is renewed every run_poll_s"
            )
        return self

    @model_validator(mode="after")
    def _unique_routes(self) -> Settings:
        names = [route.model for route in self.routes]
        duplicates = {name for name in names if names.count(name) > 1}
        if duplicates:
            raise ValueError(f"model routes declared twice: {sorted(duplicates)}")
        known = set(names)
        for route in self.routes:
            missing = [name for name in route.fallbacks if name not in known]
            if missing:
                raise ValueError(f"route '{route.model}' falls back to unknown {missing}")
        return self


# With no routes configured, Relay serves the model that ships with it, offline.
DEFAULT_ROUTE = RouteConfig(model="smollm2-135m-instruct", deployments=[LlamaCppConfig()])


def load_settings(config: Path | None = None, **overrides: object) -> Settings:
    """Settings from `config` (TOML), then env vars, then explicit overrides (CLI flags)."""

    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config)

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
            if config is not None:
                sources += (TomlConfigSettingsSource(settings_cls),)
            return sources

    if config is not None and not config.is_file():
        raise ValueError(f"config file {config} does not exist")
    values = {key: value for key, value in overrides.items() if value is not None}
    settings = FileSettings(**values)  # type: ignore[arg-type]
    if not settings.routes:
        settings.routes = [DEFAULT_ROUTE]
    return settings
