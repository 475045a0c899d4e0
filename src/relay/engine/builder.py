"""Provider deltas -> output items and the semantic stream events that describe them.

The builder owns the response snapshot and the sequence counter. Items open when their first
delta arrives and close, in output_index order, when a delta of another kind arrives or the run
ends; so `output_item.added`/`done` always pair up and indices never collide.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from relay.engine import reasoning
from relay.engine.response import output_text
from relay.ids import new_id
from relay.providers.base import (
    AnnotationDelta,
    Delta,
    FinishDelta,
    HostedItem,
    HostedProgress,
    ImageDelta,
    ReasoningDelta,
    ReasoningState,
    RefusalDelta,
    TextDelta,
    ToolCallDelta,
    UsageDelta,
)

Event = dict[str, Any]
# The events that end a response's stream (after an `error` event, for a failed one).
TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Finish reasons that leave a response incomplete, and the reason it reports.
_INCOMPLETE = {
    "length": "max_output_tokens",
    "content_filter": "content_filter",
    "time_limit": "max_generation_time",
}


class ToolPolicyViolation(Exception):
    """The upstream did something tool_choice forbids; the run fails with this message."""


@dataclass(frozen=True, slots=True)
class ServerFunction:
    """What a function offered upstream stands for when Relay runs it: a tool of an MCP
    server (`label`, its own `name`), web search or image generation; `approval`: the client
    approves each call first."""

    kind: Literal["mcp", "web_search", "image_generation"]
    label: str
    name: str
    approval: bool


@dataclass(slots=True)
class ServerCall:
    """An item of a server-run tool: made from the model's call (or before the first turn:
    a tool list, an approved call), run by the tool loop, finished here. `progress`: the
    events between its output_item.added and .done when it comes whole; `for_model`: what
    the model reads as its output where that is not the item's own (search results)."""

    item: dict[str, Any]
    progress: tuple[str, ...] = ()
    for_model: str | None = None


class ResponseBuilder:
    # Slots: one builder lives as long as its stream, and past 30 attributes an instance's
    # own dictionary costs about 1.5 KiB more (1.5 MB a thousand open streams).
    __slots__ = (
        "_as_summary",
        "_calls",
        "_calls_made",
        "_custom",
        "_filler",
        "_finish",
        "_held_arguments",
        "_hosted_open",
        "_ignored_calls",
        "_include_encrypted",
        "_logprobs",
        "_max_calls",
        "_must_call",
        "_namespaced",
        "_offered_tools",
        "_open",
        "_parallel",
        "_part",
        "_reasoning_state",
        "_running",
        "_seal_reasoning",
        "_search",
        "_seq",
        "_server",
        "_server_calls",
        "_usage",
        "_usage_before",
        "approvals",
        "citable",
        "client_calls",
        "response",
    )

    def __init__(
        self,
        response: dict[str, Any],
        *,
        offered_tools: set[str],
        must_call: bool,
        parallel_tool_calls: bool,
        max_tool_calls: int | None,
        reasoning_as_summary: bool,
        include_logprobs: bool,
        obfuscate: bool = False,
        seal_reasoning: Callable[[str, dict[str, Any] | None], str] | None = None,
        include_encrypted_reasoning: bool = False,
        namespaced: dict[str, tuple[str, str]] | None = None,
        custom_tools: frozenset[str] = frozenset(),
        search_function: str | None = None,
        server_functions: dict[str, ServerFunction] | None = None,
    ) -> None:
        self.response = response
        self._seq = 0
        self._offered_tools = offered_tools
        self._must_call = must_call
        self._parallel = parallel_tool_calls
        self._max_calls = max_tool_calls
        self._as_summary = reasoning_as_summary
        self._logprobs = include_logprobs
        # Each finished reasoning item's text and upstream state, sealed: always when the
        # upstream gave state to give back (a thinking signature), else when the request
        # included reasoning.encrypted_content.
        self._seal_reasoning = seal_reasoning
        self._include_encrypted = include_encrypted_reasoning
        # The state of the reasoning item being closed (set just before `_close_open`).
        self._reasoning_state: dict[str, Any] | None = None
        # Functions of namespace tools, by their upstream names: (namespace, name).
        self._namespaced = namespaced or {}
        # Custom tools by their upstream names: their calls are custom_tool_call items, whose
        # input arrives as the arguments {"input": ...} and is sent whole when the call ends.
        self._custom = custom_tools
        # The function a client-run tool search is offered as: its calls are tool_search_call
        # items, whose arguments are an object, known when the call ends.
        self._search = search_function
        # Functions Relay runs (relay.engine.server_tools), by upstream name; their calls
        # become server items, left open for the tool loop (`end_turn`).
        self._server = server_functions or {}
        self._server_calls: list[ServerCall] = []  # this turn's, closed, not yet run
        # Server items run by the loop, and items the upstream runs (HostedItem), not done.
        self._running: list[dict[str, Any]] = []
        self._hosted_open: dict[str, dict[str, Any]] = {}  # by the upstream's id
        self.client_calls = 0  # calls this turn the client must run
        self.approvals = 0  # approval requests this turn
        # What earlier turns of the tool loop used; and the URLs their searches found, with
        # their titles, which the answer's text is cited against.
        self._usage_before: UsageDelta | None = None
        self.citable: dict[str, str] = {}
        # The arguments of custom and search calls, held until the call ends, by upstream index.
        self._held_arguments: dict[int, str] = {}
        # One random filler a response, sliced per delta: the padding hides lengths by its
        # length, so its characters need not be fresh (a urandom call per delta was 3% of a
        # stream's CPU).
        self._filler = secrets.token_urlsafe(12) if obfuscate else ""
        self._open: dict[str, Any] | None = None  # the open message or reasoning item
        self._part: dict[str, Any] | None = None  # its open content/summary part
        self._calls: dict[int, dict[str, Any]] = {}  # open function calls by upstream index
        self._ignored_calls: set[int] = set()
        self._calls_made = 0
        self._finish = "stop"
        self._usage: UsageDelta | None = None

    # Events ---------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event

    def _pad(self, delta: str) -> dict[str, str]:
        """OpenAI's stream obfuscation: random filler so that every delta event has about the
        same size, which hides token lengths from an observer of encrypted traffic."""
        if not self._filler:
            return {}
        return {"obfuscation": self._filler[: 1 + (-len(delta)) % 16]}

    def _snapshot_event(self, kind: str) -> Event:
        # Shallow copy: later events mutate `output` and `status` of the live response.
        snapshot = dict(self.response)
        snapshot["output"] = list(self.response["output"])
        return self._event(kind, response=snapshot)

    def start(self) -> list[Event]:
        return [
            self._snapshot_event("response.created"),
            self._snapshot_event("response.in_progress"),
        ]

    # Deltas ---------------------------------------------------------------------------------

    def feed(self, delta: Delta) -> list[Event]:
        if isinstance(delta, TextDelta):
            return self._text("output_text", delta.text, delta.logprobs)
        if isinstance(delta, RefusalDelta):
            return self._text("refusal", delta.text, None)
        if isinstance(delta, ReasoningDelta):
            return self._reasoning(delta.text)
        if isinstance(delta, ReasoningState):
            return self._reasoning_state_of(delta.state)
        if isinstance(delta, AnnotationDelta):
            return self._annotation(delta.annotation)
        if isinstance(delta, HostedItem):
            return self._hosted(delta)
        if isinstance(delta, HostedProgress):
            return self._hosted_progress(delta)
        if isinstance(delta, ImageDelta):
            return self._image(delta)
        if isinstance(delta, ToolCallDelta):
            return self._tool_call(delta)
        if isinstance(delta, UsageDelta):
            self._usage = delta
            return []
        if isinstance(delta, FinishDelta):
            self._finish = delta.reason
            return []
        raise TypeError(f"unknown delta {delta!r}")

    def _add_item(self, item: dict[str, Any]) -> Event:
        self.response["output"].append(item)
        return self._event(
            "response.output_item.added",
            output_index=len(self.response["output"]) - 1,
            item=_copy(item),
        )

    def _index_of(self, item: dict[str, Any]) -> int:
        output: list[dict[str, Any]] = self.response["output"]
        for index in range(len(output) - 1, -1, -1):
            if output[index] is item:
                return index
        raise ValueError("item is not in the output")

    def _text(self, kind: str, text: str, logprobs: list[dict[str, Any]] | None) -> list[Event]:
        events: list[Event] = []
        item = self._open
        if item is None or item["type"] != "message":
            events += self._close_all("completed")
            item = {
                "id": new_id("msg"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self._open = item
            events.append(self._add_item(item))
        index = self._index_of(item)
        part = self._part
        if part is None or part["type"] != kind:
            if part is not None:
                events += self._close_part(item, index)
            part = (
                {"type": "output_text", "text": "", "annotations": []}
                if kind == "output_text"
                else {"type": "refusal", "refusal": ""}
            )
            if kind == "output_text" and self._logprobs:
                part["logprobs"] = []
            item["content"].append(part)
            self._part = part
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=len(item["content"]) - 1,
                    part=_copy_part(part),
                )
            )
        content_index = len(item["content"]) - 1
        if kind == "output_text":
            part["text"] += text
            chosen = logprobs if self._logprobs and logprobs else []
            if chosen:
                part["logprobs"].extend(chosen)
            events.append(
                self._event(
                    "response.output_text.delta",
                    item_id=item["id"],
                    output_index=index,
                    content_index=content_index,
                    delta=text,
                    logprobs=chosen,
                    **self._pad(text),
                )
            )
        else:
            part["refusal"] += text
            events.append(
                self._event(
                    "response.refusal.delta",
                    item_id=item["id"],
                    output_index=index,
                    content_index=content_index,
                    delta=text,
                )
            )
        return events

    def _reasoning_state_of(self, state: dict[str, Any]) -> list[Event]:
        """Attach `state` to the open reasoning item, which it ends; with none open (a
        redacted block), it is a reasoning item of its own, without text."""
        events: list[Event] = []
        item = self._open
        if item is None or item["type"] != "reasoning":
            events += self._close_all("completed")
            item = {"id": new_id("rs"), "type": "reasoning", "status": "in_progress", "summary": []}
            self._open = item
            events.append(self._add_item(item))
        self._reasoning_state = state
        return events + self._close_open("completed")

    def _annotation(self, annotation: dict[str, Any]) -> list[Event]:
        item, part = self._open, self._part
        if item is None or part is None or part["type"] != "output_text":
            return []  # nothing to annotate: the upstream's text never came
        part["annotations"].append(annotation)
        return [
            self._event(
                "response.output_text.annotation.added",
                item_id=item["id"],
                output_index=self._index_of(item),
                content_index=len(item["content"]) - 1,
                annotation_index=len(part["annotations"]) - 1,
                annotation=dict(annotation),
            )
        ]

    def _hosted(self, delta: HostedItem) -> list[Event]:
        """An item the upstream runs (web_search_call, image_generation_call, ...): added as
        the upstream opens it, done as it ends; or whole, added then done, where it came so
        (an answer that was not streamed)."""
        opened = self._hosted_open.pop(delta.item.get("id", ""), None)
        if opened is not None:
            self._running.remove(opened)
            opened.clear()
            opened.update(delta.item)
            index = self._index_of(opened)
            return [
                self._event("response.output_item.done", output_index=index, item=_copy(opened))
            ]
        item = dict(delta.item)
        events = self._close_all("completed")
        if delta.done:
            return events + self._whole(item, (), item.get("status", "completed"))
        self._hosted_open[item.get("id", "")] = item
        self._running.append(item)  # ended as cut short if the response ends before it does
        return [*events, self._add_item(item)]

    def _hosted_progress(self, delta: HostedProgress) -> list[Event]:
        """An event of an item the upstream runs, as it sent it (a partial image with its
        data), under Relay's numbering."""
        item = self._hosted_open.get(delta.item_id)
        if item is None:
            return []  # of no item it opened: nothing to tell of
        return [
            self._event(
                delta.kind, **delta.fields, item_id=item["id"], output_index=self._index_of(item)
            )
        ]

    def _image(self, delta: ImageDelta) -> list[Event]:
        """An image the upstream drew in its answer: an image_generation_call, whole, with
        the events OpenAI streams for one."""
        item = {"id": new_id("ig"), "type": "image_generation_call", "status": "completed"}
        item["result"] = delta.result
        if delta.output_format is not None:
            item["output_format"] = delta.output_format
        progress = [f"response.image_generation_call.{stage}" for stage in _IMAGE_STAGES]
        return self._close_all("completed") + self._whole(item, progress, "completed")

    def _whole(
        self, item: dict[str, Any], progress: Sequence[str], status: str | None
    ) -> list[Event]:
        """A finished item: added (in progress, when it has a status; an image without its
        data, which comes once, with the item's end, as OpenAI sends it), its progress events,
        done."""
        if status is not None:
            item["status"] = "in_progress"
        result = item.pop("result", None)
        events = [self._add_item(item)]
        if result is not None:
            item["result"] = result
        index = self._index_of(item)
        for kind in progress:
            events.append(self._event(kind, item_id=item["id"], output_index=index))
        if status is not None:
            item["status"] = status
        events.append(
            self._event("response.output_item.done", output_index=index, item=_copy(item))
        )
        return events

    def _reasoning(self, text: str) -> list[Event]:
        events: list[Event] = []
        item = self._open
        if item is None or item["type"] != "reasoning":
            events += self._close_all("completed")
            item = {"id": new_id("rs"), "type": "reasoning", "status": "in_progress", "summary": []}
            if not self._as_summary:
                item["content"] = []
            self._open = item
            events.append(self._add_item(item))
            index = self._index_of(item)
            if self._as_summary:
                part = {"type": "summary_text", "text": ""}
                item["summary"].append(part)
                events.append(
                    self._event(
                        "response.reasoning_summary_part.added",
                        item_id=item["id"],
                        output_index=index,
                        summary_index=0,
                        part=_copy_part(part),
                    )
                )
            else:
                part = {"type": "reasoning_text", "text": ""}
                item["content"].append(part)
                events.append(
                    self._event(
                        "response.content_part.added",
                        item_id=item["id"],
                        output_index=index,
                        content_index=0,
                        part=_copy_part(part),
                    )
                )
            self._part = part
        assert self._part is not None
        self._part["text"] += text
        index = self._index_of(item)
        if self._as_summary:
            events.append(
                self._event(
                    "response.reasoning_summary_text.delta",
                    item_id=item["id"],
                    output_index=index,
                    summary_index=0,
                    delta=text,
                    **self._pad(text),
                )
            )
        else:
            events.append(
                self._event(
                    "response.reasoning.delta",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    delta=text,
                    **self._pad(text),
                )
            )
        return events

    def _tool_call(self, delta: ToolCallDelta) -> list[Event]:
        if delta.index in self._ignored_calls:
            return []
        events: list[Event] = []
        item = self._calls.get(delta.index)
        if item is None:
            if delta.name is None:
                raise ToolPolicyViolation("the upstream streamed tool-call arguments before a name")
            if delta.name not in self._offered_tools:
                raise ToolPolicyViolation(
                    f"the model called '{delta.name}', which tool_choice does not allow"
                )
            over_parallel = not self._parallel and self._calls_made >= 1
            over_budget = self._max_calls is not None and self._calls_made >= self._max_calls
            if over_parallel or over_budget:
                # Enforced here because upstreams treat these settings as hints.
                self._ignored_calls.add(delta.index)
                return []
            if self._open is not None:
                events += self._close_open("completed")
            self._calls_made += 1
            item = self._call_item(delta.name, delta.call_id or new_id("call"))
            kind = item["type"]
            if kind not in _STREAMED_ARGUMENTS:
                self._held_arguments[delta.index] = ""
            self._calls[delta.index] = item
            events.append(self._add_item(item))
            if kind in _IN_PROGRESS:
                events.append(
                    self._event(
                        _IN_PROGRESS[kind], item_id=item["id"], output_index=self._index_of(item)
                    )
                )
            if kind == "mcp_approval_request":
                self.approvals += 1
            elif kind in _CLIENT_CALLS:
                self.client_calls += 1
        if delta.index in self._held_arguments:
            self._held_arguments[delta.index] += delta.arguments
        elif delta.arguments:
            item["arguments"] += delta.arguments
            if item["type"] == "mcp_call":
                event = self._event(
                    "response.mcp_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self._index_of(item),
                    delta=delta.arguments,
                )
            else:
                event = self._event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=self._index_of(item),
                    delta=delta.arguments,
                    **self._pad(delta.arguments),
                )
            events.append(event)
        return events

    def _call_item(self, name: str, call_id: str) -> dict[str, Any]:
        """A new call's item, in the shape of the tool the client declared."""
        server = self._server.get(name)
        if server is not None:
            return _server_item(server)
        if name == self._search:
            # OpenAI streams no events of a tool search's own: added, then done.
            return {
                "id": new_id("tsc"),
                "type": "tool_search_call",
                "status": "in_progress",
                "call_id": call_id,
                "execution": "client",
                "arguments": {},
            }
        custom = name in self._custom
        item = {
            "id": new_id("ctc" if custom else "fc"),
            "type": "custom_tool_call" if custom else "function_call",
            "status": "in_progress",
            "call_id": call_id,
            "name": name,
            "input" if custom else "arguments": "",
        }
        if name in self._namespaced:
            # Back under the names the client gave: the namespace and the function's own.
            item["namespace"], item["name"] = self._namespaced[name]
        return item

    # Closing --------------------------------------------------------------------------------

    def _close_part(self, item: dict[str, Any], index: int) -> list[Event]:
        part = self._part
        assert part is not None
        self._part = None
        ids = {"item_id": item["id"], "output_index": index}
        if part["type"] == "output_text":
            ci = len(item["content"]) - 1
            cited = self._cite(part, ids, ci) if self.citable else []
            return [
                *cited,
                self._event(
                    "response.output_text.done",
                    **ids,
                    content_index=ci,
                    text=part["text"],
                    logprobs=part.get("logprobs", []),
                ),
                self._event(
                    "response.content_part.done", **ids, content_index=ci, part=_copy_part(part)
                ),
            ]
        if part["type"] == "refusal":
            ci = len(item["content"]) - 1
            return [
                self._event(
                    "response.refusal.done", **ids, content_index=ci, refusal=part["refusal"]
                ),
                self._event(
                    "response.content_part.done", **ids, content_index=ci, part=_copy_part(part)
                ),
            ]
        if part["type"] == "summary_text":
            return [
                self._event(
                    "response.reasoning_summary_text.done",
                    **ids,
                    summary_index=0,
                    text=part["text"],
                ),
                self._event(
                    "response.reasoning_summary_part.done",
                    **ids,
                    summary_index=0,
                    part=_copy_part(part),
                ),
            ]
        return [
            self._event("response.reasoning.done", **ids, content_index=0, text=part["text"]),
            self._event(
                "response.content_part.done", **ids, content_index=0, part=_copy_part(part)
            ),
        ]

    def _cite(self, part: dict[str, Any], ids: dict[str, Any], content_index: int) -> list[Event]:
        """url_citation annotations where the text names a URL a web search of this response
        found (a markdown link to it is cited whole)."""
        text: str = part["text"]
        found = []
        for url, title in self.citable.items():
            start = text.find(url)
            while start != -1:
                end = start + len(url)
                link = text.rfind("](", 0, start + 1)
                opening = text.rfind("[", 0, link) if link == start - 2 else -1
                if opening != -1 and text.startswith(")", end):
                    found.append((opening, end + 1, url, title))
                else:
                    found.append((start, end, url, title))
                start = text.find(url, end)
        events = []
        for start, end, url, title in sorted(found):
            annotation = {
                "type": "url_citation",
                "start_index": start,
                "end_index": end,
                "url": url,
                "title": title,
            }
            part["annotations"].append(annotation)
            events.append(
                self._event(
                    "response.output_text.annotation.added",
                    **ids,
                    content_index=content_index,
                    annotation_index=len(part["annotations"]) - 1,
                    annotation=dict(annotation),
                )
            )
        return events

    def _close_open(self, status: str) -> list[Event]:
        item = self._open
        if item is None:
            return []
        index = self._index_of(item)
        events = self._close_part(item, index) if self._part is not None else []
        self._open = None
        item["status"] = status
        if item["type"] == "reasoning":
            state, self._reasoning_state = self._reasoning_state, None
            if self._seal_reasoning is not None and (state or self._include_encrypted):
                item["encrypted_content"] = self._seal_reasoning(reasoning.text_of(item), state)
        events.append(
            self._event("response.output_item.done", output_index=index, item=_copy(item))
        )
        return events

    def _close_calls(self, status: str) -> list[Event]:
        events: list[Event] = []
        for index in sorted(self._calls):
            item = self._calls[index]
            output_index = self._index_of(item)
            kind = item["type"]
            if kind in _SERVER_ITEMS:
                held = self._held_arguments.pop(index, None)
                events += self._close_server_call(item, output_index, status, held)
                continue
            item["status"] = status
            if kind == "tool_search_call":
                item["arguments"] = _search_arguments(self._held_arguments.pop(index))
            elif item["type"] == "custom_tool_call":
                events += self._custom_input(item, output_index, self._held_arguments.pop(index))
            else:
                events.append(
                    self._event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=output_index,
                        name=item["name"],
                        arguments=item["arguments"],
                    )
                )
            events.append(
                self._event("response.output_item.done", output_index=output_index, item=dict(item))
            )
        self._calls.clear()
        return events

    def _close_server_call(
        self, item: dict[str, Any], output_index: int, status: str, held: str | None
    ) -> list[Event]:
        """A server-run tool's call, its arguments complete: an approval request is done; a
        call to run waits for the tool loop (done in `server_call_done`), unless the turn
        ended short of it."""
        kind = item["type"]
        events: list[Event] = []
        if kind == "mcp_approval_request":
            item["arguments"] = held or ""
        elif kind == "web_search_call":
            item["action"]["query"] = _search_query(held or "")
        elif kind == "image_generation_call":
            # What the model asked for is the prompt the image is drawn from: OpenAI's
            # revised_prompt, the mainline model's rewrite of the user's request.
            item["revised_prompt"] = _argument(held or "", "prompt")
        else:
            events.append(
                self._event(
                    "response.mcp_call_arguments.done",
                    item_id=item["id"],
                    output_index=output_index,
                    arguments=item["arguments"],
                )
            )
        if kind != "mcp_approval_request":
            if status == "completed":
                self._server_calls.append(ServerCall(item))
                self._running.append(item)
                return events
            item["status"] = status
        events.append(
            self._event("response.output_item.done", output_index=output_index, item=_copy(item))
        )
        return events

    def _custom_input(self, item: dict[str, Any], output_index: int, arguments: str) -> list[Event]:
        """A custom tool call's input, from the arguments the upstream sent: the string of
        {"input": ...}, or the arguments as they are when they are not that shape."""
        try:
            value = json.loads(arguments)
        except ValueError:
            value = None
        text = value.get("input") if isinstance(value, dict) else None
        item["input"] = text if isinstance(text, str) else arguments
        ids = {"item_id": item["id"], "output_index": output_index}
        events = []
        if item["input"]:
            events.append(
                self._event("response.custom_tool_call_input.delta", **ids, delta=item["input"])
            )
        events.append(
            self._event("response.custom_tool_call_input.done", **ids, input=item["input"])
        )
        return events

    def _close_all(self, status: str) -> list[Event]:
        return self._close_open(status) + self._close_calls(status)

    # Terminal -------------------------------------------------------------------------------

    def _usage_dict(self) -> dict[str, Any]:
        usage = _added(self._usage_before, self._usage) or UsageDelta(0, 0)
        return {
            "input_tokens": usage.input_tokens,
            "input_tokens_details": {"cached_tokens": usage.cached_tokens}
            | (
                {"cache_write_tokens": usage.cache_write_tokens} if usage.cache_write_tokens else {}
            ),
            "output_tokens": usage.output_tokens,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
            "total_tokens": usage.input_tokens + usage.output_tokens,
        }

    @property
    def finish_reason(self) -> str:
        """The upstream's finish reason ("stop", "length", "tool_calls"...), "stop" until it
        says."""
        return self._finish

    # The tool loop ------------------------------------------------------------------------

    def opening(self, calls: list[ServerCall]) -> list[Event]:
        """Items made before the first turn (a server's tool list, an approved call), whole."""
        events: list[Event] = []
        for call in calls:
            events += self._whole(call.item, call.progress, call.item.get("status"))
        return events

    def end_turn(self) -> tuple[list[Event], list[ServerCall]]:
        """One model turn of the tool loop is over: what was open closes, its usage joins
        the earlier turns', and the server calls it made are handed over to be run."""
        events = self._close_all("completed")
        self._usage_before, self._usage = _added(self._usage_before, self._usage), None
        calls, self._server_calls = self._server_calls, []
        return events, calls

    def add_usage(self, usage: dict[str, Any]) -> None:
        """What a turn made for this response before its first cost (compaction's summary)."""
        turn = UsageDelta(
            usage.get("input_tokens") or 0,
            usage.get("output_tokens") or 0,
            (usage.get("input_tokens_details") or {}).get("cached_tokens") or 0,
            (usage.get("output_tokens_details") or {}).get("reasoning_tokens") or 0,
        )
        self._usage_before = _added(self._usage_before, turn)

    def next_turn(self) -> None:
        """Another model turn begins: its counts start from nothing."""
        self.client_calls = self.approvals = 0
        self._finish = "stop"

    def server_call_started(self, call: ServerCall) -> list[Event]:
        kind = _STARTED.get(call.item["type"])
        if kind is None:
            return []
        return [self._event(kind, item_id=call.item["id"], output_index=self._index_of(call.item))]

    def server_call_progress(self, call: ServerCall, fields: dict[str, Any]) -> list[Event]:
        """A partial image of a server-run image call, as it is drawn."""
        item = call.item
        return [
            self._event(
                "response.image_generation_call.partial_image",
                item_id=item["id"],
                output_index=self._index_of(item),
                **fields,
            )
        ]

    def server_call_done(self, call: ServerCall) -> list[Event]:
        """A server call ran (its item's status, output or error set by the loop)."""
        item = call.item
        self._running.remove(item)
        index = self._index_of(item)
        kind = item["type"]
        events = []
        if kind == "mcp_call":
            done = "completed" if item["status"] == "completed" else "failed"
            events.append(f"response.mcp_call.{done}")
        elif kind == "web_search_call":
            events.append("response.web_search_call.completed")
        elif item["status"] == "completed":  # OpenAI has no event for an image that failed
            events.append("response.image_generation_call.completed")
        return [
            *(self._event(event, item_id=item["id"], output_index=index) for event in events),
            self._event("response.output_item.done", output_index=index, item=_copy(item)),
        ]

    def _stop_running(self, status: str) -> list[Event]:
        """Server calls, and items the upstream runs, cut short (the response failed or was
        cancelled meanwhile, or the upstream ended without ending them)."""
        events = []
        self._hosted_open.clear()
        for item in self._running:
            # Web search and image calls have no "incomplete": theirs is "failed".
            item["status"] = "failed" if item["type"] in _NEVER_INCOMPLETE else status
            events.append(
                self._event(
                    "response.output_item.done", output_index=self._index_of(item), item=_copy(item)
                )
            )
        self._running.clear()
        return events

    @property
    def calls_made(self) -> int:
        return self._calls_made

    @property
    def max_calls(self) -> int | None:
        return self._max_calls

    def cut_short(self, reason: str) -> None:
        """End the response as incomplete for `reason` (a finish reason, as an upstream's)."""
        self._finish = reason

    @property
    def finish_incomplete(self) -> bool:
        """The turn ended short (its output cut by a limit): the loop goes no further."""
        return self._finish in _INCOMPLETE

    def finish(self) -> list[Event]:
        """Close what is open and settle the outcome from the upstream's finish reason. The
        terminal events come from `terminal()`, once the response is stored."""
        reason = _INCOMPLETE.get(self._finish)
        if reason is not None:
            events = self._close_all("incomplete") + self._stop_running("incomplete")
            self.response["status"] = "incomplete"
            self.response["incomplete_details"] = {"reason": reason}
        else:
            if self._must_call and self._calls_made == 0:
                raise ToolPolicyViolation("tool_choice requires a tool call; the model made none")
            events = self._close_all("completed") + self._stop_running("incomplete")
            self.response["status"] = "completed"
            self.response["completed_at"] = int(time.time())
        self._settle()
        return events

    def fail(self, code: str, message: str) -> list[Event]:
        """Close what is open as incomplete and settle the response as failed."""
        events = self._close_all("incomplete") + self._stop_running("failed")
        self.mark_failed(code, message)
        return events

    def mark_failed(self, code: str, message: str) -> None:
        self.response["status"] = "failed"
        self.response["completed_at"] = None
        self.response["error"] = {"code": code, "message": message}
        self._settle()

    def cancel(self) -> None:
        """The client went away mid-run: record where it stopped; there is nobody to tell."""
        self._close_all("incomplete")
        self._stop_running("incomplete")
        self.response["status"] = "cancelled"
        self._settle()

    def _settle(self) -> None:
        self.response["usage"] = self._usage_dict()
        self.response["output_text"] = output_text(self.response["output"])

    def terminal(self) -> list[Event]:
        """Exactly one terminal event (after an error event when the response failed)."""
        status = self.response["status"]
        if status == "failed":
            error = self.response["error"]
            return [
                error_event(self._next_sequence(), "server_error", error["code"], error["message"]),
                self._event("response.failed", response=self.response),
            ]
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return [self._event(kind, response=self.response)]

    def _next_sequence(self) -> int:
        self._seq += 1
        return self._seq - 1


def error_event(sequence_number: int, error_type: str, code: str | None, message: str) -> Event:
    """The `error` stream event: Open Responses nests the payload; OpenAI's SDKs read the
    top-level copy of code, message and param."""
    return {
        "type": "error",
        "sequence_number": sequence_number,
        "error": {"type": error_type, "code": code, "message": message, "param": None},
        "code": code,
        "message": message,
        "param": None,
    }


def _search_arguments(arguments: str) -> Any:
    """A tool search's arguments as the object the client reads; as sent when they are not
    JSON (the client's search says what it makes of them)."""
    try:
        return json.loads(arguments or "{}")
    except ValueError:
        return arguments


def _copy_part(part: dict[str, Any]) -> dict[str, Any]:
    """A copy deep enough that later deltas do not change an event already built."""
    return {key: list(value) if isinstance(value, list) else value for key, value in part.items()}


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    copied = dict(item)
    for key in ("content", "summary"):
        if key in copied:
            copied[key] = [_copy_part(part) for part in copied[key]]
    return copied


# Call items whose arguments stream as they come (the others' are held until the call ends).
_STREAMED_ARGUMENTS = frozenset({"function_call", "mcp_call"})
_IN_PROGRESS = {
    "mcp_call": "response.mcp_call.in_progress",
    "web_search_call": "response.web_search_call.in_progress",
    "image_generation_call": "response.image_generation_call.in_progress",
}
# What a server call's start tells, as the tool loop runs it.
_STARTED = {
    "web_search_call": "response.web_search_call.searching",
    "image_generation_call": "response.image_generation_call.generating",
}
_IMAGE_STAGES = ("in_progress", "generating", "completed")
_CLIENT_CALLS = frozenset({"function_call", "custom_tool_call", "tool_search_call"})
_SERVER_ITEMS = frozenset(
    {"mcp_call", "mcp_approval_request", "web_search_call", "image_generation_call"}
)
_NEVER_INCOMPLETE = frozenset({"web_search_call", "image_generation_call"})


def _server_item(function: ServerFunction) -> dict[str, Any]:
    if function.kind == "image_generation":
        return {"id": new_id("ig"), "type": "image_generation_call", "status": "in_progress"}
    if function.kind == "web_search":
        return {
            "id": new_id("ws"),
            "type": "web_search_call",
            "status": "in_progress",
            "action": {"type": "search", "query": ""},
        }
    if function.approval:
        return {
            "id": new_id("mcpr"),
            "type": "mcp_approval_request",
            "server_label": function.label,
            "name": function.name,
            "arguments": "",
        }
    return {
        "id": new_id("mcp"),
        "type": "mcp_call",
        "status": "in_progress",
        "server_label": function.label,
        "name": function.name,
        "arguments": "",
    }


def _search_query(arguments: str) -> str:
    """The query of a web search call's arguments ({"query": ...}); as sent when they are
    not that shape (the search runs on what the model wrote)."""
    return _argument(arguments, "query")


def _argument(arguments: str, name: str) -> str:
    """The string argument `name` of a call's arguments; the arguments as sent when they are
    not that shape (the tool runs on what the model wrote)."""
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return arguments
    found = value.get(name) if isinstance(value, dict) else None
    return found if isinstance(found, str) else arguments


def _added(before: UsageDelta | None, now: UsageDelta | None) -> UsageDelta | None:
    """Two turns' usage, summed."""
    if before is None or now is None:
        return now if before is None else before
    return UsageDelta(
        before.input_tokens + now.input_tokens,
        before.output_tokens + now.output_tokens,
        before.cached_tokens + now.cached_tokens,
        before.reasoning_tokens + now.reasoning_tokens,
        before.cache_write_tokens + now.cache_write_tokens,
    )
