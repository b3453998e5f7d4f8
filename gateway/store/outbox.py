"""The event outbox: every accepted task event, in one table, in commit order.

``record(conn, ...)`` appends one row in the caller's transaction (the one that changes
the task), so an event exists exactly when its change does, and a task's events are in
the order of its changes. Rows get a global id that only grows (AUTOINCREMENT on
SQLite, a sequence on PostgreSQL); the publisher (gateway/sinks/publisher.py) and the watch
stream (gateway/web/watch.py) read ``id > cursor`` pages of it. Cost: one INSERT per event
(prepared, gateway/store/prepared.py) in a transaction that is already writing; readers use
the primary key.

On PostgreSQL ids are taken at INSERT but become visible at COMMIT, so id 7 can be seen
before id 6. Readers therefore stop at the first gap (``settled``) until it fills or
is older than ``gap_grace_seconds`` (a rolled-back transaction leaves a gap forever).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Index,
    Integer,
    String,
    Table,
    delete,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.engine import Connection

from funnel_hpc.core.config import EventsSection
from funnel_hpc.core.events import now_rfc3339
from funnel_hpc.gateway.store import db
from funnel_hpc.gateway.store.prepared import PreparedInsert

# BigInteger on PostgreSQL, INTEGER PRIMARY KEY AUTOINCREMENT on SQLite (never reused,
# even when the newest rows are pruned: cursors stay meaningful).
OutboxId = BigInteger().with_variant(Integer(), "sqlite")

event_outbox = Table(
    "event_outbox", db.metadata,
    Column("id", OutboxId, primary_key=True, autoincrement=True),
    Column("task_id", String(64), nullable=False),
    Column("owner", String(256), nullable=True),
    Column("kind", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("time", String(40), nullable=False),
    sqlite_autoincrement=True,
)
Index("ix_event_outbox_owner_id", event_outbox.c.owner, event_outbox.c.id)
Index("ix_event_outbox_task_id", event_outbox.c.task_id, event_outbox.c.id)

# One row per sink: the id of the last event it has taken (delivered or filtered out).
event_cursors = Table(
    "event_cursors", db.metadata,
    Column("sink", String(128), primary_key=True),
    Column("position", BigInteger, nullable=False),
)

_INSERT = PreparedInsert(event_outbox, ["task_id", "owner", "kind", "payload", "time"],
                         returning=event_outbox.c.id)


@dataclass(frozen=True)
class Event:
    """One outbox row, as sinks and the watch stream see it."""

    id: int
    task_id: str
    owner: str | None
    kind: str
    payload: Any
    time: str

    def document(self) -> dict:
        """The JSON form sent to webhooks, brokers and watchers (docs/reference.md)."""
        return {"id": self.id, "task_id": self.task_id, "owner": self.owner,
                "kind": self.kind, "time": self.time, "payload": self.payload}


def record(conn: Connection, task_id: str, owner: str | None, kind: str,
           payload: Any) -> int:
    """Append one event in the caller's transaction; return its outbox id.

    ``kind`` is a worker event type (core/events.py EVENT_TYPES) or "state" for a
    gateway state change; ``payload`` is any JSON value (the worker event as received,
    or ``{"state": ..., "previous": ...}``).
    """
    return int(_INSERT.execute(conn, {"task_id": task_id, "owner": owner, "kind": kind,
                                      "payload": payload, "time": now_rfc3339()}).scalar_one())


def record_task(conn: Connection, task_id: str, kind: str, payload: Any) -> None:
    """``record`` for callers that do not hold the task's owner: one INSERT ... SELECT
    takes it from the tasks row (nothing is recorded for an unknown task id)."""
    t = db.tasks
    owner_row = select(t.c.id, t.c.owner, literal(kind), literal(payload, JSON()),
                       literal(now_rfc3339())).where(t.c.id == task_id)
    conn.execute(insert(event_outbox).from_select(
        ["task_id", "owner", "kind", "payload", "time"], owner_row))


class GapGuard:
    """Where a reader may safely read up to, given ids not yet committed (see above)."""

    def __init__(self, grace_seconds: float):
        self.grace = grace_seconds
        self._gap_at: int | None = None   # the id after which a gap was first seen
        self._gap_since = 0.0

    def settled(self, conn: Connection, after: int, limit: int) -> int:
        """The highest id h > after (or after itself) with every id in (after, h] either
        present or missing for longer than the grace period."""
        ids = conn.execute(select(event_outbox.c.id).where(event_outbox.c.id > after)
                           .order_by(event_outbox.c.id).limit(limit)).scalars().all()
        horizon = after
        for event_id in ids:
            if event_id != horizon + 1 and not self._gap_expired(horizon):
                break
            horizon = event_id
        return horizon

    def _gap_expired(self, position: int) -> bool:
        now = time.monotonic()
        if self._gap_at != position:
            self._gap_at, self._gap_since = position, now
        return now - self._gap_since >= self.grace


def read(conn: Connection, after: int, upto: int, *, owner: str | None = None,
         task_id: str | None = None, limit: int = 500) -> list[Event]:
    """Events with after < id <= upto, oldest first, optionally one owner's / one task's."""
    t = event_outbox
    query = select(t).where(t.c.id > after, t.c.id <= upto)
    if owner is not None:
        query = query.where(t.c.owner == owner)
    if task_id is not None:
        query = query.where(t.c.task_id == task_id)
    rows = conn.execute(query.order_by(t.c.id).limit(limit)).all()
    return [Event(row.id, row.task_id, row.owner, row.kind, row.payload, row.time)
            for row in rows]


def last_id(conn: Connection) -> int:
    """The newest id (0 for an empty outbox)."""
    return int(conn.execute(select(func.coalesce(func.max(event_outbox.c.id), 0))).scalar_one())


def load_cursor(conn: Connection, sink: str, start: int) -> int:
    """A sink's position; a new sink starts at ``start`` (and it is stored)."""
    found = conn.execute(select(event_cursors.c.position)
                         .where(event_cursors.c.sink == sink)).scalar_one_or_none()
    if found is not None:
        return int(found)
    conn.execute(insert(event_cursors), {"sink": sink, "position": start})
    return start


def save_cursor(conn: Connection, sink: str, position: int) -> None:
    conn.execute(update(event_cursors).where(event_cursors.c.sink == sink)
                 .values(position=position))


def backlog(conn: Connection, sinks: Sequence[str]) -> dict[str, tuple[int, str | None]]:
    """Per sink with a cursor: (events after its cursor, the time of the first of them or
    None). One query: per sink an indexed count and a first row on the primary key, so
    it costs what is pending, not the outbox's size."""
    t, cursors = event_outbox, event_cursors
    after = t.c.id > cursors.c.position
    pending = select(func.count()).select_from(t).where(after).scalar_subquery()
    first = select(t.c.time).where(after).order_by(t.c.id).limit(1).scalar_subquery()
    rows = conn.execute(select(cursors.c.sink, pending, first)
                        .where(cursors.c.sink.in_(list(sinks)))).all()
    return {sink: (int(count), oldest) for sink, count, oldest in rows}


def prune(conn: Connection, below: int | None, before_time: str) -> int:
    """Delete events recorded before ``before_time`` (an RFC 3339 prefix) with id < below
    (every sink has taken them; None: no sink); return how many."""
    t = event_outbox
    query = delete(t).where(t.c.time < before_time)
    if below is not None:
        query = query.where(t.c.id < below)
    return int(conn.execute(query).rowcount)


def tags_of(conn: Connection, task_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """The tags of these tasks (for sink filters), {} for tasks without any."""
    t, tags = db.tasks, db.task_tags
    rows = conn.execute(select(t.c.id, tags.c.key, tags.c.value)
                        .join(tags, tags.c.task_seq == t.c.seq)
                        .where(t.c.id.in_(list(set(task_ids))))).all()
    found: dict[str, dict[str, str]] = {}
    for task_id, key, value in rows:
        found.setdefault(task_id, {})[key] = value
    return found


# The sinks' names: cursor keys here, metric labels in gateway/ops/metrics.py; the sinks
# themselves are made by gateway/sinks/targets.py.
REDIS_SINK = "redis"


def webhook_name(index: int, hook: Mapping[str, Any]) -> str:
    return f"webhook:{hook.get('name') or index}"


def sink_names(events_config: EventsSection) -> list[str]:
    """The names (cursor keys, metric labels) of the sinks make_sinks would make."""
    names = [webhook_name(index, hook)
             for index, hook in enumerate(events_config.webhooks)]
    return names + ([REDIS_SINK] if events_config.redis.url else [])
