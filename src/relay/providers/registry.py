"""Public model names -> routes (a provider instance, its upstream model, its fallbacks)."""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import RouteConfig
from relay.errors import NotFound
from relay.providers.base import Provider


@dataclass(slots=True, frozen=True)
class Route:
    model: str
    upstream_model: str
    provider: Provider
    config: RouteConfig


def _build_provider(config: RouteConfig) -> Provider:
    # Imported here so that a provider's dependencies load only when a route uses it.
    if config.provider == "fake":
        from relay.providers.fake import FakeProvider

        return FakeProvider()
    if config.provider == "llama_cpp":
        from relay.providers.llama_local import (
            LlamaLocalProvider,
            LocalModelOptions,
            bundled_model_path,
        )

        options = LocalModelOptions(
            n_ctx=config.n_ctx,
            n_threads=config.n_threads,
            max_queue=config.max_queue,
            load_at_startup=config.load == "startup",
            default_max_output_tokens=config.default_max_output_tokens,
            max_generation_s=config.max_generation_s,
        )
        return LlamaLocalProvider(config.model_path or bundled_model_path(), options)
    from relay.providers.openai_chat import OpenAIChatProvider

    assert config.base_url is not None  # checked by RouteConfig
    return OpenAIChatProvider(
        config.base_url,
        config.api_key(),
        timeout_s=config.timeout_s,
        max_tokens_param=config.max_tokens_param,
        extra_headers=config.headers,
        forward_fields=frozenset(config.forward_fields),
        replay_reasoning=config.replay_reasoning,
        count_tokens=config.count_tokens,
    )


class Registry:
    def __init__(self, routes: list[RouteConfig]) -> None:
        self._routes = {
            config.model: Route(
                model=config.model,
                upstream_model=config.upstream_model or config.model,
                provider=_build_provider(config),
                config=config,
            )
            for config in routes
        }

    def names(self) -> list[str]:
        return list(self._routes)

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
            await route.provider.aclose()
