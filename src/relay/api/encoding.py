"""Compressed request bodies (`Content-Encoding`): zstd, as Codex compresses its requests, and
gzip and deflate, as other clients and proxies do.

`max_body_bytes` bounds the body as Relay reads it (compressed) and again decompressed: each
decoder produces at most one byte past the limit, so a small body that would inflate to
gigabytes (a zip bomb) is refused with a 413 once it passes the limit, never inflated whole.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import zstandard

from relay.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

# Each decoder: (the compressed body, the most bytes to produce) -> the body, or more than
# that many bytes when it decompresses to more (then the caller refuses it, however much more).
Decoder = Callable[[bytes, int], bytes]


def _zlib(wbits: int) -> Decoder:
    def decode(data: bytes, most: int) -> bytes:
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(data, most)
        if len(out) < most and (not inflater.eof or inflater.unused_data):
            # Cut short, or followed by something else: corrupt either way (a second gzip
            # member would be valid, but no HTTP client sends one).
            raise zlib.error("incomplete or trailing data")
        return out

    return decode


def _deflate(data: bytes, most: int) -> bytes:
    # HTTP's deflate is zlib-wrapped (RFC 9110), but some clients send raw deflate.
    try:
        return _zlib(zlib.MAX_WBITS)(data, most)
    except zlib.error:
        return _zlib(-zlib.MAX_WBITS)(data, most)


def _zstd(data: bytes, most: int) -> bytes:
    # zstandard's decompressobj takes no output bound; its reader stops where told. A stream
    # cut short reads as what it holds, which then fails as JSON (a 400 as well).
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
    chunks, size = [], 0
    while size < most and (chunk := reader.read(min(most - size, 1 << 20))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


DECODERS: dict[str, Decoder] = {
    "gzip": _zlib(16 + zlib.MAX_WBITS),
    "x-gzip": _zlib(16 + zlib.MAX_WBITS),
    "deflate": _deflate,
    "zstd": _zstd,
}
SUPPORTED = "gzip, deflate, zstd"


def codings(header: str | None) -> list[str]:
    """The codings of a Content-Encoding header in the order they were applied, identity left
    out; an unknown one is a 415 that names the codings Relay takes (RFC 7694)."""
    names = [name.strip().lower() for name in (header or "").split(",")]
    names = [name for name in names if name not in ("", "identity")]
    for name in names:
        if name not in DECODERS:
            raise UnsupportedMediaType(
                f"Content-Encoding '{name[:40]}' is not supported; send the body as it is or "
                f"compressed with one of: {SUPPORTED}.",
                param="content-encoding",
                headers={"accept-encoding": SUPPORTED},
            )
    return names


def decode(body: bytes, applied: list[str], limit: int) -> bytes:
    """`body` with the codings `applied` undone (the last first), at most `limit` bytes at each
    step: past it, a 413; data that is not what its coding says, a 400."""
    for name in reversed(applied):
        try:
            body = DECODERS[name](body, limit + 1)
        except (zlib.error, zstandard.ZstdError):
            raise InvalidRequest(
                f"The request body is not valid {name} data.",
                param="content-encoding",
                code="invalid_body",
            ) from None
        if len(body) > limit:
            raise PayloadTooLarge(limit, decompressed=True)
    return body
