"""Backend health, shared by every replica: each backend instance's last scheduler poll,
its last error and who holds its reconciler lease, for the dashboard (one row per
instance of `backends:`, keyed by its name).

The reconciler calls ``record_poll`` after each batched poll (``poll_error`` turns the
poll's statuses into the error, or None). It never raises: a failed write is a log line.
Cost: at most one single-row UPDATE (or the first INSERT) per RECORD_EVERY seconds per
reconciler, plus one at once whenever a poll fails after a success or the other way
round. Every failed poll is counted (``poll_errors``): the ones between two writes are
added at the next. Times are the database's clock (PostgreSQL) or the one machine's (SQLite).

Nothing here is per user: error texts have the polled job ids taken out (the local
backend's job id is the task id), so every signed-in user may see the panel.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    String,
    Table,
    Text,
    cast,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine

from funnel_hpc.backends.base import JobState, JobStatus
from funnel_hpc.core.config import Config
from funnel_hpc.gateway.store import db, leases

log = logging.getLogger(__name__)

backend_health = Table(
    "backend_health", db.metadata,
    Column("backend", String(64), primary_key=True),
    # seconds since the epoch, by the database's clock; None: never
    Column("last_poll_at", Float, nullable=True),
    Column("last_ok_at", Float, nullable=True),
    Column("failing_since", Float, nullable=True),  # None while polls succeed
    Column("last_error", Text, nullable=True),  # kept after a recovery
    Column("last_error_at", Float, nullable=True),
    Column("reporter", String(256), nullable=True),  # host:pid of the last poll's reconciler
    # failed polls ever recorded, by every reconciler (a counter: /metrics exports it)
    Column("poll_errors", BigInteger, nullable=False, server_default="0"),
    # the last tick of a reconciler of this backend (written at most every RECORD_EVERY)
    Column("last_tick_at", Float, nullable=True),
)

RECORD_EVERY = 5.0  # seconds between writes while the outcome stays the same
ERROR_CHARS = 500
JOB_PLACEHOLDER = "<job>"
_REPORTER = f"{socket.gethostname()}:{os.getpid()}"
# (database URL, backend) -> (monotonic time of the last write, whether it was an error)
_written: dict[tuple[str, str], tuple[float, bool]] = {}
# (database URL, backend) -> failed polls not yet added to the row's poll_errors
_unwritten_errors: dict[tuple[str, str], int] = {}
# (database URL, backend) -> monotonic time of the last tick written
_ticked: dict[tuple[str, str], float] = {}
_lock = threading.Lock()


_WORD = re.compile(r"[\w-]+(?:\.[\w-]+)*")


def poll_error(statuses: Mapping[str, JobStatus]) -> str | None:
    """The scheduler's words when a poll failed as a whole (every job UNKNOWN, the
    contract of backend.poll), with the job ids taken out; None when it answered."""
    if not statuses or any(status.state != JobState.UNKNOWN for status in statuses.values()):
        return None
    reason = next(iter(statuses.values())).reason or "every job UNKNOWN"
    # word by word against the set: cheap however many jobs were polled (100,000 ids in
    # one regular expression would cost the failing reconciler seconds per tick)
    def hide(match: re.Match[str]) -> str:
        word = match.group(0)  # a dotted word is an id (HTCondor's 12.0) or id.step
        if word in statuses:
            return JOB_PLACEHOLDER
        return ".".join(JOB_PLACEHOLDER if part in statuses else part
                        for part in word.split("."))

    return _WORD.sub(hide, reason)


def record_poll(engine: Engine, backend: str, error: str | None) -> None:
    """Note a scheduler poll of backend (error: its failure, from poll_error). Never
    raises: a reconciler must not stop over its health report."""
    failed = error is not None
    key = (str(engine.url), backend)
    with _lock:
        if failed:
            _unwritten_errors[key] = _unwritten_errors.get(key, 0) + 1
        last = _written.get(key)
        if last is not None and last[1] == failed and time.monotonic() - last[0] < RECORD_EVERY:
            return
        _written[key] = (time.monotonic(), failed)
        errors = _unwritten_errors.pop(key, 0)
    try:
        with db.writing(engine) as conn:
            _write(conn, backend, None if error is None else error[:ERROR_CHARS], errors)
    except Exception as exc:  # noqa: BLE001 - a report: the poll's own work goes on
        with _lock:
            _written.pop(key, None)  # try again at the next poll
            _unwritten_errors[key] = _unwritten_errors.get(key, 0) + errors
        log.warning("could not record the health of backend %s: %s", backend,
                    _first_line(exc))


def record_tick(engine: Engine, backend: str) -> None:
    """Note that a reconciler of backend ticked (/readyz: the lease holder is alive, not
    only its lock). At most one write per RECORD_EVERY seconds; never raises."""
    key = (str(engine.url), backend)
    with _lock:
        last = _ticked.get(key)
        if last is not None and time.monotonic() - last < RECORD_EVERY:
            return
        _ticked[key] = time.monotonic()
    try:
        with db.writing(engine) as conn:
            _upsert(conn, backend, {"last_tick_at": _now(conn)})
    except Exception as exc:  # noqa: BLE001 - a report: the tick's own work goes on
        with _lock:
            _ticked.pop(key, None)
        log.warning("could not record a tick of backend %s: %s", backend, _first_line(exc))


def _now(conn: Connection) -> Any:
    """Now, by the database's clock (PostgreSQL) or this machine's (SQLite)."""
    return (cast(func.extract("epoch", func.statement_timestamp()), Float)
            if conn.dialect.name == "postgresql" else time.time())


def last_tick_age(conn: Connection, backend: str) -> float | None:
    """Seconds since a reconciler of backend last recorded a tick; None: never."""
    at = conn.execute(select(backend_health.c.last_tick_at)
                      .where(backend_health.c.backend == backend)).scalar()
    return None if at is None else max(0.0, leases.database_now(conn) - at)


def _write(conn: Connection, backend: str, error: str | None, errors: int) -> None:
    t = backend_health.c
    now = _now(conn)
    values: dict[str, Any] = {"last_poll_at": now, "reporter": _REPORTER,
                              "poll_errors": t.poll_errors + errors}
    if error is None:
        values.update(last_ok_at=now, failing_since=None)
    else:
        values.update(last_error=error, last_error_at=now,
                      failing_since=func.coalesce(t.failing_since, now))
    # a first row: plain values where the update reads the old row
    _upsert(conn, backend, values, first={"poll_errors": errors, "failing_since":
                                          None if error is None else now})


def _upsert(conn: Connection, backend: str, values: dict[str, Any],
            first: dict[str, Any] | None = None) -> None:
    """Update the backend's row with values; insert it (values, `first` over them) when
    there is none yet."""
    done = conn.execute(update(backend_health).where(backend_health.c.backend == backend)
                        .values(**values))
    if done.rowcount == 0:
        conn.execute(insert(backend_health).values(backend=backend, **{**values, **(first or {})}))


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@dataclass
class Health:
    """One backend's row of the dashboard's health panel (times: seconds since the epoch)."""

    backend: str
    configured: bool  # one of this replica's backend instances (config.instances())
    last_poll_at: float | None = None
    last_ok_at: float | None = None
    failing_since: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    reporter: str | None = None
    poll_errors: int = 0
    last_tick_at: float | None = None
    lease: leases.Holder | None = None


def overview(engine: Engine, config: Config) -> tuple[list[Health], float]:
    """(every backend instance's health, the configured ones first in the file's order,
    then any other the database knows; the database's now)."""
    configured = list(config.backends)
    with db.reading(engine) as conn:
        rows = {row.backend: row for row in conn.execute(select(backend_health))}
        holders = leases.holders(conn, config.database.url)
        now = leases.database_now(conn)
    names = [*configured, *sorted((set(rows) | {h.backend for h in holders if h.backend})
                                  - set(configured))]
    result = []
    for name in names:
        row = rows.get(name)
        health = Health(name, name in configured,
                        **({k: getattr(row, k) for k in row._fields if k != "backend"}
                           if row is not None else {}))
        # SQLite's one reconciler lock names no backend: it is this database's reconcilers'
        health.lease = next((h for h in holders if h.backend == name or
                             (h.backend is None and name in configured)), None)
        result.append(health)
    return result, now
