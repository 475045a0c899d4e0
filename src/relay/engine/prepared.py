"""A create request checked against its routes, with its context built: what generating a
response and counting its input tokens both start from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.engine.checks import ToolPlan
from relay.engine.routing import Preferences
from relay.protocol import CreateResponse
from relay.providers.base import History, ProviderRequest
from relay.providers.registry import Deployment, Route


@dataclass(slots=True)
class Prepared:
    request: CreateResponse
    # The model's route, then its fallbacks, in order, each with the deployments that can
    # serve this request.
    routes: list[tuple[Route, list[Deployment]]]
    preferences: Preferences
    tools: ToolPlan
    effort: str | None
    summary: str | None
    items: list[dict[str, Any]]  # this request's input, normalised, references resolved
    history: History | None  # the chain previous_response_id continues
    want_logprobs: bool
    # What the upstream reads: the same, with compaction items expanded to their summaries.
    upstream_items: list[dict[str, Any]]
    upstream_history: History | None
    reasoning_state: Callable[[str], dict[str, Any] | None]

    def context(self) -> list[dict[str, Any]]:
        """The whole context as the upstream reads it."""
        items, history = self.upstream_items, self.upstream_history
        return items if history is None else history.items + items

    @property
    def answers_approvals(self) -> bool:
        """Whether the input answers MCP approval requests (relay.engine.server_tools)."""
        return any(item["type"] == "mcp_approval_response" for item in self.items)

    @property
    def route(self) -> Route:
        """The model's own route (the first choice)."""
        return self.routes[0][0]

    def provider_request(
        self, deployment: Deployment, shortened: list[dict[str, Any]] | None = None
    ) -> ProviderRequest:
        """The request for `deployment`; `shortened`: a context truncation made shorter."""
        runs = deployment.hosted_tools
        plan = self.tools
        hosted = [tool for tool in plan.hosted if tool["type"] in runs]
        offered, functions = plan.offered, plan.functions
        search_function = plan.search_function
        if plan.search is not None and "tool_search" in runs:
            # The upstream searches: it gets the search tool (not as a function), and the
            # tools searches loaded come to it with the tool_search_output items that loaded
            # them.
            hosted.append(plan.search)
            left_out = {*plan.loaded, search_function}
            offered = [tool for tool in offered if tool["name"] not in left_out]
            functions = [tool for tool in functions if tool["name"] not in left_out]
            search_function = None
        return ProviderRequest(
            upstream_model=deployment.upstream_model,
            request=self.request,
            instructions=self.request.instructions,
            # A shortened context no longer begins with the history.
            items=self.upstream_items if shortened is None else shortened,
            history=self.upstream_history if shortened is None else None,
            tools=offered,
            tool_choice=plan.choice,
            parallel_tool_calls=plan.parallel,
            want_logprobs=self.want_logprobs,
            reasoning_effort=self.effort,
            all_tools=functions,
            hosted_tools=hosted,
            search_function=search_function,
            reasoning_state=self.reasoning_state,
        )
