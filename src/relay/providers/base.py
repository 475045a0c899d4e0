"""The contract between the engine and a provider: a request in, a stream of deltas out.

A provider translates our internal request into its wire format and its wire stream back into
the small delta vocabulary below. It never sees Responses ids, never builds events, and raises
`ProviderError` for every failure so that retry and fallback are decided in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import orjson

from relay.protocol import CreateResponse

# "time_limit": the provider stopped at its own bound on one generation's time.
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "time_limit"]
T = TypeVar("T")


@dataclass(slots=True)
class TextDelta:
    text: str
    logprobs: list[dict[str, Any]] | None = None


@dataclass(slots=True)
class RefusalDelta:
    text: str


@dataclass(slots=True)
class ReasoningDelta:
    text: str


@dataclass(slots=True)
class ReasoningState:
    """What the upstream needs given back with the reasoning just streamed (a thinking
    block's signature, a redacted block, the upstream's own encrypted content): sealed by
    Relay into the reasoning item's `encrypted_content`. `state["kind"]` names the provider
    kind that can use it; other providers are sent the reasoning without it, or not at all.

    It ends its reasoning item: the next reasoning starts another (Anthropic's thinking
    blocks go back one for one)."""

    state: dict[str, Any]


@dataclass(slots=True)
class HostedItem:
    """An item the upstream made and runs itself (a web_search_call, an image_generation_call
    of a Responses upstream). `done`: the item as it ended; else the upstream has only opened
    it, and its progress (HostedProgress) and its end (the same item, done) follow, so that a
    client sees them as they come (an image's partial images while it is drawn)."""

    item: dict[str, Any]
    done: bool = True


@dataclass(slots=True)
class HostedProgress:
    """An event of an item the upstream opened (`item_id`: the upstream's id of it): its type
    (`response.web_search_call.searching`, `response.image_generation_call.partial_image`...)
    and its own fields (a partial image's data), without the ids and numbers Relay makes."""

    item_id: str
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ImageDelta:
    """An image the upstream drew in its answer (a chat upstream's `images`), whole: its
    base64 data and its format ("png", "jpeg", "webp"), when the upstream said."""

    result: str
    output_format: str | None = None


@dataclass(slots=True)
class AnnotationDelta:
    """An annotation (a url_citation, ...) of the output text streamed so far."""

    annotation: dict[str, Any]


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of one tool call; `index` tells parallel calls apart.

    The first piece of a call carries its name (and the upstream call id when there is one);
    later pieces carry argument text only.
    """

    index: int
    arguments: str = ""
    name: str | None = None
    call_id: str | None = None


@dataclass(slots=True)
class UsageDelta:
    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    # Input tokens written to the upstream's prompt cache (Anthropic reports them).
    cache_write_tokens: int = 0


@dataclass(slots=True)
class FinishDelta:
    reason: FinishReason


Delta = (
    TextDelta
    | RefusalDelta
    | ReasoningDelta
    | ReasoningState
    | HostedItem
    | HostedProgress
    | ImageDelta
    | AnnotationDelta
    | ToolCallDelta
    | UsageDelta
    | FinishDelta
)


@dataclass(eq=False, slots=True)
class History:
    """The items of a stored chain, oldest first: what a previous_response_id continues.

    The engine keeps recent histories in memory and hands the same objects to every turn of a
    conversation; nobody changes them. What a provider derives from them (its translation of
    the items) is kept with them by `derive`, and a successor history extends its parent's
    instead of translating every item again, so turn N costs its new items, not N turns.
    """

    items: list[dict[str, Any]]
    # A history whose items begin these. One level only: the engine cuts the link below, so
    # a conversation does not keep every earlier history alive.
    parent: History | None = None
    # The size of the items' JSON, what keeping the history costs (see `size`).
    nbytes: int | None = None
    _derived: dict[str, Any] = field(default_factory=dict)

    def size(self) -> int:
        """The size of the items' JSON: as given (the store reports what it wrote), or
        measured once (a history read back from storage)."""
        if self.nbytes is None:
            self.nbytes = len(orjson.dumps(self.items))
        return self.nbytes

    def derive(self, key: str, extend: Callable[[T, list[dict[str, Any]]], T], empty: T) -> T:
        """`extend(empty, items)`, computed once, or `extend(the parent's, the items after the
        parent's)` when the parent has one. `extend` must not change its first argument."""
        value: T | None = self._derived.get(key)
        if value is None:
            parent = self.parent
            base: T | None = None if parent is None else parent._derived.get(key)
            if parent is not None and base is not None:
                value = extend(base, self.items[len(parent.items) :])
            else:
                value = extend(empty, self.items)
            self._derived[key] = value
        return value


@dataclass(slots=True)
class ProviderRequest:
    """What a provider needs: the upstream model, the validated request and the built context.

    `items` is the context in Responses item shape (after `history`, when set), `tools` the
    function tools the model may call after tool_choice filtering, `tool_choice` the normalised
    choice: "auto", "none", "required" or {"name": ...} for the one function to call.
    """

    upstream_model: str
    request: CreateResponse
    instructions: str | None
    items: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, str] = "auto"
    parallel_tool_calls: bool = True
    want_logprobs: bool = False
    # reasoning.effort, or seed 001's top-level reasoning_effort: merged by the engine.
    reasoning_effort: str | None = None
    # The stored chain this request continues, when there is one: then `items` holds only
    # what comes after it (see `context`).
    history: History | None = None
    # Every function tool of the request, whatever tool_choice allows: for upstreams that want
    # the definitions beside earlier calls even when none may be called now (Anthropic).
    all_tools: list[dict[str, Any]] = field(default_factory=list)
    # Hosted tools (web_search, ...) the upstream is to run itself, as the request gave them.
    hosted_tools: list[dict[str, Any]] = field(default_factory=list)
    # The function a client-run tool search is offered as (one of `all_tools`), by which its
    # tool_search_call and tool_search_output items go back (tool_names.search_as_function).
    search_function: str | None = None
    # A reasoning item's encrypted_content -> the upstream state Relay sealed in it (see
    # relay.providers.base.ReasoningState), or None.
    reasoning_state: Callable[[str], dict[str, Any] | None] = field(default=lambda token: None)

    def state_of(self, item: dict[str, Any]) -> dict[str, Any] | None:
        """The upstream state of a reasoning item, when Relay sealed one in it."""
        token = item.get("encrypted_content")
        return self.reasoning_state(token) if isinstance(token, str) and token else None

    def context(self) -> list[dict[str, Any]]:
        """The whole context: the history's items, then `items`."""
        return self.items if self.history is None else self.history.items + self.items


@dataclass(slots=True, frozen=True)
class TokenCount:
    """Tokens of a would-be request or of a text: counted by the model's tokenizer (`exact`),
    or estimated where Relay has no way to count."""

    tokens: int
    exact: bool


# About this many bytes of English text or JSON make a token: the usual rule of thumb, used
# where neither Relay nor the upstream can count.
BYTES_PER_TOKEN = 4


def estimated_tokens(text: str | bytes) -> TokenCount:
    """The tokens of `text` by BYTES_PER_TOKEN, rounded up: never 0 for some text."""
    size = len(text.encode() if isinstance(text, str) else text)
    return TokenCount(-(-size // BYTES_PER_TOKEN), exact=False)


class ProviderError(Exception):
    """A provider failure, with what the engine needs to decide on a fallback.

    `retryable` failures (connection errors, 404/408/429/5xx) move on to the next model in the
    fallback list when they happen before the first byte; others are answered at once.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        code: str = "upstream_error",
        retryable: bool = True,
        retry_after: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retryable = retryable
        self.retry_after = retry_after
        self.param = param  # the request field at fault, for a 400


class Provider(Protocol):
    async def open(self, request: ProviderRequest) -> AsyncIterator[Delta]:
        """Send the request; return the delta stream once the upstream has accepted it.

        Raises ProviderError when the upstream refuses or cannot be reached (before the first
        byte). The returned iterator may raise ProviderError later, mid-stream.
        """
        ...

    async def count_tokens(self, request: ProviderRequest) -> TokenCount:
        """The input tokens `request` would cost, without generating."""
        ...

    async def count_text(self, text: str) -> TokenCount:
        """The tokens of `text` as the model's output (for usage the upstream did not
        report): exact where Relay holds the tokenizer, else estimated."""
        ...

    async def aclose(self) -> None: ...
