"""API keys: their format, how they are stored, and how a request's key becomes a Principal.

A database key reads `sk-relay-<prefix><secret>`: the prefix (public, unique) finds its row,
the SHA-256 digest of the whole key is compared in constant time, and the key itself is never
stored. Keys from the config file are kept as digests in memory. What a process read of a
database key (revoked, expired, policy) is trusted for `key_cache_s`, so a revocation reaches
every instance within that time without a query per request.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Connection, bindparam, select, update

from relay.models.policy import NO_POLICY, Policy
from relay.storage.tables import api_keys, projects

KEY_PREFIX = "sk-relay-"
PREFIX_LENGTH = 12
SECRET_LENGTH = 32
_ALPHABET = string.ascii_letters + string.digits
_KEY_LENGTH = len(KEY_PREFIX) + PREFIX_LENGTH + SECRET_LENGTH
# At most this many keys and projects are cached a process (oldest dropped first).
_CACHE_ENTRIES = 10_000
_TOUCH_EVERY_S = 60  # last_used_at is written at most this often per key and process


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A new database key and its prefix."""
    prefix = "".join(secrets.choice(_ALPHABET) for _ in range(PREFIX_LENGTH))
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(SECRET_LENGTH))
    return f"{KEY_PREFIX}{prefix}{secret}", prefix


def prefix_of(key: str) -> str | None:
    if len(key) != _KEY_LENGTH or not key.startswith(KEY_PREFIX):
        return None
    return key[len(KEY_PREFIX) : len(KEY_PREFIX) + PREFIX_LENGTH]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What a key may do. `projects` includes `project`, its default."""

    key_id: str
    project: str
    projects: frozenset[str]
    models: frozenset[str] | None
    policy: Policy
    expires_at: int | None = None
    revoked: bool = False
    in_database: bool = False


@dataclass(frozen=True, slots=True)
class ProjectRecord:
    policy: Policy
    archived: bool


CONFIG_PROJECT = ProjectRecord(NO_POLICY, archived=False)  # a config tenant with no row


def key_record(row: Any) -> KeyRecord:
    extra: list[str] = orjson.loads(row.projects)
    models: list[str] | None = None if row.models is None else orjson.loads(row.models)
    return KeyRecord(
        key_id=row.id,
        project=row.project_id,
        projects=frozenset([row.project_id, *extra]),
        models=None if models is None else frozenset(models),
        policy=Policy.from_json(row.policy),
        expires_at=row.expires_at,
        revoked=row.revoked_at is not None,
        in_database=True,
    )


_KEY_BY_PREFIX = select(api_keys).where(api_keys.c.prefix == bindparam("prefix"))
_KEY_BY_ID = select(api_keys).where(api_keys.c.id == bindparam("kid"))
_PROJECT = select(projects.c.policy, projects.c.archived_at).where(
    projects.c.id == bindparam("pid")
)
_TOUCH = (
    update(api_keys).where(api_keys.c.id == bindparam("kid")).values(last_used_at=bindparam("now"))
)


def _key_by_prefix(conn: Connection, prefix: str, key_digest: str) -> KeyRecord | None:
    row = conn.execute(_KEY_BY_PREFIX, {"prefix": prefix}).first()
    if row is None or not hmac.compare_digest(row.digest, key_digest):
        return None
    return key_record(row)


def _key_by_id(conn: Connection, key_id: str) -> KeyRecord | None:
    row = conn.execute(_KEY_BY_ID, {"kid": key_id}).first()
    return None if row is None else key_record(row)


def _project(conn: Connection, project_id: str) -> ProjectRecord | None:
    row = conn.execute(_PROJECT, {"pid": project_id}).first()
    if row is None:
        return None
    return ProjectRecord(Policy.from_json(row.policy), archived=row.archived_at is not None)


class _TimedCache:
    """A bounded map whose entries are trusted for `ttl` seconds."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[float, Any]] = {}

    def get(self, name: str, now: float) -> tuple[bool, Any]:
        entry = self._entries.get(name)
        if entry is None or now - entry[0] > self.ttl:
            return False, None
        return True, entry[1]

    def put(self, name: str, value: Any, now: float) -> None:
        if len(self._entries) >= _CACHE_ENTRIES:
            del self._entries[next(iter(self._entries))]
        self._entries[name] = (now, value)

    def forget(self, name: str) -> None:
        self._entries.pop(name, None)

    def clear(self) -> None:
        self._entries.clear()


class KeyStore:
    """Client keys (config and database) and project records, cached."""

    def __init__(self, db: Any, config_keys: dict[str, KeyRecord], cache_s: float) -> None:
        self.db = db
        self.config_keys = config_keys  # by digest
        self._keys = _TimedCache(cache_s)
        self._projects = _TimedCache(cache_s)
        self._touched: dict[str, float] = {}

    async def find(self, key: str) -> KeyRecord | None:
        key_digest = digest(key)
        record = self.config_keys.get(key_digest)
        if record is not None:
            return record
        prefix = prefix_of(key)
        if prefix is None:
            return None
        now = time.monotonic()
        cached, record = self._keys.get(key_digest, now)
        if not cached:
            record = await self.db.glance(lambda conn: _key_by_prefix(conn, prefix, key_digest))
            if record is None:
                return None  # not cached: a guessed key must not evict real ones
            self._keys.put(key_digest, record, now)
        return record  # type: ignore[no-any-return]

    async def by_id(self, key_id: str) -> KeyRecord | None:
        """A key by its id, config keys' included: what a console session signed in with
        (relay.ui.guard), read again on each of its pages, as cached as `find`."""
        for record in self.config_keys.values():
            if record.key_id == key_id:
                return record
        now = time.monotonic()
        cached, record = self._keys.get("id:" + key_id, now)
        if not cached:
            record = await self.db.glance(lambda conn: _key_by_id(conn, key_id))
            if record is None:
                return None
            self._keys.put("id:" + key_id, record, now)
        return record  # type: ignore[no-any-return]

    async def project(self, project_id: str) -> ProjectRecord | None:
        now = time.monotonic()
        cached, record = self._projects.get(project_id, now)
        if not cached:
            record = await self.db.glance(lambda conn: _project(conn, project_id))
            self._projects.put(project_id, record, now)
        return record  # type: ignore[no-any-return]

    def should_touch(self, key_id: str) -> bool:
        """Whether to write this key's last_used_at now (at most once a minute)."""
        now = time.monotonic()
        if now - self._touched.get(key_id, -_TOUCH_EVERY_S) < _TOUCH_EVERY_S:
            return False
        if len(self._touched) >= _CACHE_ENTRIES:
            self._touched.clear()
        self._touched[key_id] = now
        return True

    async def touch(self, key_id: str) -> None:
        now = int(time.time())
        await self.db.write(lambda conn: conn.execute(_TOUCH, {"kid": key_id, "now": now}))

    def forget(self) -> None:
        """Drop what this process cached (after an admin change made here)."""
        self._keys.clear()
        self._projects.clear()
