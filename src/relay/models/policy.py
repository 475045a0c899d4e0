"""Limits and budgets, as a project or a key carries them (config file, admin API, CLI)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

import orjson
from pydantic import BaseModel, ConfigDict, Field

NANOS_PER_USD = 1_000_000_000
# Bounds on amounts (a billion dollars): sums in nano-dollars stay within 64-bit integers.
MAX_USD = 1_000_000_000.0


class Policy(BaseModel):
    """What a project or key may use. Every field is optional; None: no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Requests and tokens per minute (a sliding window), and requests running at once.
    rpm: int | None = Field(default=None, ge=1, le=10**12)
    tpm: int | None = Field(default=None, ge=1, le=10**15)
    max_concurrent: int | None = Field(default=None, ge=1, le=10**9)
    # Spend caps in US dollars: per UTC day, per UTC month, and over all time (a prepaid
    # credit: raise it to top up).
    daily_budget_usd: float | None = Field(default=None, ge=0, le=MAX_USD)
    monthly_budget_usd: float | None = Field(default=None, ge=0, le=MAX_USD)
    credit_usd: float | None = Field(default=None, ge=0, le=MAX_USD)
    # The MCP servers the project may reach (URL prefixes or hosts, as the server's
    # `tools.mcp.allowed_servers`, which applies where this is None); [] reaches none.
    mcp_servers: tuple[str, ...] | None = Field(default=None, max_length=1000)

    @property
    def has_rate_limits(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None

    @property
    def has_budget(self) -> bool:
        return (
            self.daily_budget_usd is not None
            or self.monthly_budget_usd is not None
            or self.credit_usd is not None
        )

    @property
    def limits_anything(self) -> bool:
        return self.has_rate_limits or self.has_budget

    def to_json(self) -> str:
        return orjson.dumps(self.model_dump(exclude_none=True)).decode()

    @classmethod
    def from_json(cls, text: str) -> Policy:
        return cls.model_validate(orjson.loads(text))

    def updated(self, changes: dict[str, Any]) -> Policy:
        """This policy with `changes` applied (a None value lifts that limit)."""
        return Policy.model_validate({**self.model_dump(), **changes})


NO_POLICY = Policy()


class Price(BaseModel):
    """A route's price in US dollars per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(default=0.0, ge=0, le=MAX_USD)
    cached_input: float | None = Field(default=None, ge=0, le=MAX_USD)  # default: input's
    output: float = Field(default=0.0, ge=0, le=MAX_USD)

    def cost_nanos(self, input_tokens: int, cached_tokens: int, output_tokens: int) -> int:
        """The cost in nano-dollars (integers, so that sums stay exact)."""
        cached = min(cached_tokens, input_tokens)
        cached_price = self.input if self.cached_input is None else self.cached_input
        # Price per million tokens in dollars = nano-dollars per thousand tokens... x1000.
        nanos = (
            (input_tokens - cached) * self.input
            + cached * cached_price
            + output_tokens * self.output
        ) * 1000
        return round(nanos)


class Served(NamedTuple):
    """Who answered a response: the deployment's name and price (relay.engine.routing), and
    whether its usage was counted by Relay because the upstream reported none."""

    deployment: str
    price: Price | None
    estimated: bool = False
    tools_nanos: int = 0  # what its server-side tool calls cost (priced per call)


# Told a settled response once, whatever the outcome (usage, limits: relay.access), with the
# deployment that answered; what it returns (when not None) is awaited before the response's
# terminal event goes out: a budget's spend, written where every instance sees it.
Settle = Callable[[dict[str, Any], Served | None], Awaitable[None] | None]
