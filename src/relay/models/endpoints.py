"""What every configured endpoint shares (a deployment's upstream, the web search backend, the
images endpoint): its base URL, checked at start-up, and its key, read from the environment
variable the configuration names (keys are never written in the configuration)."""

from __future__ import annotations

import os
from urllib.parse import urlsplit


def checked_url(url: str) -> str:
    """`url` when it is an http(s) URL naming a host: refused at start-up rather than at the
    first request. The URL is not repeated in the error: it may hold a password."""
    scheme, separator, rest = url.partition("://")
    if scheme.lower() not in ("http", "https") or not separator:
        raise ValueError("must begin with http:// or https://")
    if not rest.partition("/")[0].rpartition("@")[2]:
        raise ValueError("names no host")
    if urlsplit(url).port == 0:  # reading it raises on a port that is no number, or > 65535
        raise ValueError("names port 0")
    return url


def key_from(variable: str) -> str:
    """The key in environment variable `variable`; a ValueError naming it when it is unset."""
    value = os.environ.get(variable)
    if not value:
        raise ValueError(f"environment variable {variable} is not set")
    return value
