"""Request bodies sent compressed (Content-Encoding zstd, as Codex sends them, gzip, deflate):
read within max_body_bytes decompressed, a zip bomb refused before it is inflated, unknown
codings a 415, corrupt data a 400."""

from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import orjson
import pytest
import zstandard
from live_server import relay_server
from relay_fixtures import check_answer, checked_client, fake_routes, sse_events

from relay.api.encoding import decode
from relay.config import Settings
from relay.errors import PayloadTooLarge

LIMIT = 65_536
BODY = orjson.dumps({"model": "fake-text", "input": "squeezed " * 50})


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "zstd": zstandard.ZstdCompressor().compress,
    "gzip": gzip.compress,
    "deflate": zlib.compress,
}


def bomb(encoding: str, size: int, prefix: bytes = b"", suffix: bytes = b"") -> bytes:
    """`size` spaces between `prefix` and `suffix`, compressed a megabyte at a time (the
    whole would not fit the test's memory budget)."""
    packer: zstandard.ZstdCompressionObj | zlib._Compress
    if encoding == "zstd":
        packer = zstandard.ZstdCompressor().compressobj()
    else:
        packer = zlib.compressobj(9, wbits=31 if encoding == "gzip" else zlib.MAX_WBITS)
    chunk = b" " * (1 << 20)
    out = [packer.compress(prefix)]
    out += [packer.compress(chunk) for _ in range(size >> 20)]
    return b"".join([*out, packer.compress(suffix), packer.flush()])


@pytest.fixture(scope="module")
def relay_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    database = Path(tmp_path_factory.mktemp("compressed")) / "relay.db"
    settings = Settings(
        database_url=f"sqlite:///{database}", routes=fake_routes(), max_body_bytes=LIMIT
    )
    with relay_server(settings) as url:
        yield url


@pytest.fixture
def http(relay_url: str) -> Iterator[httpx.Client]:
    with checked_client(relay_url) as client:
        yield client


def post(http: httpx.Client, content: bytes, encoding: str) -> httpx.Response:
    headers = {"content-type": "application/json", "content-encoding": encoding}
    return http.post("/v1/responses", content=content, headers=headers)


@pytest.mark.parametrize(
    ("encoding", "content"),
    [
        *((name, compress(BODY)) for name, compress in COMPRESS.items()),
        ("deflate", raw_deflate(BODY)),  # what some clients send as deflate
        ("x-gzip", gzip.compress(BODY)),
        ("gzip, zstd", COMPRESS["zstd"](gzip.compress(BODY))),  # applied in this order
        ("identity", BODY),
    ],
    ids=["zstd", "gzip", "deflate", "raw-deflate", "x-gzip", "gzip-then-zstd", "identity"],
)
def test_compressed_bodies_are_read(http: httpx.Client, encoding: str, content: bytes) -> None:
    answer = post(http, content, encoding)
    assert answer.status_code == 200, answer.text
    assert answer.json()["output_text"] == "You said: " + "squeezed " * 50


class Compressing(httpx.HTTPTransport):
    """What Codex does to its requests: the JSON body compressed with zstd."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            packed = zstandard.ZstdCompressor().compress(request.read())
            request.headers["content-encoding"] = "zstd"
            request.headers["content-length"] = str(len(packed))
            request.stream = httpx.ByteStream(packed)
        return super().handle_request(request)


def test_the_official_client_sending_zstd(relay_url: str) -> None:
    transport = Compressing()
    http = httpx.Client(transport=transport, event_hooks={"response": [check_answer]})
    with openai.OpenAI(
        base_url=f"{relay_url}/v1", api_key="unused", max_retries=0, http_client=http
    ) as sdk:
        first = sdk.responses.create(model="fake-text", input="compressed hello")
        assert first.output_text == "You said: compressed hello"
        with sdk.responses.stream(
            model="fake-text", input="and streamed", previous_response_id=first.id
        ) as stream:
            assert stream.get_final_response().output_text == "You said: and streamed"
        items = sdk.responses.input_items.list(first.id)
        assert items.data[0].model_dump()["content"][0]["text"] == "compressed hello"


def test_streams_take_compressed_bodies(relay_url: str) -> None:
    packing = {"content-encoding": "gzip"}
    body = {"model": "fake-text", "input": "streamed gzip", "stream": True}
    with checked_client(relay_url) as http:
        answer = http.post(
            "/v1/responses", content=gzip.compress(orjson.dumps(body)), headers=packing
        )
    assert answer.status_code == 200 and "You said: streamed gzip" in answer.text
    with checked_client(relay_url) as http:  # and the plain stream beside it, unchanged
        assert sse_events(http, body)[-1]["type"] == "response.completed"


@pytest.mark.parametrize("encoding", ["zstd", "gzip", "deflate"])
def test_a_zip_bomb_is_refused(http: httpx.Client, encoding: str) -> None:
    # Small enough to be read (under the limit compressed), far over it decompressed.
    size = (1 << 30) if encoding == "zstd" else 48 << 20  # deflate packs ~1000:1 at best
    body = bomb(encoding, size, b'{"model": "fake-text", "input": "', b'"}')
    assert len(body) < LIMIT
    started = time.monotonic()
    answer = post(http, body, encoding)
    assert answer.status_code == 413
    error = answer.json()["error"]
    assert error["code"] == "request_too_large" and "decompressed" in error["message"]
    assert time.monotonic() - started < 5  # inflating a gigabyte would take longer


@pytest.mark.parametrize("encoding", ["zstd", "gzip", "deflate"])
def test_decoding_stops_one_byte_past_the_limit(encoding: str) -> None:
    body = bomb(encoding, 64 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge):
            decode(body, [encoding], LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * (1 << 20)  # the bomb inflates to 64 MiB


def test_unknown_codings_are_a_415(http: httpx.Client) -> None:
    answer = post(http, b"whatever", "br")
    assert answer.status_code == 415
    assert answer.headers["accept-encoding"] == "gzip, deflate, zstd"
    error = answer.json()["error"]
    assert error["code"] == "unsupported_media_type" and error["param"] == "content-encoding"
    assert "'br'" in error["message"]


@pytest.mark.parametrize(
    ("encoding", "content"),
    [
        ("zstd", b"not zstd at all"),
        ("gzip", b"not gzip at all"),
        ("gzip", gzip.compress(BODY)[:-12]),  # cut short
        ("gzip", gzip.compress(BODY) + b"junk"),
        ("deflate", b"not deflate at all"),
    ],
    ids=["zstd", "gzip", "gzip-cut-short", "gzip-then-junk", "deflate"],
)
def test_corrupt_data_is_a_400(http: httpx.Client, encoding: str, content: bytes) -> None:
    answer = post(http, content, encoding)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "invalid_body" and error["param"] == "content-encoding"


def test_a_zstd_body_cut_short_is_a_400(http: httpx.Client) -> None:
    # zstd's reader gives what a cut stream holds: no longer valid JSON.
    answer = post(http, COMPRESS["zstd"](BODY)[:-20], "zstd")
    assert answer.status_code == 400
