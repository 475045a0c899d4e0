"""What the command-line programs print about settings: configuration errors without the
values at fault, URLs without their passwords (a misplaced secret must not reach a terminal)."""

from __future__ import annotations

import sys
from urllib.parse import urlsplit, urlunsplit

from pydantic import ValidationError


def report_config_error(program: str, error: ValueError) -> None:
    """A configuration error, one line per field, without the offending values: a
    misplaced secret must not reach the terminal."""
    if not isinstance(error, ValidationError):
        print(f"{program}: invalid configuration: {error}", file=sys.stderr)
        return
    for detail in error.errors(include_input=False, include_url=False):
        where = ".".join(str(step) for step in detail["loc"]) or "config"
        message = detail["msg"].removeprefix("Value error, ")
        print(f"{program}: invalid configuration: {where}: {message}", file=sys.stderr)


def without_password(url: str) -> str:
    """`url` with the password of its user part masked, and its query left out (drivers
    take passwords there too: ?password=...)."""
    url = url.split("?", 1)[0]
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user_part, _, host_part = parts.netloc.rpartition("@")
    user = user_part.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host_part}"))
