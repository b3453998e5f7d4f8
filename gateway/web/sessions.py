"""Dashboard sign-in sessions, kept in the database so signing out ends them everywhere.

The session cookie (Flask's, signed with ``auth.session_secret``) holds only a random
session id; the ``web_sessions`` table holds its SHA-256, the user and the expiry, so
a copied cookie stops working at sign-out or expiry on every replica sharing the
database, and a leaked table does not yield usable cookies. Cost: one primary-key
read per dashboard request; expired rows are deleted at each sign-in.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import BigInteger, Column, Index, String, Table, delete, insert, select
from sqlalchemy.engine import Engine

from funnel_hpc.gateway.store import db

web_sessions = Table(
    "web_sessions", db.metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("user", String(256), nullable=False),
    Column("expires_at", BigInteger, nullable=False),
)
Index("ix_web_sessions_expires_at", web_sessions.c.expires_at)


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class SessionStore:
    """Create, look up and revoke sign-in sessions."""

    def __init__(self, engine: Engine, max_age_seconds: float):
        self.engine = engine
        self.max_age = int(max_age_seconds)

    def create(self, user: str) -> str:
        session_id = secrets.token_urlsafe(32)
        now = int(time.time())
        with db.writing(self.engine) as conn:
            conn.execute(delete(web_sessions).where(web_sessions.c.expires_at <= now))
            conn.execute(insert(web_sessions).values(id_hash=_hash(session_id), user=user,
                                                     expires_at=now + self.max_age))
        return session_id

    def user_of(self, session_id: str) -> str | None:
        """The signed-in user of a live session, else None."""
        with db.reading(self.engine) as conn:
            row = conn.execute(select(web_sessions.c.user, web_sessions.c.expires_at)
                               .where(web_sessions.c.id_hash == _hash(session_id))).first()
        return row.user if row is not None and row.expires_at > time.time() else None

    def revoke(self, session_id: str) -> None:
        with db.writing(self.engine) as conn:
            conn.execute(delete(web_sessions).where(web_sessions.c.id_hash == _hash(session_id)))
