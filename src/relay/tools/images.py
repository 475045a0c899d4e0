"""Image generation for the hosted `image_generation` tools of any model, through the images
endpoint the operator configured (`relay.models.tools.ImagesSettings`): OpenAI's
`POST /images/generations`, one image a call, its data as base64. With partial images asked
for, the endpoint streams (`stream: true`), and each partial image is handed on as it comes.

HTTP is Relay's upstream client (`relay.providers.upstream`: pooled keep-alive connections,
verified HTTPS, the environment's proxy, every credential scrubbed from what the endpoint
says), so a failure's text is safe to show a client.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import orjson

from relay.models.tools import ImagesSettings
from relay.providers.base import ProviderError
from relay.providers.http_client import HTTPClientError, Response
from relay.providers.upstream import Upstream, error_message, loads

MAX_CONNECTIONS = 64  # per process; more images at once wait for one
# What the endpoint says it drew with, kept on the item and its partial images' events.
SETTINGS = ("size", "quality", "background", "output_format")
Partial = Callable[[dict[str, Any]], None]


class ImageFailed(Exception):
    """An image the endpoint did not give: the text says why, safe to show a client (never
    the key)."""


@dataclass(frozen=True, slots=True)
class Image:
    result: str  # base64
    # What the endpoint said it used (SETTINGS) and, where it rewrote the prompt, its
    # revised_prompt.
    settings: dict[str, Any]


class ImagesBackend:
    def __init__(self, config: ImagesSettings) -> None:
        """Raises ValueError when the variable its key is read from is not set."""
        try:
            key = config.api_key()
        except ValueError as error:
            raise ValueError(f"images endpoint: {error}") from None
        self._upstream = Upstream(
            config.url,
            api_key=key,
            timeout_s=config.timeout_s,
            deployment="tools.images",
            key_env=config.api_key_env,
            max_connections=MAX_CONNECTIONS,
        )
        self._target = self._upstream.target("/images/generations")
        self._model = config.model
        self._response_format = config.response_format

    async def aclose(self) -> None:
        await self._upstream.aclose()

    async def generate(self, prompt: str, options: Mapping[str, Any], on_partial: Partial) -> Image:
        """One image of `prompt`. `options`: the tool's fields the endpoint takes (size,
        quality, partial_images...); with partial_images, each partial image goes to
        `on_partial` as it comes (the fields of a Responses partial_image event). Raises
        ImageFailed."""
        body = {"model": self._model, "prompt": prompt, "n": 1, **options}
        if self._response_format != "omit":
            body["response_format"] = self._response_format
        if options.get("partial_images"):
            body["stream"] = True
        try:
            response = await self._upstream.post(self._target, orjson.dumps(body))
            if response.headers.get("content-type", "").startswith("text/event-stream"):
                return await self._streamed(response, on_partial)
            return _image(await self._answer(response))
        except ProviderError as error:
            raise ImageFailed(f"the images endpoint failed: {error.message}") from None
        except (AttributeError, IndexError, KeyError, TypeError, ValueError):
            raise ImageFailed(
                "the images endpoint answered with JSON Relay could not read"
            ) from None

    async def _answer(self, response: Response) -> Any:
        try:
            raw = await response.read()
        except HTTPClientError as exc:
            raise self._upstream.transport_error(exc) from None
        finally:
            response.release()
        return loads(raw)

    async def _streamed(self, response: Response, on_partial: Partial) -> Image:
        async with aclosing(self._upstream.events(response)) as events:
            async for event in events:
                kind = event.get("type")
                if kind == "image_generation.partial_image":
                    on_partial(
                        {
                            "partial_image_b64": event["b64_json"],
                            "partial_image_index": int(event["partial_image_index"]),
                            **_settings(event),
                        }
                    )
                elif kind == "image_generation.completed":
                    return Image(event["b64_json"], _settings(event))
                elif kind == "error" or "error" in event:
                    message = self._upstream.quote(error_message(orjson.dumps(event)))
                    raise ImageFailed(f"the images endpoint failed mid-stream: {message}")
        raise ImageFailed("the images endpoint's stream ended before its image")


def _image(answer: Any) -> Image:
    """The image of an ImagesResponse: {"data": [{"b64_json", "revised_prompt"}], "size",
    ...}."""
    data = answer["data"][0]
    if not data.get("b64_json"):
        if data.get("url"):
            raise ImageFailed(
                "the images endpoint answered with a URL, not the image's data: set its "
                'response_format = "b64_json"'
            )
        raise ImageFailed("the images endpoint answered without an image")
    settings = _settings(answer)
    if data.get("revised_prompt"):
        settings["revised_prompt"] = data["revised_prompt"]
    return Image(data["b64_json"], settings)


def _settings(answer: dict[str, Any]) -> dict[str, Any]:
    return {key: answer[key] for key in SETTINGS if answer.get(key) is not None}
