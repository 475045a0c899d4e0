"""Responses items to chat-completions messages, for every provider that speaks chat messages
(the OpenAI-compatible upstreams and the embedded llama.cpp model).

Nothing is dropped silently: an item or part that chat messages cannot carry raises a
non-retryable `ProviderError` (400, `unsupported_input`) before anything is sent.
"""

from __future__ import annotations

from typing import Any

from relay.providers.base import ProviderError


def build_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses items to chat messages.

    A run of assistant-side items (messages and function calls, with reasoning skipped in
    between) becomes ONE assistant message: chat has no other way to attach tool calls to text,
    and templates such as Mistral's reject two assistant messages in a row.
    """
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    texts: list[str] = []
    calls: list[dict[str, Any]] = []

    def flush() -> None:
        if texts or calls:
            # Chat wants null content beside tool calls, and a string (maybe empty) otherwise.
            content = "\n\n".join(text for text in texts if text) or (None if calls else "")
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = list(calls)
            messages.append(message)
            texts.clear()
            calls.clear()

    for item in items:
        kind = item.get("type", "message")
        if kind == "reasoning":
            continue  # chat upstreams cannot take reasoning back
        if kind == "message" and item.get("role") == "assistant":
            texts.append(_assistant_text(item.get("content")))
        elif kind == "function_call":
            calls.append(
                {
                    "id": item["call_id"],
                    "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]},
                }
            )
        elif kind == "function_call_output":
            flush()
            output = item.get("output")
            if not isinstance(output, str):
                parts = list(output or ())
                if any(part.get("type") != "input_text" for part in parts):
                    # Chat tool messages carry text only; dropping the rest would be silent.
                    raise _unsupported("image or file parts in a function_call_output")
                output = "".join(part["text"] for part in parts)
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "message":
            flush()
            role = item.get("role", "user")
            messages.append(
                {
                    "role": "system" if role == "developer" else role,
                    "content": _user_content(item.get("content")),
                }
            )
        else:
            raise _unsupported(f"input item type '{kind}'")
    flush()
    return messages


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
