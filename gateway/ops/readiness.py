"""What /readyz checks, and how a repeated failure is logged.

``check_database``: the real database answers a read of the tasks table and (SQLite) the
write lock can be taken (``BEGIN IMMEDIATE; ROLLBACK`` on a fresh connection to the file,
with a 2 s busy timeout: a pooled connection keeps reading a file that was since made
unreadable or replaced). ``check_reconciler``: for every backend instance, some process
holds its reconciler lease (PostgreSQL: a lease row not yet expired, by the database's clock;
SQLite: the reconciler lock file's process lives) and a reconciler of the backend has
ticked lately (backend_health's last_tick_at: a hung reconciler keeps its lock).
``Repeated`` logs an error once per interval with the count of the ones it held back,
instead of one line (or traceback) each.

Cost per /readyz: one connection (SQLite) or one pooled read, plus one lease and tick read.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import Any
from urllib.parse import quote

from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from funnel_hpc.core.config import Config
from funnel_hpc.gateway.store import backend_health, db, leases

SQLITE_CHECK_TIMEOUT = 2.0  # seconds /readyz waits for SQLite's write lock
# /readyz needs no credentials, so it is not rate limited: each process checks at most
# once per CHECK_EVERY seconds and answers every probe in between from that result (a
# flood of probes cannot contend for SQLite's write lock)
CHECK_EVERY = 1.0
RETRY_AFTER_SECONDS = 5  # what every 503 of this gateway tells clients


def check_database(engine: Engine, url: str) -> str | None:
    """None when this replica can read and write the database, else why not (one line)."""
    path = db.sqlite_path(url)
    if path is not None:
        try:
            # mode=rw: a missing file is an error, not a new empty database
            raw = sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True,
                                  timeout=SQLITE_CHECK_TIMEOUT, isolation_level=None)
            try:
                raw.execute("SELECT 1 FROM tasks LIMIT 1").fetchall()
                raw.execute("BEGIN IMMEDIATE")
                raw.execute("ROLLBACK")
            finally:
                raw.close()
        except sqlite3.Error as exc:
            return f"{type(exc).__name__}: {exc}"
        return None
    try:
        with db.reading(engine) as conn:
            conn.execute(text("SELECT 1 FROM tasks LIMIT 1")).fetchall()
    except SQLAlchemyError as exc:
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return None


TICK_GRACE_SECONDS = 15.0  # at least: 3 x RECORD_EVERY (ticks are written at most that often)


def check_reconciler(engine: Engine, config: Config) -> str:
    """"ok" when, for every backend instance, a live reconciler holds its lease and has
    ticked within server.readyz_tick_intervals reconciler intervals (at least
    TICK_GRACE_SECONDS); else "none" (no holder) or "stalled" (held without ticking),
    naming the instances when there are several ("stalled: gpu")."""
    stale_after = max(TICK_GRACE_SECONDS,
                      config.server.readyz_tick_intervals * config.reconciler.interval_seconds)
    names = list(config.backends)
    none: list[str] = []
    stalled: list[str] = []
    with db.reading(engine) as conn:
        found = leases.holders(conn, config.database.url)
        for name in names:
            if not any(holder.held and holder.backend in (None, name) for holder in found):
                none.append(name)
                continue
            age = backend_health.last_tick_age(conn, name)
            if age is None or age > stale_after:
                stalled.append(name)
    for verdict, which in (("none", none), ("stalled", stalled)):
        if which:
            return verdict if len(names) == 1 else f"{verdict}: {', '.join(which)}"
    return "ok"


class Checks:
    """The database and lease checks of one process, made at most once per CHECK_EVERY
    seconds (one caller checks; concurrent ones wait for its result)."""

    def __init__(self, engine: Engine, config: Config):
        self.engine = engine
        self.config = config
        self._lock = threading.Lock()
        self._at = -CHECK_EVERY
        self._result: tuple[str | None, str | None] = (None, None)

    def result(self) -> tuple[str | None, str | None]:
        """(the database problem or None, the reconciler's check (check_reconciler): None
        when not asked (server.readyz_needs_reconciler false) or the database failed)."""
        with self._lock:
            if time.monotonic() - self._at >= CHECK_EVERY:
                self._result = self._check()
                self._at = time.monotonic()
            return self._result

    def _check(self) -> tuple[str | None, str | None]:
        problem = check_database(self.engine, self.config.database.url)
        if problem is not None or not self.config.server.readyz_needs_reconciler:
            return problem, None
        try:
            return None, check_reconciler(self.engine, self.config)
        except SQLAlchemyError as exc:
            return f"{type(exc).__name__}: {_first_line(exc)}", None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class Repeated:
    """Log a recurring error once per ``interval`` seconds per key, with how many times
    it happened meanwhile; a traceback only for the first of a run."""

    def __init__(self, logger: logging.Logger, interval: float = 30.0):
        self.logger = logger
        self.interval = interval
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (last logged, held back)
        self._lock = threading.Lock()

    def warning(self, key: str, message: str, *args: Any, exc_info: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            last, held = self._seen.get(key, (None, 0))
            if last is not None and now - last < self.interval:
                self._seen[key] = (last, held + 1)
                return
            self._seen[key] = (now, 0)
        suffix = f" (and {held} more like it in the last {self.interval:g}s)" if held else ""
        self.logger.warning(message + suffix, *args, exc_info=exc_info and last is None)
