"""A create request checked against its routes, with its context built: what generating a
response and counting its input tokens both start from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.engine.checks import ToolPlan
from relay.protocol import CreateResponse
from relay.providers.base import History, ProviderRequest
from relay.providers.registry import Route


@dataclass(slots=True)
class Prepared:
    request: CreateResponse
    routes: list[Route]  # the model's route, then its fallbacks, in order
    tools: ToolPlan
    effort: str | None
    summary: str | None
    items: list[dict[str, Any]]  # this request's input, normalised, references resolved
    history: History | None  # the chain previous_response_id continues
    want_logprobs: bool

    def context(self) -> list[dict[str, Any]]:
        return self.items if self.history is None else self.history.items + self.items

    def provider_request(
        self, route: Route, shortened: list[dict[str, Any]] | None = None
    ) -> ProviderRequest:
        """The request for `route`; `shortened`: a context truncation made shorter."""
        return ProviderRequest(
            upstream_model=route.upstream_model,
            request=self.request,
            instructions=self.request.instructions,
            # A shortened context no longer begins with the history.
            items=self.items if shortened is None else shortened,
            history=self.history if shortened is None else None,
            tools=self.tools.offered,
            tool_choice=self.tools.choice,
            parallel_tool_calls=self.tools.parallel,
            want_logprobs=self.want_logprobs,
            reasoning_effort=self.effort,
        )
