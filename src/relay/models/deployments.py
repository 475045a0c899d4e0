"""What a deployment is configured with: the fields every provider kind shares (its name, its
weight, its price, its retries, its attributes for the request's `provider` preferences), and
one config model per provider kind, told apart by `provider` (a discriminated union, each
validated on its own). Adding a provider kind is a config model here, its module, and a line
in `relay.providers.registry.KINDS`.

Plain pydantic only: `relay serve`'s supervisor reads these without loading any provider.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from relay.models.endpoints import checked_url, key_from
from relay.models.policy import Price

DEFAULT_KIND = "openai_chat"


class DeploymentBase(BaseModel):
    """One place a public model is served: a provider, its key, its region."""

    model_config = ConfigDict(extra="forbid")  # a typo in a route is an error, not a default

    provider: str
    # What the request's provider.order/only/ignore name it by (the provider kind also
    # matches); default: the provider kind.
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:/-]{1,64}$")
    upstream_model: str | None = None
    # Share of the traffic among the deployments a request may use (weighted random).
    weight: float = Field(default=1.0, gt=0, le=1_000_000)
    timeout_s: float = Field(default=600.0, gt=0)
    # Retries on this deployment before the next one: connection failures, 429 and 5xx
    # before the first byte, after an exponential backoff with jitter (a retry-after from the
    # upstream is honoured up to `retry_max_wait_s`; beyond it, the next deployment is tried).
    retries: int = Field(default=1, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.25, ge=0, le=60)
    retry_max_wait_s: float = Field(default=5.0, ge=0, le=600)
    # What a response costs here (usage ledger, budgets, provider.sort "price",
    # provider.max_price); None: nothing.
    price: Price | None = None
    # Attributes the request's provider preferences filter on (data_collection, zdr,
    # quantizations), as the operator knows them for this upstream.
    data_collection: Literal["allow", "deny"] = "allow"
    zdr: bool = False
    quantization: str | None = None

    def api_key(self) -> str | None:
        return None

    @property
    def label(self) -> str:
        return self.name or self.provider


class _HTTPDeployment(DeploymentBase):
    base_url: str | None = None
    api_key_env: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    # Connections to the upstream at once, per process (a stream holds its own to its end);
    # beyond, a request waits for one up to 10 s, then the next deployment is tried.
    max_connections: int = Field(default=2048, ge=1, le=100_000)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        # Checked here, not when the first request fails: a scheme Relay's client cannot
        # speak is a configuration error.
        return None if url is None else checked_url(url)

    def api_key(self) -> str | None:
        return None if self.api_key_env is None else key_from(self.api_key_env)


class OpenAIChatConfig(_HTTPDeployment):
    """An OpenAI-compatible chat-completions upstream (vLLM, Ollama, llama.cpp, Groq, ...)."""

    provider: Literal["openai_chat"] = "openai_chat"
    base_url: str  # up to /v1, before /chat/completions
    # Older OpenAI-compatible servers only know max_tokens; OpenAI's reasoning models only
    # max_completion_tokens.
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # Request fields that only some upstreams understand (OpenRouter's `provider`, `plugins`)
    # are forwarded verbatim when listed here; a deployment that does not list a field the
    # request uses is not chosen for it (and a 400 names the field when none is left).
    forward_fields: list[Literal["provider", "plugins", "modalities", "image_config"]] = Field(
        default_factory=list
    )
    # Reasoning items given back (stored chains, or store:false transcripts with Relay-sealed
    # encrypted_content) are sent as `reasoning_content` on the assistant message they precede,
    # for upstreams that take it (vLLM, DeepSeek-style servers); off, they are left out.
    replay_reasoning: bool = False
    # How POST /responses/input_tokens counts: "vllm" or "llama_cpp" ask the upstream's own
    # tokenizer (their /tokenize beside /v1); "estimate" counts bytes.
    count_tokens: Literal["estimate", "vllm", "llama_cpp"] = "estimate"
    # The upstream draws images (OpenRouter's image models): requests whose `modalities` ask
    # for images, and `image_config`, may go to it and are forwarded (as if forward_fields
    # listed them), and the images it answers with become image_generation_call items.
    image_output: bool = False

    @model_validator(mode="after")
    def _image_fields(self) -> Self:
        if self.image_output:
            self.forward_fields += [
                name for name in ("modalities", "image_config") if name not in self.forward_fields
            ]
        return self


class OpenAIResponsesConfig(_HTTPDeployment):
    """An upstream that speaks the Responses API itself (OpenAI, Azure OpenAI, OpenRouter,
    vLLM). Relay keeps the state: each turn goes with its whole context and `store: false`."""

    provider: Literal["openai_responses"] = "openai_responses"
    base_url: str  # up to /v1, before /responses
    # Hosted tools (web_search, file_search, ...) the upstream runs itself: sent through, and
    # their items and events come back. Others follow the server's `hosted_tools` setting.
    hosted_tools: list[str] = Field(default_factory=list)


class AnthropicConfig(_HTTPDeployment):
    """Anthropic's Messages API (`/v1/messages`)."""

    provider: Literal["anthropic"] = "anthropic"
    base_url: str = "https://api.anthropic.com"
    anthropic_version: str = "2023-06-01"
    # Messages needs max_tokens; requests without max_output_tokens get this.
    default_max_output_tokens: int = Field(default=4096, ge=1)
    # reasoning.effort -> thinking budget_tokens (at least 1,024, and below max_tokens).
    thinking_budgets: dict[str, int] = Field(
        default_factory=lambda: {
            "minimal": 1024,
            "low": 2048,
            "medium": 8192,
            "high": 24576,
            "xhigh": 32768,
        }
    )
    # JSON output (text.format json_schema): "tool" forces a tool whose input is the schema
    # (every Claude model); "native" sends output_config.format (models with structured
    # outputs).
    json_output: Literal["tool", "native"] = "tool"
    # Prompt caching: "auto" marks the tools, the system prompt and the latest turn as cache
    # breakpoints on every request; "key" only on requests that send a prompt_cache_key
    # (Messages caches by prefix: the key itself has nothing to be sent as); "off" never.
    prompt_caching: Literal["auto", "key", "off"] = "auto"


class LlamaCppConfig(DeploymentBase):
    """The embedded model, in this process (llama-cpp-python)."""

    provider: Literal["llama_cpp"] = "llama_cpp"
    # A GGUF file (default: the bundled SmolLM2-135M-Instruct), its context window, threads,
    # how many requests may wait, and whether it loads at start-up or on first use.
    model_path: Path | None = None
    n_ctx: int = Field(default=4096, ge=256)
    n_threads: int | None = Field(default=None, ge=1)
    max_queue: int = Field(default=8, ge=1)
    load: Literal["startup", "first_use"] = "startup"
    # Bounds on one generation, so that no request holds the model's one worker for long: the
    # output limit of requests that set no max_output_tokens, and the time a generation may
    # run (from when the worker takes it up) before it ends incomplete.
    default_max_output_tokens: int = Field(default=1024, ge=16)
    max_generation_s: float = Field(default=60.0, gt=0)


class FakeConfig(DeploymentBase):
    """Scripted answers for tests and demos (`relay.providers.fake`)."""

    provider: Literal["fake"] = "fake"
    # As a chat deployment's: lets tests route requests that use such fields here.
    forward_fields: list[Literal["provider", "plugins", "modalities", "image_config"]] = Field(
        default_factory=list
    )


def _kind_of(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("provider", DEFAULT_KIND))
    return str(getattr(value, "provider", DEFAULT_KIND))


PROVIDER_KINDS = ("openai_chat", "openai_responses", "anthropic", "llama_cpp", "fake")

DeploymentConfig = Annotated[
    Annotated[OpenAIChatConfig, Tag("openai_chat")]
    | Annotated[OpenAIResponsesConfig, Tag("openai_responses")]
    | Annotated[AnthropicConfig, Tag("anthropic")]
    | Annotated[LlamaCppConfig, Tag("llama_cpp")]
    | Annotated[FakeConfig, Tag("fake")],
    Discriminator(
        _kind_of,
        # pydantic's own message names the function that read the tag (`_kind_of()`).
        custom_error_type="unknown_provider",
        custom_error_message=f"must be one of {', '.join(PROVIDER_KINDS)}",
    ),
]
