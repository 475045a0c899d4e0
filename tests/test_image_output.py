"""Image output, through each path: a chat upstream that draws (`image_output`, OpenRouter's
`modalities` and `images`), a Responses upstream that runs `image_generation` itself (its
partial images passed on as they come), and Relay's own images endpoint run as a server-side
tool for any model. Every answer and stream is validated (the Open Responses contract, and the
openai SDK's types for the image items, tools and events); chains continue without the image
reaching the upstream again."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
from anthropic_upstream import ANTHROPIC_KEY, AnthropicUpstream
from chat_upstream import UPSTREAM_KEY, ChatUpstream
from conformance import assert_valid_item
from fake_images import IMAGES_KEY, PARTIALS, PNG, FakeImages
from pydantic import ValidationError
from relay_fixtures import checked_client, relay_on_sqlite, sse_events
from responses_upstream import RESPONSES_KEY, ResponsesUpstream

from relay.models.tools import ImagesSettings
from relay.providers.base import FinishDelta, ImageDelta, ProviderError, TextDelta
from relay.providers.openai_chat import OpenAIChatProvider
from relay.tools.images import Image, ImageFailed, ImagesBackend

CHAT_KEY_ENV = "RELAY_TEST_IMAGES_CHAT_KEY"
RESPONSES_KEY_ENV = "RELAY_TEST_IMAGES_RESPONSES_KEY"
CLAUDE_KEY_ENV = "RELAY_TEST_IMAGES_CLAUDE_KEY"
IMAGES_KEY_ENV = "RELAY_TEST_IMAGES_ENDPOINT_KEY"
DRAW = {"modalities": ["image", "text"], "image_config": {"aspect_ratio": "1:1"}}


@pytest.fixture(scope="module")
def images_url(
    chat_upstream: ChatUpstream,
    responses_upstream: ResponsesUpstream,
    anthropic_upstream: AnthropicUpstream,
    images_server: FakeImages,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch_module: pytest.MonkeyPatch,
) -> Iterator[str]:
    monkeypatch_module.setenv(CHAT_KEY_ENV, UPSTREAM_KEY)
    monkeypatch_module.setenv(CLAUDE_KEY_ENV, ANTHROPIC_KEY)
    monkeypatch_module.setenv(RESPONSES_KEY_ENV, RESPONSES_KEY)
    monkeypatch_module.setenv(IMAGES_KEY_ENV, IMAGES_KEY)
    chat = {"base_url": chat_upstream.base_url, "api_key_env": CHAT_KEY_ENV, "retries": 0}
    responses = {
        "provider": "openai_responses",
        "base_url": responses_upstream.base_url,
        "api_key_env": RESPONSES_KEY_ENV,
        "retries": 0,
    }
    routes = [
        {"model": "painter", **chat, "upstream_model": "painter", "image_output": True},
        {"model": "painter-whole", **chat, "upstream_model": "painter_whole", "image_output": True},
        {"model": "echo", **chat, "upstream_model": "echo"},
        {"model": "directed", **chat, "upstream_model": "directed"},
        {
            "model": "gpt-images",
            **responses,
            "upstream_model": "image_generation",
            "hosted_tools": ["image_generation"],
        },
        {"model": "gpt-echo", **responses, "upstream_model": "echo"},
        {
            "model": "claude",
            "provider": "anthropic",
            "base_url": anthropic_upstream.base_url,
            "api_key_env": CLAUDE_KEY_ENV,
            "upstream_model": "echo",
        },
    ]
    images = {
        "url": images_server.base_url,
        "model": "gpt-image-1.5",
        "api_key_env": IMAGES_KEY_ENV,
        "price_per_image_usd": 0.04,
    }
    with relay_on_sqlite(tmp_path_factory, "images", routes, tools={"images": images}) as url:
        yield url


@pytest.fixture
def http(images_url: str) -> Iterator[httpx.Client]:
    with checked_client(images_url) as client:
        yield client


def create(http: httpx.Client, **body: Any) -> dict[str, Any]:
    answer = http.post("/v1/responses", json=body)
    assert answer.status_code == 200, answer.text
    created: dict[str, Any] = answer.json()
    for item in created["output"]:
        assert_valid_item(item)
    return created


def types(response: dict[str, Any]) -> list[str]:
    return [item["type"] for item in response["output"]]


def image_of(response: dict[str, Any]) -> dict[str, Any]:
    return next(item for item in response["output"] if item["type"] == "image_generation_call")


# A chat upstream that draws ------------------------------------------------------------------


@pytest.mark.parametrize("model", ["painter", "painter-whole"])
def test_a_chat_image_model_answers_with_an_image_item(
    http: httpx.Client, chat_upstream: ChatUpstream, model: str
) -> None:
    chat_upstream.reset()
    body = create(http, model=model, input="Draw a red square", **DRAW)
    assert body["status"] == "completed"
    assert types(body) == ["message", "image_generation_call"]
    assert body["output_text"] == "Here is your picture."
    image = image_of(body)
    assert image["id"].startswith("ig_")
    assert image["status"] == "completed"
    assert image["result"] == PNG
    assert image["output_format"] == "png"
    # The upstream was asked as OpenRouter is: modalities and image_config as sent.
    assert chat_upstream.last["modalities"] == ["image", "text"]
    assert chat_upstream.last["image_config"] == {"aspect_ratio": "1:1"}
    # Stored once, as answered.
    assert http.get(f"/v1/responses/{body['id']}").json()["output"] == body["output"]


def test_the_stream_tells_of_the_image(http: httpx.Client) -> None:
    events = sse_events(http, {"model": "painter", "input": "Draw a red square", **DRAW})
    image_events = [event for event in events if "image_generation_call" in event["type"]]
    assert [event["type"] for event in image_events] == [
        "response.image_generation_call.in_progress",
        "response.image_generation_call.generating",
        "response.image_generation_call.completed",
    ]
    added, done = (
        event
        for event in events
        if event["type"].startswith("response.output_item")
        and event["item"]["type"] == "image_generation_call"
    )
    # The data comes once, with the item's end, as OpenAI sends it.
    assert added["item"]["status"] == "in_progress" and "result" not in added["item"]
    assert done["item"]["result"] == PNG and done["item"]["status"] == "completed"


async def test_an_image_is_taken_inline_and_never_fetched() -> None:
    provider = OpenAIChatProvider("http://127.0.0.1:9/v1", None)

    def completion(url: str) -> dict[str, Any]:
        image = {"type": "image_url", "image_url": {"url": url}}
        message = {"role": "assistant", "content": "Here.", "images": [image]}
        return {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}

    try:
        deltas = provider._completion_deltas(completion(f"data:image/webp;base64,{PNG}"))
        assert deltas == [TextDelta("Here."), ImageDelta(PNG, "webp"), FinishDelta("stop")]
        with pytest.raises(ProviderError, match="not inline base64 data"):
            provider._completion_deltas(completion("https://images.example/1.png"))
    finally:
        await provider.aclose()


def test_a_route_that_cannot_draw_answers_400_naming_the_field(http: httpx.Client) -> None:
    for field, value in (("modalities", ["image", "text"]), ("image_config", {"size": "1K"})):
        answer = http.post("/v1/responses", json={"model": "echo", "input": "hi", field: value})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == field and error["code"] == "unsupported_parameter"
    # Text alone is no image: any route serves it.
    assert create(http, model="echo", input="hi", modalities=["text"])["output_text"] == "hi"


# A Responses upstream that runs image_generation ---------------------------------------------


def test_a_responses_upstream_streams_its_partial_images_as_they_come(
    http: httpx.Client, responses_upstream: ResponsesUpstream
) -> None:
    tool = {"type": "image_generation", "partial_images": 2, "size": "1024x1536"}
    events = sse_events(http, {"model": "gpt-images", "input": "a cat", "tools": [tool]})
    assert responses_upstream.last["tools"] == [tool]
    kinds = [event["type"] for event in events]
    image_kinds = [kind for kind in kinds if "image_generation_call" in kind]
    assert image_kinds == [
        "response.image_generation_call.in_progress",
        "response.image_generation_call.generating",
        "response.image_generation_call.partial_image",
        "response.image_generation_call.partial_image",
        "response.image_generation_call.completed",
    ]
    partials = [event for event in events if event["type"].endswith("partial_image")]
    for number, event in enumerate(partials):
        assert set(event) == {
            "type",
            "sequence_number",
            "item_id",
            "output_index",
            "partial_image_b64",
            "partial_image_index",
            "size",
            "quality",
            "background",
            "output_format",
        }
        assert event["partial_image_b64"] == PARTIALS[number]
        assert event["partial_image_index"] == number and event["size"] == "1024x1536"
    # Live: the partial images come between the item's added and its done.
    added = next(i for i, e in enumerate(events) if e["type"] == "response.output_item.added")
    done = next(i for i, e in enumerate(events) if e["type"] == "response.output_item.done")
    assert added < kinds.index("response.image_generation_call.partial_image") < done
    final = events[-1]["response"]
    assert types(final) == ["image_generation_call", "message"]
    image = image_of(final)
    assert image["result"] == PNG and image["revised_prompt"] == "A picture of a cat"
    assert final["tools"] == [tool]


def test_a_responses_upstream_draws_for_a_json_answer(
    http: httpx.Client, responses_upstream: ResponsesUpstream
) -> None:
    body = create(http, model="gpt-images", input="a dog", tools=[{"type": "image_generation"}])
    assert types(body) == ["image_generation_call", "message"]
    assert image_of(body)["result"] == PNG
    assert body["output_text"] == "Here is your image."


# Chains: the image is stored once, and read as a reference ---------------------------------


def test_a_chain_goes_on_without_the_image(
    http: httpx.Client,
    chat_upstream: ChatUpstream,
    responses_upstream: ResponsesUpstream,
    anthropic_upstream: AnthropicUpstream,
) -> None:
    first = create(http, model="painter", input="Draw a red square", **DRAW)
    image = image_of(first)
    chat_upstream.reset()
    second = create(
        http, model="echo", input="What did you draw?", previous_response_id=first["id"]
    )
    assert second["status"] == "completed"
    sent = orjson.dumps(chat_upstream.last).decode()
    assert PNG not in sent
    assistant = chat_upstream.last["messages"][-2]
    assert assistant["role"] == "assistant"
    assert f"[image generated: {image['id']}, png]" in assistant["content"]
    # Responses and Anthropic upstreams read it the same way; the stored chain still holds
    # it, once.
    responses_upstream.reset()
    create(http, model="gpt-echo", input="And now?", previous_response_id=second["id"])
    sent = orjson.dumps(responses_upstream.last).decode()
    assert PNG not in sent and f"[image generated: {image['id']}, png]" in sent
    anthropic_upstream.reset()
    create(http, model="claude", input="And now?", previous_response_id=second["id"])
    first_answer = anthropic_upstream.last["messages"][1]
    assert first_answer["role"] == "assistant"
    assert {"type": "text", "text": f"[image generated: {image['id']}, png]"} in (
        first_answer["content"]
    )
    assert PNG not in orjson.dumps(anthropic_upstream.last).decode()
    stored = http.get(f"/v1/responses/{first['id']}").json()
    assert image_of(stored)["result"] == PNG


def test_an_upstream_that_draws_gets_the_latest_image_whole(
    http: httpx.Client, responses_upstream: ResponsesUpstream
) -> None:
    tools = [{"type": "image_generation"}]
    first = create(http, model="gpt-images", input="a cat", tools=tools)
    second = create(
        http, model="gpt-images", input="a dog", tools=tools, previous_response_id=first["id"]
    )
    # To edit, it needs the pixels: the latest image goes back whole.
    assert second["output_text"] == "I edited your image."
    responses_upstream.reset()
    create(http, model="gpt-images", input="darker", tools=tools, previous_response_id=second["id"])
    sent = responses_upstream.last["input"]
    whole = [item for item in sent if item.get("type") == "image_generation_call"]
    assert [item["id"] for item in whole] == [image_of(second)["id"]]
    assert whole[0]["result"] == PNG
    assert orjson.dumps(sent).decode().count(PNG) == 1
    older = f"[image generated: {image_of(first)['id']}, 1024x1024 png: A picture of a cat]"
    assert older in orjson.dumps(sent).decode()
    # Without the tool it edits nothing: a reference only.
    responses_upstream.reset()
    create(http, model="gpt-echo", input="thanks", previous_response_id=second["id"])
    assert PNG not in orjson.dumps(responses_upstream.last).decode()


# Relay's images endpoint, as a server-side tool of any model -------------------------------

DRAW_CALL = 'call image_generation {"prompt": "a red cube"}'


def cost(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("relay_cost_usd_total{") and 'model="directed"' in line
    )


def test_relay_draws_for_any_model_with_partial_images(
    http: httpx.Client, chat_upstream: ChatUpstream, fake_images: FakeImages
) -> None:
    chat_upstream.reset()
    tool = {"type": "image_generation", "size": "1024x1536", "quality": "low", "partial_images": 2}
    events = sse_events(http, {"model": "directed", "input": DRAW_CALL, "tools": [tool]})
    kinds = [event["type"] for event in events if "image_generation_call" in event["type"]]
    assert kinds == [
        "response.image_generation_call.in_progress",
        "response.image_generation_call.generating",
        "response.image_generation_call.partial_image",
        "response.image_generation_call.partial_image",
        "response.image_generation_call.completed",
    ]
    partials = [event for event in events if event["type"].endswith("partial_image")]
    assert [event["partial_image_b64"] for event in partials] == PARTIALS[:2]
    assert [event["partial_image_index"] for event in partials] == [0, 1]
    assert all(event["size"] == "1024x1536" for event in partials)
    final = events[-1]["response"]
    assert types(final) == ["image_generation_call", "message"]
    image = image_of(final)
    assert image["status"] == "completed" and image["result"] == PNG
    assert image["revised_prompt"] == "a red cube"
    assert (image["size"], image["quality"], image["output_format"]) == ("1024x1536", "low", "png")
    reference = f"[image generated: {image['id']}, 1024x1536 png: a red cube]"
    assert final["output_text"] == f"Tools said: {reference}"
    assert final["tools"] == [tool]
    # The endpoint was asked for one image with the tool's fields, streamed for the partials.
    assert fake_images.last == {
        "model": "gpt-image-1.5",
        "prompt": "a red cube",
        "n": 1,
        "size": "1024x1536",
        "quality": "low",
        "partial_images": 2,
        "response_format": "b64_json",
        "stream": True,
    }
    # The model was offered a function of a prompt, and read a reference, not the image.
    first, second = chat_upstream.requests
    offered = first["tools"][0]["function"]
    assert offered["name"] == "image_generation"
    assert offered["parameters"]["required"] == ["prompt"]
    assert second["messages"][-1] == {
        "role": "tool",
        "tool_call_id": image["id"],
        "content": reference,
    }
    assert PNG not in orjson.dumps(second).decode()


def test_a_drawn_image_is_priced_stored_and_not_sent_again(
    http: httpx.Client, images_url: str, chat_upstream: ChatUpstream, fake_images: FakeImages
) -> None:
    before = cost(images_url)
    body = create(http, model="directed", input=DRAW_CALL, tools=[{"type": "image_generation"}])
    image = image_of(body)
    assert image["revised_prompt"] == "a red cube (revised)"  # the endpoint's own revision
    assert "stream" not in fake_images.last and "partial_images" not in fake_images.last
    assert cost(images_url) - before == pytest.approx(0.04)
    assert image_of(http.get(f"/v1/responses/{body['id']}").json())["result"] == PNG
    chat_upstream.reset()
    later = create(http, model="directed", input="thanks", previous_response_id=body["id"])
    assert later["status"] == "completed"
    sent = orjson.dumps(chat_upstream.last).decode()
    assert PNG not in sent
    assert f"[image generated: {image['id']}, 1024x1024 png: a red cube (revised)]" in sent


def test_an_image_that_fails_is_told_to_the_model_and_costs_nothing(
    http: httpx.Client, images_url: str, fake_images: FakeImages
) -> None:
    fake_images.fail(500)
    before = cost(images_url)
    body = create(http, model="directed", input=DRAW_CALL, tools=[{"type": "image_generation"}])
    image = image_of(body)
    assert image["status"] == "failed" and "result" not in image
    assert image["error"]["type"] == "image_generation_error"
    assert "HTTP 500" in image["error"]["message"]
    assert body["output_text"].startswith("Tools said: The image could not be drawn")
    assert cost(images_url) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [("action", "edit"), ("input_fidelity", "high"), ("model", "dall-e-2"), ("size", "big")],
)
def test_what_the_endpoint_cannot_do_is_a_400_naming_the_field(
    http: httpx.Client, field: str, value: str
) -> None:
    tool = {"type": "image_generation", field: value}
    weather = {"type": "function", "name": "get_weather"}
    answer = http.post(
        "/v1/responses", json={"model": "directed", "input": "hi", "tools": [weather, tool]}
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == f"tools[1].{field}"


# Relay's images endpoint ---------------------------------------------------------------------


@asynccontextmanager
async def endpoint(images: FakeImages, **more: Any) -> AsyncIterator[ImagesBackend]:
    settings = {"url": images.base_url, "model": "gpt-image-1.5", "api_key_env": IMAGES_KEY_ENV}
    backend = ImagesBackend(ImagesSettings.model_validate({**settings, **more}))
    try:
        yield backend
    finally:
        await backend.aclose()


@pytest.fixture
def _images_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IMAGES_KEY_ENV, IMAGES_KEY)


@pytest.mark.usefixtures("_images_key")
async def test_the_images_endpoint_is_asked_for_one_image_in_base64(
    fake_images: FakeImages,
) -> None:
    partials: list[dict[str, Any]] = []
    async with endpoint(fake_images) as images:
        image = await images.generate("a red cube", {"size": "1536x1024"}, partials.append)
    assert image == Image(
        PNG,
        {
            "size": "1536x1024",
            "quality": "medium",
            "background": "opaque",
            "output_format": "png",
            "revised_prompt": "a red cube (revised)",
        },
    )
    assert partials == []
    assert fake_images.last == {
        "model": "gpt-image-1.5",
        "prompt": "a red cube",
        "n": 1,
        "size": "1536x1024",
        "response_format": "b64_json",
    }
    assert fake_images.headers[-1]["authorization"] == f"Bearer {IMAGES_KEY}"


@pytest.mark.usefixtures("_images_key")
async def test_partial_images_stream_as_they_come(fake_images: FakeImages) -> None:
    partials: list[dict[str, Any]] = []
    async with endpoint(fake_images, response_format="omit") as images:
        image = await images.generate("a cube", {"partial_images": 2}, partials.append)
    assert image.result == PNG
    assert fake_images.last["stream"] is True and "response_format" not in fake_images.last
    assert [partial["partial_image_b64"] for partial in partials] == PARTIALS[:2]
    assert partials[1] == {
        "partial_image_b64": PARTIALS[1],
        "partial_image_index": 1,
        "size": "1024x1024",
        "quality": "medium",
        "background": "opaque",
        "output_format": "png",
    }


@pytest.mark.usefixtures("_images_key")
async def test_the_endpoints_failures_say_why_and_never_the_key(
    fake_images: FakeImages, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with endpoint(fake_images, response_format="b64_json") as images:
        fake_images.fail(500)
        with pytest.raises(ImageFailed, match=r"HTTP 500.*Scripted failure 500"):
            await images.generate("a cube", {}, print)
        fake_images.fail(400)
        with pytest.raises(ImageFailed, match="rejected the request"):
            await images.generate("a cube", {}, print)
    fake_images.reset()
    async with endpoint(fake_images, response_format="omit") as images:
        with pytest.raises(ImageFailed, match="URL, not the image's data"):
            await images.generate("a cube", {"response_format": "url"}, print)
    monkeypatch.setenv(IMAGES_KEY_ENV, "sk-wrong-Zq8Xv3Nm7Lk2Jh5Gf")
    async with endpoint(fake_images) as images:
        with pytest.raises(ImageFailed) as failed:
            await images.generate("a cube", {}, print)
    assert "refused the credentials" in str(failed.value)
    assert "Zq8Xv3Nm" not in str(failed.value)


def test_the_settings_refuse_what_would_fail_later(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ({"url": "ftp://images"}, {"url": "http://"}, {"model": ""}, {"colour": 1}):
        with pytest.raises(ValidationError):
            ImagesSettings.model_validate({"url": "http://images/v1", "model": "m", **bad})
    monkeypatch.delenv(IMAGES_KEY_ENV, raising=False)
    missing = ImagesSettings(url="http://images/v1", model="m", api_key_env=IMAGES_KEY_ENV)
    with pytest.raises(ValueError, match=IMAGES_KEY_ENV):
        ImagesBackend(missing)
