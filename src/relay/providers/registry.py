"""Public model names -> routes; a route's deployments, each a provider instance with its
health.

Provider kinds are a table (`KINDS`), not a chain of ifs: each kind's module has a
`build(config)` that makes its provider from its own config model
(`relay.models.deployments`), imported when a route first uses it, so that a provider's
dependencies load only where they are needed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.config import RouteConfig
from relay.errors import NotFound
from relay.models.deployments import DeploymentConfig
from relay.observe.metrics import DeploymentMeter, Metrics
from relay.providers.base import Provider
from relay.providers.health import Health

KINDS: dict[str, str] = {
    "openai_chat": "relay.providers.openai_chat",
    "openai_responses": "relay.providers.openai_responses",
    "anthropic": "relay.providers.anthropic",
    "llama_cpp": "relay.providers.llama_local",
    "fake": "relay.providers.fake",
}


def build_provider(config: DeploymentConfig) -> Provider:
    build: Callable[[DeploymentConfig], Provider] = importlib.import_module(
        KINDS[config.provider]
    ).build
    return build(config)


@dataclass(slots=True, eq=False)
class Deployment:
    """One place a route is served: its provider, the upstream model, its health."""

    route: str
    name: str
    upstream_model: str
    provider: Provider
    config: DeploymentConfig
    meter: DeploymentMeter  # what it records (relay.observe.metrics)
    health: Health = field(default_factory=Health)
    # Read once from the config (only some kinds have them): what routing asks per request.
    kind: str = ""
    forward_fields: frozenset[str] = frozenset()
    hosted_tools: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.kind = self.config.provider
        self.forward_fields = frozenset(getattr(self.config, "forward_fields", ()))
        self.hosted_tools = frozenset(getattr(self.config, "hosted_tools", ()))


@dataclass(slots=True, frozen=True)
class Route:
    model: str
    deployments: tuple[Deployment, ...]
    config: RouteConfig
    # The hosted tool types some deployment of the route runs itself.
    hosted_tools: frozenset[str] = frozenset()


class Registry:
    def __init__(
        self,
        routes: list[RouteConfig],
        *,
        cooldown_failures: int = 3,
        cooldown_s: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        """`metrics`: the application's (each deployment records there); else its own."""
        self.metrics = metrics = metrics or Metrics()
        self._routes: dict[str, Route] = {}
        for config in routes:
            deployments = tuple(
                Deployment(
                    route=config.model,
                    name=deployment.label,
                    upstream_model=deployment.upstream_model or config.model,
                    provider=build_provider(deployment),
                    config=deployment,
                    meter=metrics.meter(config.model, deployment.label, deployment.provider),
                    health=Health(cooldown_failures, cooldown_s),
                )
                for deployment in config.deployments
            )
            runs = frozenset().union(*(deployment.hosted_tools for deployment in deployments))
            self._routes[config.model] = Route(config.model, deployments, config, runs)

    def names(self) -> list[str]:
        return list(self._routes)

    def deployments(self) -> list[Deployment]:
        return [deployment for route in self._routes.values() for deployment in route.deployments]

    def resolve(self, model: str, param: str = "model") -> Route:
        route = self._routes.get(model)
        if route is None:
            raise NotFound(
                f"The model '{model}' does not exist or you do not have access to it.",
                param=param,
                code="model_not_found",
            )
        return route

    def candidates(self, model: str, models: list[str] | None) -> list[Route]:
        """The routes to try in order: the model, the request's `models`, then the route's own
        fallbacks; each once. Every name is checked up front so a typo is a 404, not a
        surprise when the first choice fails."""
        ordered = [self.resolve(model)]
        for index, name in enumerate(models or []):
            ordered.append(self.resolve(name, param=f"models[{index}]"))
        ordered.extend(self._routes[name] for name in ordered[0].config.fallbacks)
        seen: set[str] = set()
        unique = []
        for route in ordered:
            if route.model not in seen:
                seen.add(route.model)
                unique.append(route)
        return unique

    async def aclose(self) -> None:
        for route in self._routes.values():
            for deployment in route.deployments:
                await deployment.provider.aclose()
