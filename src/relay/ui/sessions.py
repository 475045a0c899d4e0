"""Console sessions, kept in the database (`console_sessions`) so that every instance behind
a load balancer knows them and a sign-out ends them everywhere.

The cookie holds a random token; the row is found by the token's SHA-256 digest, so a reader
of the database cannot ride a session. The CSRF token of a session is derived from its token
(never stored): only a browser holding the cookie's token can compute it, and the page it is
given to is served only to that browser.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import Connection, delete, insert, select

from relay.storage.database import Database
from relay.storage.tables import console_sessions as sessions

Kind = Literal["admin", "project"]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_of(token: str) -> str:
    """The CSRF token of the session whose cookie holds `token`."""
    return hashlib.sha256(b"relay console csrf\x00" + token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Session:
    token: str
    kind: Kind
    subject: str  # an admin key's id, or a client key's id
    project_id: str | None  # the project a client key signed in to
    expires_at: int

    @property
    def csrf(self) -> str:
        return csrf_of(self.token)


class Sessions:
    def __init__(self, db: Database, lifetime_s: float) -> None:
        self.db = db
        self.lifetime_s = lifetime_s

    async def open(self, kind: Kind, subject: str, project_id: str | None) -> Session:
        """A new session. Expired ones are swept here, where sessions are made: no task of
        their own, and the table stays as small as its live sessions."""
        token = secrets.token_urlsafe(32)
        now = int(time.time())
        expires_at = now + round(self.lifetime_s)

        def work(conn: Connection) -> None:
            conn.execute(delete(sessions).where(sessions.c.expires_at <= now))
            conn.execute(
                insert(sessions).values(
                    id=_digest(token),
                    kind=kind,
                    subject=subject,
                    project_id=project_id,
                    created_at=now,
                    expires_at=expires_at,
                )
            )

        await self.db.write(work)
        return Session(token, kind, subject, project_id, expires_at)

    async def find(self, token: str) -> Session | None:
        """The live session whose cookie holds `token`, or None (unknown, ended, expired)."""
        now = int(time.time())
        query = select(sessions).where(sessions.c.id == _digest(token), sessions.c.expires_at > now)
        row = await self.db.read(lambda conn: conn.execute(query).first())
        if row is None:
            return None
        return Session(token, row.kind, row.subject, row.project_id, row.expires_at)

    async def close(self, token: str) -> None:
        await self.db.write(
            lambda conn: conn.execute(delete(sessions).where(sessions.c.id == _digest(token)))
        )
