"""Content Relay hands to clients to give back unchanged (a compaction item's
`encrypted_content`): sealed with authenticated encryption, so a client can neither read nor
alter it, and bound to the tenant it was made for.

`cryptography`'s MultiFernet (AES-128-CBC with HMAC-SHA256): the first key seals, every key
opens, which is key rotation. Keys come from `sealing_keys` (config or RELAY_SEALING_KEYS);
with none, one is generated into `<data_dir>/sealing.key` on first start and read from there
after (several instances on one database must share configured keys instead).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from relay.errors import InvalidRequest

KEY_FILE = "sealing.key"


def load_keys(configured: list[str], data_dir: Path) -> list[bytes]:
    """The configured keys, or the generated one of `data_dir`, made on first use by whichever
    process gets there first (workers start together): each writes a key to a file of its
    own and links it into place, which only the first link does, whole; all read that one."""
    if configured:
        return [key.encode() for key in configured]
    path = data_dir / KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        draft = data_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(Fernet.generate_key() + b"\n")
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another process was first
        finally:
            draft.unlink()
    return [path.read_bytes().strip()]


class Sealer:
    def __init__(self, keys: list[bytes]) -> None:
        self._fernet = MultiFernet([Fernet(key) for key in keys])

    def seal(self, tenant: str, kind: str, payload: dict[str, Any]) -> str:
        body = orjson.dumps({"kind": kind, "tenant": tenant, "payload": payload})
        return self._fernet.encrypt(body).decode()

    def open(self, tenant: str, kind: str, token: str) -> dict[str, Any] | None:
        """The payload, or None for anything this Relay did not seal for this tenant and
        purpose (tampered, foreign, another tenant's, another key set's)."""
        try:
            body = orjson.loads(self._fernet.decrypt(token.encode()))
        except (InvalidToken, ValueError, orjson.JSONDecodeError):
            return None
        if not isinstance(body, dict) or body.get("tenant") != tenant or body.get("kind") != kind:
            return None
        payload: dict[str, Any] = body["payload"]
        return payload

    def unseal(self, tenant: str, kind: str, token: str, param: str) -> dict[str, Any]:
        """The payload; a 400 naming `param` for anything `open` refuses."""
        payload = self.open(tenant, kind, token)
        if payload is None:
            raise InvalidRequest(
                f"The encrypted content of '{param}' was not made by this server for you, or "
                "was altered.",
                param=param,
                code="invalid_encrypted_content",
            )
        return payload
