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
    # What the upstream reads: the same, with compaction items expanded to their summaries.
    upstream_items: list[dict[str, Any]]
    upstream_history: History | None

    def context(self) -> list[dict[str, Any]]:
        """The whole context as the upstream reads it."""
        items, history = self.upstream_items, self.upstream_history
        return items if history is None else history.items + items

    def provider_request(
        self, route: Route, shortened: list[dict[str, Any]] | None = None
    ) -> ProviderRequest:
        """The request for `route`; `shortened`: a context truncation made shorter."""
        return ProviderRequest(
            upstream_model=route.upstream_model,
            request=self.request,
            instructions=self.request.instructions,
            # A shortened context no longer begins with the history.
            items=self.upstream_items if shortened is None else shortened,
            history=self.upstream_history if shortened is None else None,
            tools=self.tools.offered,
            tool_choice=self.tools.choice,
            parallel_tool_calls=self.tools.parallel,
            want_logprobs=self.want_logprobs,
            reasoning_effort=self.effort,
        )
