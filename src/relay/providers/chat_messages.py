"""Responses items to chat-completions messages, for every provider that speaks chat messages
(the OpenAI-compatible upstreams and the embedded llama.cpp model).

Nothing is dropped silently: an item or part that chat messages cannot carry raises a
non-retryable `ProviderError` (400, `unsupported_input`) before anything is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from relay.protocol import HOSTED_ITEM_TYPES, TOOL_SEARCH_ITEM_TYPES
from relay.providers import images
from relay.providers.base import ProviderError, ProviderRequest
from relay.providers.tool_names import search_as_function, wire_name


def build_messages(
    instructions: str | None, items: list[dict[str, Any]], search: str | None = None
) -> list[dict[str, Any]]:
    """Responses items to chat messages; `search`: the function a client-run tool search is
    offered as (ProviderRequest.search_function)."""
    transcript = ChatTranscript(search=search)._continued(items)
    transcript._flush()
    system = [{"role": "system", "content": instructions}] if instructions else []
    return system + transcript._fresh  # nothing was encoded: it started empty


def chat_messages_json(
    request: ProviderRequest, instructions: str | None, *, replay_reasoning: bool = False
) -> bytes:
    """The request's context as a JSON array of chat messages, after `instructions` as the
    system message. A stored chain's history (request.history) is translated and encoded once
    and extended turn after turn, so a long conversation costs each turn its new items plus a
    copy of bytes, not a pass over every earlier message. `replay_reasoning`: reasoning items
    go back as `reasoning_content` on the assistant message they precede (upstreams that take
    it); else they are left out."""
    history = request.history
    search = request.search_function
    empty = ChatTranscript(replay_reasoning=replay_reasoning, search=search)
    key = ("chat+reasoning" if replay_reasoning else "chat") + (f":{search}" if search else "")
    transcript = empty if history is None else history.derive(key, ChatTranscript.extended, empty)
    return transcript.json(instructions, request.items)


class ChatTranscript:
    """Chat messages for a run of items, built so that it can be continued with more items.

    A run of assistant-side items (messages and function calls, with reasoning skipped in
    between) becomes ONE assistant message: chat has no other way to attach tool calls to text,
    and templates such as Mistral's reject two assistant messages in a row. That message stays
    pending (`_texts`, `_calls`) until a non-assistant item or the end closes it, which is why a
    transcript continued later gives exactly the messages of one built in one go. Closed
    messages are kept as JSON (`_encoded`, each followed by a comma).

    A transcript is never changed once built: `extended` returns a new one.
    """

    __slots__ = (
        "_calls",
        "_encoded",
        "_fresh",
        "_reasoning",
        "_replay_reasoning",
        "_search",
        "_texts",
    )

    def __init__(self, *, replay_reasoning: bool = False, search: str | None = None) -> None:
        self._encoded = b""
        self._fresh: list[dict[str, Any]] = []  # closed while continuing, not yet encoded
        self._texts: list[str] = []
        self._calls: list[dict[str, Any]] = []
        self._replay_reasoning = replay_reasoning
        self._reasoning: list[str] = []  # of the pending assistant message
        self._search = search  # the function a client-run tool search is offered as

    def extended(self, items: list[dict[str, Any]]) -> ChatTranscript:
        out = self._continued(items)
        out._encoded += _encode(out._fresh)
        out._fresh = []
        return out

    def json(self, instructions: str | None, more: Sequence[dict[str, Any]] = ()) -> bytes:
        """The messages as a JSON array: the system instructions, the transcript continued
        with `more` items, the pending assistant message closed."""
        out = self._continued(more)
        out._flush()
        system = _encode([{"role": "system", "content": instructions}]) if instructions else b""
        body = system + out._encoded + _encode(out._fresh)
        return b"[" + body.removesuffix(b",") + b"]"

    def _continued(self, items: Sequence[dict[str, Any]]) -> ChatTranscript:
        out = ChatTranscript(replay_reasoning=self._replay_reasoning, search=self._search)
        out._encoded = self._encoded
        out._texts = list(self._texts)
        out._calls = list(self._calls)
        out._reasoning = list(self._reasoning)
        for item in items:
            out._add(item)
        return out

    def _flush(self) -> None:
        pending = _assistant_message(self._texts, self._calls)
        if pending is not None:
            if self._reasoning:
                pending["reasoning_content"] = "\n\n".join(self._reasoning)
            self._fresh.append(pending)
            self._texts = []
            self._calls = []
        self._reasoning = []  # reasoning that no answer followed goes nowhere

    def _add(self, item: dict[str, Any]) -> None:
        kind = item.get("type", "message")
        if kind == images.ITEM:
            self._texts.append(images.reference(item))  # not the image (providers.images)
            return
        if kind in HOSTED_ITEM_TYPES:
            return  # an upstream's hosted call: its results are in the answer's text
        if kind in TOOL_SEARCH_ITEM_TYPES:
            # A search the model was offered (the client runs it) is its call of that
            # function; any other never reached the model, and the tools it loaded are
            # offered in full (plan_tools): to the model they were there all along.
            as_function = search_as_function(item, self._search)
            if as_function is None:
                return
            item, kind = as_function, as_function["type"]
        if kind == "reasoning":
            parts = item.get("content") or item.get("summary") or ()
            text = "".join(part.get("text") or "" for part in parts)
            if self._replay_reasoning and text:
                self._reasoning.append(text)
            return
        if kind == "message" and item.get("role") == "assistant":
            self._texts.append(_assistant_text(item.get("content")))
        elif kind in ("function_call", "custom_tool_call"):
            name = item["name"]
            if item.get("namespace"):
                name = wire_name(item["namespace"], name)
            arguments = (
                item["arguments"]
                if kind == "function_call"
                else orjson.dumps({"input": item["input"]}).decode()
            )
            self._calls.append(
                {
                    "id": item["call_id"],
                    "type": "function",
                    "function": {"name": name, "arguments": arguments},
                }
            )
        elif kind in ("function_call_output", "custom_tool_call_output"):
            self._flush()
            output = item.get("output")
            if not isinstance(output, str):
                parts = list(output or ())
                if any(part.get("type") != "input_text" for part in parts):
                    # Chat tool messages carry text only; dropping the rest would be silent.
                    raise _unsupported("image or file parts in a function_call_output")
                output = "".join(part["text"] for part in parts)
            self._fresh.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "message":
            self._flush()
            role = item.get("role", "user")
            self._fresh.append(
                {
                    "role": "system" if role == "developer" else role,
                    "content": _user_content(item.get("content")),
                }
            )
        else:
            raise _unsupported(f"input item type '{kind}'")


def _encode(messages: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(message) + b"," for message in messages)


def _assistant_message(texts: list[str], calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not texts and not calls:
        return None
    # Chat wants null content beside tool calls, and a string (maybe empty) otherwise.
    content = "\n\n".join(text for text in texts if text) or (None if calls else "")
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = list(calls)
    return message


def _assistant_text(content: Any) -> str:
    # Parts of one assistant message are pieces of one answer, so they join with nothing.
    if isinstance(content, str):
        return content
    pieces = []
    for part in content or ():
        if part.get("type") == "refusal":
            pieces.append(part.get("refusal", ""))
        else:
            pieces.append(part.get("text", ""))
    return "".join(pieces)


def _user_content(content: Any) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    parts = [_chat_part(part) for part in content or ()]
    if all(part["type"] == "text" for part in parts):
        # A plain string is the one form every upstream accepts; separate text parts are
        # separate inputs, so they join with a newline, as vLLM does with a list of text parts.
        return "\n".join(part["text"] for part in parts)
    return parts


def _chat_part(part: dict[str, Any]) -> dict[str, Any]:
    kind = part.get("type")
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": part.get("text", "")}
    if kind == "input_image" and part.get("image_url"):
        image: dict[str, Any] = {"url": part["image_url"]}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file" and part.get("file_data"):
        file = {"filename": part.get("filename"), "file_data": part["file_data"]}
        return {"type": "file", "file": {k: v for k, v in file.items() if v is not None}}
    if kind in ("input_image", "input_file"):
        source = "file_id" if part.get("file_id") else "file_url"
        inline = "image_url" if kind == "input_image" else "file_data"
        raise _unsupported(
            f"an {kind} part given by {source} (the upstream cannot resolve it; send it inline"
            f" as {inline})"
        )
    raise _unsupported(f"content part type '{kind}'")


def _unsupported(what: str) -> ProviderError:
    return ProviderError(
        f"{what} cannot be sent to a chat-completions upstream",
        status=400,
        code="unsupported_input",
        retryable=False,
    )
