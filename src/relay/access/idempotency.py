"""Idempotency-Key on POST /responses: the first request with a key runs; a repeat with the
same body replays its answer (the JSON, or the same SSE events) without calling the upstream;
a repeat with another body is a 409 `idempotency_key_reused`; a repeat while the first still
runs is a 409 `idempotency_key_in_progress` (the openai SDKs retry a 409 with backoff, and
their retry then gets the replay).

Records are per project, apart from stored responses (store:false answers replay too), and in
the database, so that every instance sees them. A claim is one transaction: insert the key, or
read who holds it. A running claim holds a lease like a run's (`lease_s`, renewed with the runs'
by relay.runs.runner): when its process dies it lapses with its runs, and a retry runs again.
An answer lapses after `ttl_s`. Only answers that hold a response are kept: an error before the
response existed, or a client that left, releases the key, so that a retry runs again.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from sqlalchemy import Connection, and_, bindparam, delete, or_, select, update

from relay.errors import Conflict, InvalidRequest
from relay.storage.database import Database
from relay.storage.dialects import postgresql, sqlite
from relay.storage.tables import idempotency_keys as records

MAX_KEY_LENGTH = 255
_SWEEP_EVERY_S = 60.0

_THIS = and_(records.c.project_id == bindparam("pid"), records.c.key == bindparam("k"))
_READ = select(
    records.c.request_digest,
    records.c.state,
    records.c.status_code,
    records.c.media_type,
    records.c.body,
).where(_THIS)
# A lapsed record (expired answer, or a claim whose process died) is as good as none.
_DROP_LAPSED = delete(records).where(
    _THIS,
    or_(
        records.c.expires_at < bindparam("now"),
        and_(records.c.state == "running", records.c.lease_until < bindparam("now")),
    ),
)
_SWEEP = delete(records).where(records.c.expires_at < bindparam("now"))
_COMPLETE = (
    update(records)
    .where(_THIS)
    .values(
        state="done",
        status_code=bindparam("status"),
        media_type=bindparam("media"),
        body=bindparam("body"),
        expires_at=bindparam("expires"),
    )
)
_RELEASE = delete(records).where(_THIS, records.c.state == "running")
_RENEW = (
    update(records)
    .where(_THIS, records.c.state == "running")
    .values(lease_until=bindparam("until"))
)


@dataclass(frozen=True, slots=True)
class Replay:
    status_code: int
    media_type: str
    body: bytes


def request_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def checked_key(value: str) -> str:
    if not value or len(value) > MAX_KEY_LENGTH or not value.isascii() or not value.isprintable():
        raise InvalidRequest(
            f"Invalid 'Idempotency-Key': expected 1 to {MAX_KEY_LENGTH} printable ASCII "
            "characters.",
            param="Idempotency-Key",
            code="invalid_idempotency_key",
        )
    return value


class Idempotency:
    def __init__(self, db: Database, ttl_s: float, lease_s: float) -> None:
        self.db = db
        self.ttl_s = ttl_s
        self.lease_s = lease_s
        self._held: set[tuple[str, str]] = set()  # this process's running claims
        dialect = db.sync_engine.dialect.name
        insert = postgresql.insert(records) if dialect == "postgresql" else sqlite.insert(records)
        self._claim = insert.on_conflict_do_nothing(
            index_elements=[records.c.project_id, records.c.key]
        ).returning(records.c.key)
        self._swept = 0.0

    async def claim(self, project: str, key: str, digest: str) -> Replay | None:
        """None: this request holds the key and runs. A Replay: the answer to send again.
        Raises Conflict (409) otherwise."""
        now = time.time()
        sweep = now - self._swept >= _SWEEP_EVERY_S
        if sweep:
            self._swept = now
        replay = await self.db.write(
            lambda conn: self._claim_in(conn, project, key, digest, int(now), sweep)
        )
        if replay is None:
            self._held.add((project, key))
        return replay

    def _claim_in(
        self, conn: Connection, project: str, key: str, digest: str, now: int, sweep: bool
    ) -> Replay | None:
        if sweep:
            conn.execute(_SWEEP, {"now": now})
        this = {"pid": project, "k": key}
        conn.execute(_DROP_LAPSED, {**this, "now": now})
        claimed = conn.execute(
            self._claim,
            {
                "project_id": project,
                "key": key,
                "request_digest": digest,
                "state": "running",
                "lease_until": now + int(self.lease_s),
                "expires_at": now + int(self.ttl_s),
            },
        ).first()
        if claimed is not None:
            return None
        row = conn.execute(_READ, this).first()
        if row is None:
            # Released between the insert and this read (PostgreSQL, read committed).
            raise Conflict(
                "A request with this Idempotency-Key just ended without an answer; retry.",
                param="Idempotency-Key",
                code="idempotency_key_in_progress",
                headers={"retry-after": "1"},
            )
        if row.request_digest != digest:
            raise Conflict(
                "This Idempotency-Key was already used with a different request body. "
                "Use a new key for a new request.",
                param="Idempotency-Key",
            )
        if row.state == "running":
            raise Conflict(
                "A request with this Idempotency-Key is still in progress. Retry after it "
                "completes to receive its result.",
                param="Idempotency-Key",
                code="idempotency_key_in_progress",
                headers={"retry-after": "1"},
            )
        return Replay(row.status_code, row.media_type, row.body.encode())

    async def complete(
        self, project: str, key: str, status_code: int, media_type: str, body: bytes
    ) -> None:
        self._held.discard((project, key))
        expires = int(time.time() + self.ttl_s)
        params = {
            "pid": project,
            "k": key,
            "status": status_code,
            "media": media_type,
            "body": body.decode(),
            "expires": expires,
        }
        await self.db.write(lambda conn: conn.execute(_COMPLETE, params))

    async def release(self, project: str, key: str) -> None:
        self._held.discard((project, key))
        await self.db.write(lambda conn: conn.execute(_RELEASE, {"pid": project, "k": key}))

    async def renew(self) -> None:
        """Extend the leases of this process's running claims (none: no statement)."""
        if not self._held:
            return
        until = int(time.time() + self.lease_s)
        params = [{"pid": project, "k": key, "until": until} for project, key in self._held]
        await self.db.write(lambda conn: conn.execute(_RENEW, params))
