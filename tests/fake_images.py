"""A loopback fake of an OpenAI-compatible images endpoint (`POST /v1/images/generations`),
which Relay calls to run `image_generation` tools for any model, and the small PNGs every
image fake of the tests draws (the chat upstream's `painter`, the Responses upstream's
`image_generation`).

    with FakeImages() as images:        # or the fake_images fixture
        images.base_url                 # up to /v1: what [tools.images] url is
        images.fail(500)                # the endpoint's error answer
        images.requests[-1]             # the JSON body of the last request, and its
        images.headers[-1]              # headers, lower-cased

It answers as OpenAI's images API does, each answer checked against the openai SDK's types
first: `{"created", "data": [{"b64_json", "revised_prompt"}], "size", "quality",
"background", "output_format", "usage"}`; with `stream: true`, server-sent events: one
`image_generation.partial_image` per `partial_images` asked, then `image_generation.completed`.
`response_format: "url"` gets an image URL instead of the data (as servers that default to
URLs answer). It requires the key IMAGES_KEY.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from loopback_server import LoopbackServer, serve_forever
from openai.types import ImageGenCompletedEvent, ImageGenPartialImageEvent, ImagesResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    "IMAGES_KEY",
    "PARTIALS",
    "PNG",
    "FakeImages",
    "fake_images",
    "images_server",
]

# Random, as real keys are: the scrubber redacts any 8 characters of a key.
IMAGES_KEY = "sk-img-lb-4Rt8Wq2Zx6Vn1Km9Jc3Hb7Gd5Fs0Pl"
# 1x1 PNGs: the finished image, and the partial images before it (each a different grey).
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGM4IScHAAK2AQU0pnWqAAAAAElFTkSuQmCC"
PARTIALS = [
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGOoqKgAAALUAWneSzH7AAAAAElFTkSuQmCC",
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGOwsbEBAAFsALXcO17SAAAAAElFTkSuQmCC",
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGOQkzsBAAFiAQURG6MhAAAAAElFTkSuQmCC",
]
_USAGE = {
    "input_tokens": 10,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 10},
    "output_tokens": 272,
    "total_tokens": 282,
}


class FakeImages(LoopbackServer):
    base_path = "/v1"
    label = "images endpoint"

    def __init__(self, api_key: str = IMAGES_KEY, port: int = 0) -> None:
        super().__init__(
            [Route("/v1/images/generations", self._generate, methods=["POST"])],
            api_key=api_key,
            port=port,
        )
        self._failure: int | None = None

    def reset(self) -> None:
        super().reset()
        self._failure = None

    def fail(self, status: int) -> None:
        """Answer every request with `status` and OpenAI's error body, until reset."""
        self._failure = status

    async def _generate(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        body = orjson.loads(await request.body())
        self.record(request, body)
        if self._failure is not None:
            return _error(self._failure, f"Scripted failure {self._failure}.", None)
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return _error(
                400, "Missing required parameter: 'prompt'.", "missing_required_parameter"
            )
        settings = {
            "size": body.get("size") or "1024x1024",
            "quality": body.get("quality") or "medium",
            "background": body.get("background") or "opaque",
            "output_format": body.get("output_format") or "png",
        }
        if body.get("stream"):
            events = _events(body, settings)
            return StreamingResponse(_frames(events), media_type="text/event-stream")
        image: dict[str, Any] = {"revised_prompt": f"{body['prompt']} (revised)"}
        if body.get("response_format") == "url":
            image["url"] = "https://images.example/1.png"
        else:
            image["b64_json"] = PNG
        answer = {"created": int(time.time()), "data": [image], **settings, "usage": _USAGE}
        ImagesResponse.model_validate(answer)
        return JSONResponse(answer)


def _events(body: dict[str, Any], settings: dict[str, str]) -> list[dict[str, Any]]:
    created = int(time.time())
    events: list[dict[str, Any]] = [
        {
            "type": "image_generation.partial_image",
            "b64_json": PARTIALS[index],
            "partial_image_index": index,
            "created_at": created,
            **settings,
        }
        for index in range(int(body.get("partial_images") or 0))
    ]
    for event in events:
        ImageGenPartialImageEvent.model_validate(event)
    completed = {
        "type": "image_generation.completed",
        "b64_json": PNG,
        "created_at": created,
        **settings,
        "usage": _USAGE,
    }
    ImageGenCompletedEvent.model_validate(completed)
    return [*events, completed]


async def _frames(events: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    for event in events:
        yield f"event: {event['type']}\ndata: ".encode() + orjson.dumps(event) + b"\n\n"


def _error(status: int, message: str, code: str | None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    error = {"message": message, "type": kind, "param": None, "code": code}
    return JSONResponse({"error": error}, status_code=status)


@pytest.fixture(scope="session")
def images_server() -> Iterator[FakeImages]:
    with FakeImages() as server:
        yield server


@pytest.fixture
def fake_images(images_server: FakeImages) -> Iterator[FakeImages]:
    """The session's fake images endpoint (key IMAGES_KEY), reset around the test."""
    images_server.reset()
    yield images_server
    images_server.reset()


if __name__ == "__main__":  # python tests/fake_images.py [PORT]: serve until interrupted
    serve_forever(FakeImages)
