"""Identifiers for everything Relay creates. Providers never see these."""

from __future__ import annotations

import re
import secrets

_ID = re.compile(r"^[a-z]+_[A-Za-z0-9_-]{1,128}$")


def new_id(prefix: str) -> str:
    # 24 random bytes, hex: unguessable, so an id never leaks another tenant's existence.
    return f"{prefix}_{secrets.token_hex(24)}"


def looks_like_response_id(value: str) -> bool:
    return value.startswith("resp_") and _ID.match(value) is not None


def looks_like_conversation_id(value: str) -> bool:
    return value.startswith("conv_") and _ID.fullmatch(value) is not None
