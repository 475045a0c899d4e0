"""Generated images (`image_generation_call` items) as upstreams read them, and the images
upstreams answer with.

An image is stored once, as its item's `result`. A later turn does not send it upstream
again: the model reads a short reference (`reference`) where the image was, in the assistant's
turn. Pixels are only worth their size to a model that edits the image, and only a Responses
upstream that runs `image_generation` itself can: it gets the chain's latest image whole
(relay.providers.openai_responses).
"""

from __future__ import annotations

from typing import Any

ITEM = "image_generation_call"
# Media types chat upstreams write in their images' data URLs, as the item's output_format.
_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/webp": "webp"}
_PROMPT_CHARS = 300  # of the prompt a reference repeats: enough to say what the image shows


def reference(item: dict[str, Any]) -> str:
    """What a model reads of an image generated earlier: "[image generated: ig_..., 1024x1024
    png: <its prompt>]"; a failed one says so."""
    what = "image generated" if item.get("status") == "completed" else "image not generated"
    details = [str(item[key]) for key in ("size", "output_format") if item.get(key)]
    text = f"[{what}: {item['id']}"
    if details:
        text += f", {' '.join(details)}"
    prompt = item.get("revised_prompt")
    if isinstance(prompt, str) and prompt.strip():
        prompt = " ".join(prompt.split())
        cut = prompt if len(prompt) <= _PROMPT_CHARS else prompt[: _PROMPT_CHARS - 1] + "…"
        text += f": {cut}"
    return text + "]"


def from_data_url(url: str) -> tuple[str, str | None]:
    """(base64 data, output format) of a `data:image/...;base64,` URL; ValueError for anything
    else (an https URL: Relay fetches nothing on an upstream's word)."""
    head, comma, data = url.partition(",")
    if not comma or not head.startswith("data:") or not head.endswith(";base64"):
        raise ValueError("not a base64 data URL")
    media = head[len("data:") : -len(";base64")].lower()
    return data, _FORMATS.get(media)
