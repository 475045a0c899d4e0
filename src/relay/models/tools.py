"""Settings of the tools Relay runs for the model (`[tools]` in the config file)."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from relay.models.endpoints import checked_url, key_from
from relay.models.policy import MAX_USD
from relay.models.web_search import WebSearchConfig


class McpSettings(BaseModel):
    """Remote MCP servers (`mcp` tools of requests)."""

    model_config = ConfigDict(extra="forbid")

    # The servers a project may reach, unless its policy lists its own (`mcp_servers`): URL
    # prefixes ("https://mcp.example.com/") or hosts ("mcp.example.com", "*.example.com",
    # "mcp.example.com:8443"). Empty, the default: none, until the operator opens some.
    allowed_servers: list[str] = Field(default_factory=list)
    # Private, loopback, link-local and other non-public addresses are refused (checked on
    # each resolved address, redirects included) unless inside one of these networks (CIDR).
    private_networks: list[str] = Field(default_factory=list)
    list_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    call_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    # A call's output beyond this many bytes is cut (the model reads the start, and a note).
    max_output_bytes: int = Field(default=1_000_000, ge=1024, le=100_000_000)
    # What each MCP call costs, added to the response's cost (usage ledger, budgets).
    price_per_call_usd: float = Field(default=0.0, ge=0, le=MAX_USD)

    @field_validator("private_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        for network in networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"'{network}' is not a network (write 10.0.0.0/8)") from None
        return networks


class ImagesSettings(BaseModel):
    """The images endpoint `image_generation` tools run on, for any model: an OpenAI-compatible
    `POST <url>/images/generations` (OpenAI, Azure OpenAI, LocalAI, a gateway...)."""

    model_config = ConfigDict(extra="forbid")

    url: str  # up to /v1, before /images/generations
    model: str = Field(min_length=1)  # the image model asked for
    # The environment variable that holds the endpoint's key (never the key itself).
    api_key_env: str | None = None
    # Sent as the request's response_format, for servers that answer with URLs unless asked
    # for base64; "omit": not sent, for OpenAI's GPT image models, which refuse the field and
    # always answer base64.
    response_format: Literal["b64_json", "omit"] = "b64_json"
    # What one image costs, added to the response's cost (usage ledger, budgets); an image
    # that failed costs nothing.
    price_per_image_usd: float = Field(default=0.0, ge=0, le=MAX_USD)
    # The longest the endpoint may stay silent (images take a while: tens of seconds).
    timeout_s: float = Field(default=300.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        return checked_url(url)

    def api_key(self) -> str | None:
        return None if self.api_key_env is None else key_from(self.api_key_env)


class ToolSettings(BaseModel):
    """The tool loop's bounds, MCP, web search and image generation."""

    model_config = ConfigDict(extra="forbid")

    # Model turns one response may take (the last is offered no tools, so that it answers).
    max_steps: int = Field(default=16, ge=1, le=256)
    # Server calls of one turn run at once, at most this many at a time.
    max_parallel: int = Field(default=8, ge=1, le=256)
    # The longest a response's server calls and turns may go on; then it ends incomplete.
    deadline_s: float = Field(default=600.0, gt=0, le=86_400)
    mcp: McpSettings = Field(default_factory=McpSettings)
    # The backend `web_search` tools run on. None: they are not run here (`hosted_tools`).
    web_search: WebSearchConfig | None = None
    # The endpoint `image_generation` tools run on. None: they are not run here (unless a
    # deployment runs them itself: `hosted_tools`).
    images: ImagesSettings | None = None
