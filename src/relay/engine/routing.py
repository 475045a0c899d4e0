"""Which deployments serve a request, in which order, and how each is tried.

A route (a public model) has one or more deployments. For each request the router keeps the
deployments that can honour it (the request's `provider` preferences, the fields it uses that
only some upstreams take), orders them (`order`, else `sort`, else weighted random), puts
cooling ones last, and tries them in turn: each with its own retries (backoff with jitter,
`retry-after` honoured) on failures before the first byte. Nothing here sees a byte of a
stream: once a deployment has answered, the answer is the client's, whatever follows.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from relay.errors import InvalidRequest
from relay.protocol import CreateResponse, invalid_request
from relay.providers.base import ProviderError
from relay.providers.registry import Deployment, Route

log = logging.getLogger("relay.routing")
T = TypeVar("T")
# Fields of a request that only deployments which forward them can honour (`provider`, which
# such a deployment may forward too, is honoured by the router whatever the deployment).
FORWARDED = ("plugins", "modalities", "image_config")


class MaxPrice(BaseModel):
    """US dollars per million tokens (prompt, completion); per request, image, audio: Relay
    prices none of those, so every deployment is within any bound on them."""

    model_config = ConfigDict(extra="forbid")

    prompt: float | None = Field(default=None, ge=0)
    completion: float | None = Field(default=None, ge=0)
    request: float | None = Field(default=None, ge=0)
    image: float | None = Field(default=None, ge=0)
    audio: float | None = Field(default=None, ge=0)


class SortBy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    by: Literal["price", "throughput", "latency"]
    # Relay sorts each model's deployments on their own ("model"); "none" would mix the
    # deployments of fallback models, which Relay keeps in their order.
    partition: Literal["model"] | None = None


class Preferences(BaseModel):
    """The request's `provider` object (seed 000; OpenRouter's provider routing)."""

    model_config = ConfigDict(extra="forbid")

    order: list[str] | None = None
    only: list[str] | None = None
    ignore: list[str] | None = None
    allow_fallbacks: bool = True
    # Relay never drops a parameter (a deployment that cannot take one is not chosen), so
    # this holds whatever its value.
    require_parameters: bool | None = None
    data_collection: Literal["allow", "deny"] = "allow"
    zdr: bool | None = None
    # No deployment records distillation terms: only false is honoured.
    enforce_distillable_text: Literal[False] | None = None
    quantizations: list[str] | None = None
    sort: Literal["price", "throughput", "latency"] | SortBy | None = None
    max_price: MaxPrice | None = None
    # Measured here (relay.providers.health); deployments not measured yet count as meeting.
    preferred_min_throughput: float | None = Field(default=None, ge=0)
    preferred_max_latency: float | None = Field(default=None, ge=0)

    @property
    def sort_by(self) -> str | None:
        return self.sort.by if isinstance(self.sort, SortBy) else self.sort


NO_PREFERENCES = Preferences()


def preferences(request: CreateResponse) -> Preferences:
    if request.provider is None:
        return NO_PREFERENCES
    try:
        return Preferences.model_validate(request.provider)
    except ValidationError as error:
        raise invalid_request(error, request.provider, "provider") from None


def _used_fields(request: CreateResponse) -> list[str]:
    """The fields of FORWARDED the request uses (`provider` is the router's own)."""
    wants_image = request.modalities is not None and "image" in request.modalities
    used = {
        "plugins": bool(request.plugins),
        "modalities": wants_image,
        "image_config": bool(request.image_config),
    }
    return [name for name in FORWARDED if used[name]]


def _matches(deployment: Deployment, names: Iterable[str]) -> bool:
    return any(name in (deployment.name, deployment.kind) for name in names)


def choices(
    routes: list[Route],
    request: CreateResponse,
    prefs: Preferences,
    hosted: list[dict[str, Any]],
) -> list[tuple[Route, list[Deployment]]]:
    """Each route with its deployments that can serve the request. The model's own route
    must have one (else a 400 says why); a fallback route with none is left out, unless it
    is a request field none of its deployments takes: a fallback that would drop a field is
    as wrong as a first choice that would."""
    out = []
    for index, route in enumerate(routes):
        try:
            out.append((route, eligible(route, request, prefs, hosted)))
        except InvalidRequest as error:
            if index == 0 or error.code != NO_ELIGIBLE:
                raise
    return out


NO_ELIGIBLE = "no_eligible_deployment"


def eligible(
    route: Route,
    request: CreateResponse,
    prefs: Preferences,
    hosted: list[dict[str, Any]],
) -> list[Deployment]:
    """The route's deployments that can honour the request and its preferences; a 400 when
    none can, naming what ruled the last ones out."""
    fields = _used_fields(request)
    if prefs is NO_PREFERENCES and not fields and not hosted:
        return list(route.deployments)  # the common case, on every request
    chosen = list(route.deployments)
    kinds = {tool["type"] for tool in hosted}
    if kinds:
        chosen = [d for d in chosen if kinds <= d.hosted_tools]
        if not chosen:
            raise InvalidRequest(
                f"No deployment of model '{route.model}' runs the hosted tools {sorted(kinds)}.",
                param="tools",
                code=NO_ELIGIBLE,
            )
    for name in fields:
        kept = [d for d in chosen if name in d.forward_fields]
        if not kept:
            raise InvalidRequest(
                f"'{name}' is not supported by the route for model '{route.model}'.",
                param=name,
                code="unsupported_parameter",
            )
        chosen = kept
    price = prefs.max_price
    filters: list[tuple[str, Callable[[Deployment], bool]]] = [
        ("provider.only", lambda d: prefs.only is None or _matches(d, prefs.only)),
        ("provider.ignore", lambda d: not prefs.ignore or not _matches(d, prefs.ignore)),
        (
            "provider.data_collection",
            lambda d: prefs.data_collection == "allow" or d.config.data_collection == "deny",
        ),
        ("provider.zdr", lambda d: not prefs.zdr or d.config.zdr),
        (
            "provider.quantizations",
            lambda d: prefs.quantizations is None or d.config.quantization in prefs.quantizations,
        ),
        ("provider.max_price", lambda d: price is None or _within(d, price)),
    ]
    for param, keep in filters:
        # A deployment that forwards `provider` (OpenRouter) has the upstream apply the
        # preferences among its own providers: Relay's filters are not for it, but for an
        # `ignore` that names it.
        exempt = param != "provider.ignore"
        kept = [d for d in chosen if keep(d) or (exempt and _forwards_preferences(d))]
        if not kept:
            raise InvalidRequest(
                f"No deployment of model '{route.model}' meets '{param}'.",
                param=param,
                code=NO_ELIGIBLE,
            )
        chosen = kept
    ordered_only = prefs.order and not prefs.allow_fallbacks
    if ordered_only and not any(_matches(d, prefs.order or ()) for d in chosen):
        raise InvalidRequest(
            f"No deployment of model '{route.model}' is in 'provider.order', and "
            "allow_fallbacks is false.",
            param="provider.order",
            code=NO_ELIGIBLE,
        )
    return chosen


def _forwards_preferences(deployment: Deployment) -> bool:
    return "provider" in deployment.forward_fields


def _within(deployment: Deployment, bound: MaxPrice) -> bool:
    price = deployment.config.price
    prompt = price.input if price else 0.0
    completion = price.output if price else 0.0
    return (bound.prompt is None or prompt <= bound.prompt) and (
        bound.completion is None or completion <= bound.completion
    )


def ordered(deployments: list[Deployment], prefs: Preferences) -> list[Deployment]:
    """The order to try them in: `order` first (and only, without allow_fallbacks), else by
    `sort`, else weighted random; deployments below the preferred throughput or above the
    preferred latency after the others; cooling ones last of all."""
    if prefs.order:
        named = [d for name in prefs.order for d in deployments if _matches(d, [name])]
        named = list(dict.fromkeys(named))  # a deployment matched by name and by kind: once
        rest = [d for d in _weighted(deployments) if d not in named]
        chosen = named + rest if prefs.allow_fallbacks else named
    else:
        sort = prefs.sort_by
        if sort == "price":
            chosen = sorted(deployments, key=_price_key)
        elif sort == "latency":
            chosen = sorted(deployments, key=lambda d: d.health.latency_s or 0.0)
        elif sort == "throughput":
            chosen = sorted(deployments, key=lambda d: -(d.health.tokens_per_s or float("inf")))
        else:
            chosen = _weighted(deployments)
        if not prefs.allow_fallbacks:
            chosen = chosen[:1]
    if prefs.preferred_min_throughput is not None or prefs.preferred_max_latency is not None:
        chosen.sort(key=lambda d: not _preferred(d, prefs))  # stable: keeps the order within
    now = time.monotonic()
    chosen.sort(key=lambda d: d.health.cooling(now))
    return chosen


def _price_key(deployment: Deployment) -> float:
    price = deployment.config.price
    return 0.0 if price is None else price.input + price.output


def _preferred(deployment: Deployment, prefs: Preferences) -> bool:
    health = deployment.health
    fast_enough = (
        prefs.preferred_min_throughput is None
        or health.tokens_per_s is None
        or health.tokens_per_s >= prefs.preferred_min_throughput
    )
    # preferred_max_latency is in seconds, as OpenRouter's.
    quick_enough = (
        prefs.preferred_max_latency is None
        or health.latency_s is None
        or health.latency_s <= prefs.preferred_max_latency
    )
    return fast_enough and quick_enough


def _weighted(deployments: list[Deployment]) -> list[Deployment]:
    """A weighted random order (Efraimidis-Spirakis): each position picked in proportion to
    the weights of those not yet placed."""
    if len(deployments) == 1:
        return list(deployments)
    keyed = [(random.random() ** (1.0 / d.config.weight), d) for d in deployments]
    keyed.sort(key=lambda pair: pair[0], reverse=True)
    return [d for _, d in keyed]


# Attempts ---------------------------------------------------------------------------------------


def _worth_retrying(error: ProviderError) -> bool:
    """Connection failures, 429 and 5xx: the same deployment may well answer next time. A 404
    (misconfigured) or a timeout (the next try would wait as long) moves on at once."""
    return (
        error.retryable
        and error.status in (429, 500, 502, 503, 504)
        and error.code != "upstream_not_found"
    )


# Failures that are this deployment's and not the request's: the next deployment may serve
# it (another provider takes the parameter, another model has a larger context window,
# another key is valid). When every deployment refuses, the client hears the refusal.
REFUSALS = ("unsupported_parameter", "unsupported_input", "context_length_exceeded")
# A deployment's own faults: its key refused, or its proxy refusing it.
_MISCONFIGURED = ("upstream_auth_failed", "proxy_refused")
_NEXT_DEPLOYMENT = (*REFUSALS, *_MISCONFIGURED)


def _retry_after_s(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from model APIs; the backoff applies instead


async def attempt(
    deployment: Deployment, call: Callable[[int], Awaitable[T]]
) -> tuple[T | None, ProviderError | None]:
    """`call` on `deployment`, retried as its config says (`call(n)` makes the nth try): (result,
    None), or (None, the last failure). Failures that are the request's (a 400) are raised at
    once; the health record hears of each try."""
    config = deployment.config
    health = deployment.health
    last: ProviderError | None = None
    for number in range(config.retries + 1):
        health.attempt()
        started = time.monotonic()
        try:
            result = await call(number + 1)
        except ProviderError as error:
            deployment.meter.attempted(error.code)
            if error.retryable or error.code in _MISCONFIGURED:
                health.failed()
            else:
                health.probing = False
            if not error.retryable:
                if error.code in _NEXT_DEPLOYMENT:
                    return None, error
                raise
            last = error
            if number == config.retries or not _worth_retrying(error):
                break
            wait = _retry_after_s(error.retry_after)
            if wait is None:
                # Exponential backoff with full jitter over the upper half.
                ceiling = min(config.retry_backoff_s * 2**number, config.retry_max_wait_s)
                wait = ceiling * (0.5 + random.random() / 2)
            elif wait > config.retry_max_wait_s:
                break  # asked to wait longer than this deployment is worth: the next one
            log.info(
                "deployment %s of %s failed (%s); retry %d in %.2f s",
                deployment.name,
                deployment.route,
                error.message,
                number + 1,
                wait,
            )
            await asyncio.sleep(wait)
            continue
        except BaseException:
            health.probing = False  # a cancelled probe settles nothing
            raise
        health.succeeded(time.monotonic() - started)
        deployment.meter.attempted("ok")
        return result, None
    return None, last
