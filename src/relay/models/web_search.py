"""What Relay's web search runs on: one search API, told apart by `backend` (a discriminated
union, as the deployments' `provider`), each with its own fields. The hosted `web_search`
tools of any model are run through it (`relay.tools.web_search`).

Keys are never written in the configuration: `api_key_env` names the environment variable that
holds one, read when the backend is built (as a deployment's is).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from relay.models.endpoints import checked_url, key_from
from relay.models.policy import MAX_USD

BACKENDS = ("searxng", "brave", "tavily")


class _SearchBase(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo is an error, not a default

    backend: str
    # The instance's or the API's base URL (paths are added to it).
    url: str
    # Results a search gives the model at most (the APIs' own ceiling is 20).
    max_results: int = Field(default=5, ge=1, le=20)
    # What one search costs, added to the response's cost (usage ledger, budgets).
    price_per_search_usd: float = Field(default=0.0, ge=0, le=MAX_USD)
    # The whole search: connecting, the API's answer and reading it.
    timeout_s: float = Field(default=10.0, gt=0, le=600)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return checked_url(url)

    def api_key(self) -> str | None:
        return None


class _KeyedSearch(_SearchBase):
    # The environment variable that holds the API key (required: these APIs take no request
    # without one).
    api_key_env: str = Field(min_length=1)

    def api_key(self) -> str:
        return key_from(self.api_key_env)


class SearxngConfig(_SearchBase):
    """A SearXNG instance's JSON API (self-hosted, no key). Its settings.yml must list `json`
    in `search.formats`, and its bot limiter must let Relay through (off, as on a private
    instance, or Relay's address in `botdetection.ip_lists.pass_ip`). A user and password in
    `url` are sent as Basic auth, for an instance behind a reverse proxy that asks for them."""

    backend: Literal["searxng"] = "searxng"
    # What the instance is asked to search with; None: its own defaults.
    categories: list[str] | None = None
    engines: list[str] | None = None
    language: str | None = None  # "en", "en-US", "all", "auto"
    safesearch: Literal[0, 1, 2] | None = None  # off, moderate, strict


class BraveConfig(_KeyedSearch):
    """The Brave Search API's web search (`X-Subscription-Token`)."""

    backend: Literal["brave"] = "brave"
    url: str = "https://api.search.brave.com"


class TavilyConfig(_KeyedSearch):
    """Tavily's search API (`Authorization: Bearer`)."""

    backend: Literal["tavily"] = "tavily"
    url: str = "https://api.tavily.com"
    # "advanced" finds more relevant passages and costs Tavily two credits a search.
    search_depth: Literal["basic", "advanced"] = "basic"


def _backend_of(value: Any) -> str | None:
    if isinstance(value, dict):
        backend = value.get("backend")
        return None if backend is None else str(backend)
    return getattr(value, "backend", None)


WebSearchConfig = Annotated[
    Annotated[SearxngConfig, Tag("searxng")]
    | Annotated[BraveConfig, Tag("brave")]
    | Annotated[TavilyConfig, Tag("tavily")],
    Discriminator(
        _backend_of,
        # pydantic's own message names the function that read the tag (`_backend_of()`).
        custom_error_type="unknown_search_backend",
        custom_error_message=f"backend must be one of {', '.join(BACKENDS)}",
    ),
]
