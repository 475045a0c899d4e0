"""Identifiers for everything Relay creates. Providers never see these."""

from __future__ import annotations

import re
import secrets
import time

_ID = re.compile(r"^[a-z]+_[A-Za-z0-9_-]{1,128}$")


def new_id(prefix: str) -> str:
    """48 hex digits: the creation time in milliseconds (12), as OpenAI's ids begin with
    theirs, then 18 random bytes: unguessable, so an id never leaks another tenant's
    existence. Time first, ids made one after another sort together: a new row's key lands
    on the last page of each index keyed by id, not on a random one (SQLite's log and
    checkpoints copy fewer pages; PostgreSQL's B-trees stay dense)."""
    return f"{prefix}_{time.time_ns() // 1_000_000:012x}{secrets.token_hex(18)}"


def looks_like_response_id(value: str) -> bool:
    return value.startswith("resp_") and _ID.match(value) is not None


def looks_like_conversation_id(value: str) -> bool:
    return value.startswith("conv_") and _ID.fullmatch(value) is not None
