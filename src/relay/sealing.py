"""Content Relay hands to clients to give back unchanged (a compaction item's
`encrypted_content`): sealed with authenticated encryption, so a client can neither read nor
alter it, and bound to the tenant it was made for.

`cryptography`'s MultiFernet (AES-128-CBC with HMAC-SHA256): the first key seals, every key
opens, which is key rotation. Keys come from `sealing_keys` (config or RELAY_SEALING_KEYS);
with none, one is generated into `<data_dir>/sealing.key` on first start and read from there
after (several instances on one database must share configured keys instead: `agree` refuses to
start one whose generated key differs from the one the database knows).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Connection, select

from relay.config import MAKE_SEALING_KEY, is_sealing_key
from relay.errors import InvalidRequest, StartupError
from relay.storage.database import Database
from relay.storage.dialects import postgresql, sqlite
from relay.storage.tables import sealing_key

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

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
            # What Fernet.generate_key() makes, without importing cryptography for it.
            file.write(base64.urlsafe_b64encode(os.urandom(32)) + b"\n")
        try:
            os.link(draft, path)
        except FileExistsError:
            pass  # another process was first
        finally:
            draft.unlink()
    return [path.read_bytes().strip()]


def fingerprint(key: bytes) -> str:
    """A name for `key` that reveals nothing of it (an HMAC of a constant under the key): what
    instances sharing a database compare. A reader of the database learns whether two
    instances share a key, nothing that opens or forges a sealed item."""
    return hmac.new(key, b"relay sealing key fingerprint", hashlib.sha256).hexdigest()[:32]


async def agree(db: Database, key_fingerprint: str, *, configured: bool, data_dir: Path) -> None:
    """Register the key this instance seals with in the database it shares with others, or
    refuse to start (StartupError) when it would not open their sealed items: behind a load
    balancer, each instance with its own generated key refuses the others' compaction items
    and encrypted reasoning, which looks like random 400s. Configured keys are the operator's
    choice and replace what was registered (a rotation, a move off generated keys)."""
    dialect = db.sync_engine.dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    values = {
        "id": 1,
        "fingerprint": key_fingerprint,
        "configured": configured,
        "registered_at": int(time.time()),
    }

    def register(conn: Connection) -> bool | None:
        """None: this instance may seal; else whether the other key was configured."""
        statement = insert(sealing_key).values(values)
        if configured:
            conn.execute(statement.on_conflict_do_update(index_elements=["id"], set_=values))
            return None
        conn.execute(statement.on_conflict_do_nothing(index_elements=["id"]))
        found = conn.execute(select(sealing_key.c.fingerprint, sealing_key.c.configured)).one()
        return None if found.fingerprint == key_fingerprint else bool(found.configured)

    other_configured = await db.write(register)
    if other_configured is None:
        return
    whose = (
        "the instances on this database seal with configured sealing_keys"
        if other_configured
        else "another instance on this database seals with a key it generated"
    )
    raise StartupError(
        f"{whose}, not with this instance's generated {data_dir / KEY_FILE}, and each would "
        "refuse the other's sealed items (compaction, encrypted reasoning): set the same "
        "sealing_keys on every instance (RELAY_SEALING_KEYS='[\"<key>\"]'; make a key with "
        f"{MAKE_SEALING_KEY})"
    )


class Sealer:
    """Seals and opens with `keys`; `cryptography` (about 8 MB a process) is imported when the
    first item is sealed or opened, not by every process that might."""

    def __init__(self, keys: list[bytes]) -> None:
        if not all(is_sealing_key(key) for key in keys):
            raise ValueError("Fernet key must be 32 url-safe base64-encoded bytes.")
        self._keys = keys

    @functools.cached_property
    def _fernet(self) -> MultiFernet:
        from cryptography.fernet import Fernet, MultiFernet

        return MultiFernet([Fernet(key) for key in self._keys])

    def seal(self, tenant: str, kind: str, payload: dict[str, Any]) -> str:
        body = orjson.dumps({"kind": kind, "tenant": tenant, "payload": payload})
        return self._fernet.encrypt(body).decode()

    def open(self, tenant: str, kind: str, token: str) -> dict[str, Any] | None:
        """The payload, or None for anything this Relay did not seal for this tenant and
        purpose (tampered, foreign, another tenant's, another key set's)."""
        from cryptography.fernet import InvalidToken

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
