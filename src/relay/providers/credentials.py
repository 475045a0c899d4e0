"""The credentials Relay sends to an upstream, and their removal from any upstream text Relay
quotes (error messages to clients, stored failures, log lines).

An upstream may echo what it received: the whole `Authorization` header, only its token, a
masked key (`sk-abc...wxyz`), a header value JSON- or URL-encoded, or a message cut short in
the middle of a key. So every form Relay sends is scrubbed (a bearer key, the Basic token and
its base64 part, the URL password raw and percent-decoded, custom header values), and not only
whole: any run of text that shares FRAGMENT characters with one of those forms is replaced, so
neither a masked key's visible ends nor a key cut in half survive.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote

import orjson

REDACTED = "[redacted]"
# The shortest run of a credential that is redacted wherever it appears. Shorter runs carry
# little of a key, and matching them would mangle ordinary words in error messages.
FRAGMENT = 8
# Shorter credentials (a weak password) are redacted where they appear whole, down to this
# length; below it, replacing them would only mangle the text.
MIN_WHOLE = 4
# Custom headers whose values are public by design (OpenRouter's app attribution, API
# versions): they are not treated as credentials, so they never mangle an error message.
PUBLIC_HEADERS = frozenset(
    {
        "accept",
        "anthropic-beta",
        "anthropic-version",
        "content-type",
        "http-referer",
        "openai-beta",
        "referer",
        "user-agent",
        "x-title",
    }
)


def basic_token(username: str, password: str) -> str:
    """The base64 part of `Authorization: Basic ...` for percent-encoded URL credentials."""
    pair = f"{unquote(username)}:{unquote(password)}".encode()
    return base64.b64encode(pair).decode()


def _encodings(secret: str) -> set[str]:
    """The secret as an upstream might write it back: raw, percent-encoded, JSON-escaped
    (with and without escaped slashes, as some JSON encoders write them)."""
    escaped = orjson.dumps(secret).decode()[1:-1]
    return {secret, quote(secret, safe=""), escaped, escaped.replace("/", "\\/")}


def _login_forms(username: str | None, password: str | None) -> list[str]:
    """A URL's password as it is sent (in a Basic token) and may come back."""
    if not password:
        return []
    pair = f"{unquote(username or '')}:{unquote(password)}"
    return [password, unquote(password), basic_token(username or "", password), pair]


class Scrubber:
    """Removes one upstream's credentials, in every form and in fragments, from text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret:
                forms |= _encodings(secret)
        # Runs of FRAGMENT characters of every long form; shorter forms are matched whole.
        self._grams = {
            form[start : start + FRAGMENT]
            for form in forms
            if len(form) >= FRAGMENT
            for start in range(len(form) - FRAGMENT + 1)
        }
        self._short = sorted(
            (form for form in forms if MIN_WHOLE <= len(form) < FRAGMENT), key=len, reverse=True
        )

    @classmethod
    def for_upstream(
        cls,
        *,
        api_key: str | None = None,
        username: str | None = None,
        password: str | None = None,
        headers: Mapping[str, str] | None = None,
        proxy_username: str | None = None,
        proxy_password: str | None = None,
    ) -> Scrubber:
        """The scrubber for what one upstream is sent: a bearer key, URL credentials (sent as
        Basic auth), custom headers, and the proxy's URL credentials (Proxy-Authorization)."""
        secrets = [api_key or "", *_login_forms(username, password)]
        secrets += _login_forms(proxy_username, proxy_password)
        secrets += [
            value for name, value in (headers or {}).items() if name.lower() not in PUBLIC_HEADERS
        ]
        return cls(secrets)

    def __bool__(self) -> bool:
        return bool(self._grams or self._short)

    def __call__(self, text: str) -> str:
        if not self:
            return text
        for form in self._short:
            text = text.replace(form, REDACTED)
        grams = self._grams
        covered: list[list[int]] = []  # [start, end) runs made of credential fragments
        for start in range(len(text) - FRAGMENT + 1):
            if text[start : start + FRAGMENT] in grams:
                if covered and start <= covered[-1][1]:
                    covered[-1][1] = start + FRAGMENT
                else:
                    covered.append([start, start + FRAGMENT])
        if not covered:
            return text
        pieces, last = [], 0
        for start, end in covered:
            pieces += [text[last:start], REDACTED]
            last = end
        pieces.append(text[last:])
        return "".join(pieces)
