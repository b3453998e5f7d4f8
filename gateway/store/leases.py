"""One active reconciler per backend, whatever the number of replicas.

PostgreSQL: a lease row per backend in ``reconciler_leases`` (holder, expiry by the
database's clock). A heartbeat thread renews it every lease/3 in one transaction
(``SELECT ... FOR UPDATE``, then take it if it is ours or has expired); a replica that
does not hold it tries again every min(tick, lease/3). The holder acts only until its own
monotonic clock, started *before* the renewal was sent, passes the lease: a holder that
loses the database stops before anyone else may take over. After a kill -9 the next
reconciler starts within lease + 2 ticks; a clean stop releases the lease at once.
Claims stay compare-and-set (reconciler_queries.claim_with_tasks), so even an
overlap (a tick longer than the lease) submits nothing twice, and a claim is recovered
only once it is older than a lease (may_recover).

SQLite: one machine, one file. ``server run`` holds an flock on ``<db>.server.lock`` and
whatever runs a reconciler holds ``<db>.reconciler.lock`` for its lifetime; a second
holder refuses to start. Allowed on one file: one ``server run`` (with its reconciler),
or one ``server run --no-reconciler`` plus one ``funnel reconcile``.

Cost: one single-row transaction per lease/3 per replica; ``held()`` reads a float.
``holders()`` tells the dashboard who holds each lease (gateway/store/backend_health.py);
``LeaseView`` tells the store whether this process's reconciler is the active one.
"""

from __future__ import annotations

import calendar
import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Column, Float, String, Table, func, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from funnel_hpc.core.config import Config
from funnel_hpc.gateway.store import db

log = logging.getLogger(__name__)

reconciler_leases = Table(
    "reconciler_leases", db.metadata,
    Column("backend", String(64), primary_key=True),
    Column("holder", String(256), nullable=False),
    # seconds since the epoch, by the database's clock (never a replica's)
    Column("expires_at", Float, nullable=False),
    Column("renewed_at", Float, nullable=False),
    Column("acquired_at", Float, nullable=False),
)

SERVER_ROLE = "server"
RECONCILER_ROLE = "reconciler"
_held_locks: list[int] = []  # lock file descriptors, open for the life of the process
_locked_reconcilers: set[str] = set()  # database URLs make_lease locked in this process


class SingleServerError(OSError):
    """A second server or reconciler on one SQLite file."""


class LeaseView:
    """Whether the reconcilers in this process are reconciling now (each holds its lease
    and runs its loop): each reconciler marks it under its instance's name, the store
    reads it to decide where a worker event is noted (gateway/store/reconciler_queries.py).
    Given to the store at construction; False while no reconciler runs here, and while
    any one of them stands by (a worker event of its task must then reach the database)."""

    def __init__(self) -> None:
        self._held: dict[str, bool] = {}

    def held(self) -> bool:
        return bool(self._held) and all(self._held.values())

    def mark(self, held: bool, instance: str = "") -> None:
        self._held[instance] = held


class Lease:
    """Always held: the only reconciler (SQLite, guarded by its lock file)."""

    def held(self) -> bool:
        return True

    def start(self) -> None:
        pass

    def release(self) -> None:
        pass

    def may_recover(self, claimed_at: str) -> bool:
        """Whether a submission claim (made at claimed_at, RFC 3339) was abandoned: with one
        reconciler per database any claim seen at the start of a tick was."""
        return True


class DatabaseLease(Lease):
    """The reconciler lease of one backend, kept in PostgreSQL by a heartbeat thread."""

    def __init__(self, engine: Engine, backend: str, lease_seconds: float,
                 retry_seconds: float, on_acquired: Callable[[], None] = lambda: None):
        self.engine = engine
        self.backend = backend
        self.lease_seconds = lease_seconds
        self.renew_seconds = lease_seconds / 3
        self.retry_seconds = min(retry_seconds, self.renew_seconds)
        self.on_acquired = on_acquired
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._deadline = 0.0  # time.monotonic() until which this process may act
        self._stop = threading.Event()
        self._failing = False

    def held(self) -> bool:
        return time.monotonic() < self._deadline

    def start(self) -> None:
        threading.Thread(target=self._heartbeat, name="reconciler-lease", daemon=True).start()

    def release(self) -> None:
        """Give the lease up now (clean stop): another replica takes it at its next try."""
        self._stop.set()
        self._deadline = 0.0
        t = reconciler_leases
        try:
            with db.writing(self.engine) as conn:
                conn.execute(update(t).where(t.c.backend == self.backend,
                                             t.c.holder == self.holder).values(expires_at=0.0))
        except SQLAlchemyError as exc:
            log.warning("could not release the reconciler lease (it expires): %s", exc)

    def may_recover(self, claimed_at: str) -> bool:
        """A claim younger than a lease may belong to a reconciler still submitting it (two
        ran at once): leave it. Replicas' clocks must agree to well within a lease."""
        try:
            claimed = calendar.timegm(time.strptime(claimed_at[:19], "%Y-%m-%dT%H:%M:%S"))
        except ValueError:
            return True
        return time.time() - claimed >= self.lease_seconds

    def _heartbeat(self) -> None:
        acting = False  # as last logged
        while not self._stop.is_set():
            try:
                self.try_renew()
                self._failing = False
            except SQLAlchemyError as exc:
                if not self._failing:
                    log.warning("reconciler lease of %s: database unreachable, this replica "
                                "stops reconciling when its lease runs out: %s", self.backend,
                                str(exc).splitlines()[0])
                self._failing = True
            except Exception:  # keep the heartbeat alive: a dead one would never act again
                log.exception("reconciler lease of %s: renewal failed", self.backend)
            if acting and not self.held():
                log.warning("reconciler lease of %s lost by %s; standing by", self.backend,
                            self.holder)
            acting = self.held()
            self._stop.wait(self.renew_seconds if self.held() else self.retry_seconds)

    def try_renew(self) -> bool:
        """Renew or take the lease if it is ours or has expired; True if held now."""
        started = time.monotonic()
        try:
            previous, now = self._compare_and_set()
        except IntegrityError:  # another replica inserted the first row at the same time
            return False
        if now is None:
            return False
        self._taken(previous, now, started)
        return True

    def _compare_and_set(self) -> tuple[Any, float | None]:
        """(the row before, the database's now) if this process holds the lease now,
        else (the row, None)."""
        t = reconciler_leases
        with db.writing(self.engine) as conn:
            now = database_now(conn)
            row = conn.execute(select(t).where(t.c.backend == self.backend)
                               .with_for_update()).first()
            if row is not None and row.holder != self.holder and row.expires_at >= now:
                return row, None
            values = {"holder": self.holder, "expires_at": now + self.lease_seconds,
                      "renewed_at": now}
            if row is None:
                conn.execute(insert(t).values(backend=self.backend, acquired_at=now, **values))
            elif row.holder == self.holder:
                conn.execute(update(t).where(t.c.backend == self.backend).values(**values))
            else:
                conn.execute(update(t).where(t.c.backend == self.backend)
                             .values(acquired_at=now, **values))
        return row, now

    def _taken(self, previous: Any, now: float, started: float) -> None:
        newly = not self.held()
        self._deadline = started + self.lease_seconds
        if not newly:
            return
        if previous is None or previous.holder == self.holder:
            log.info("reconciler lease of %s taken by %s (lease %gs)", self.backend,
                     self.holder, self.lease_seconds)
        else:
            # the failover gap, as the log shows it: from the last renewal of the old holder
            log.info("reconciler lease of %s taken over by %s from %s, %.1fs after its last "
                     "renewal (lease %gs)", self.backend, self.holder, previous.holder,
                     now - previous.renewed_at, self.lease_seconds)
        self.on_acquired()


def database_now(conn: Connection) -> float:
    """Seconds since the epoch by the database's clock (PostgreSQL), or this machine's."""
    if conn.dialect.name == "postgresql":
        return float(conn.execute(select(func.extract("epoch", func.clock_timestamp())))
                     .scalar_one())
    return time.time()  # SQLite: one machine, one clock


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a backend's reconciler lease, as the dashboard shows it."""

    backend: str | None  # None: SQLite's one reconciler per file, whatever its backend
    holder: str  # "host:pid"
    held: bool
    since: float  # when it was taken, seconds since the epoch (the database's clock)
    renewed_at: float | None = None


def holders(conn: Connection, url: str) -> list[Holder]:
    """PostgreSQL: every backend's lease row (held until it expires, by the database's
    clock). SQLite: the reconciler lock file, held while the process it names lives (its
    pid could be reused after a crash: same machine, rarely)."""
    if conn.dialect.name == "sqlite":
        held = _sqlite_holder(url, RECONCILER_ROLE)
        return [held] if held is not None else []
    now = database_now(conn)
    return [Holder(row.backend, ":".join(row.holder.split(":")[:2]), row.expires_at >= now,
                   row.acquired_at, row.renewed_at)
            for row in conn.execute(select(reconciler_leases)
                                    .order_by(reconciler_leases.c.backend))]


def _lock_path(database: Path, role: str) -> Path:
    return database.with_name(f"{database.name}.{role}.lock")


def _sqlite_holder(url: str, role: str) -> Holder | None:
    path = db.sqlite_path(url)
    if path is None:
        return None
    try:
        fd = os.open(_lock_path(path, role), os.O_RDONLY | os.O_NOFOLLOW)
        try:
            pid = int(os.read(fd, 32).decode(errors="replace").strip() or 0)
            since = os.fstat(fd).st_mtime  # lock_sqlite writes the pid when it locks
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return None
    alive = pid > 0  # os.kill(0, ...) would signal our own process group
    if alive:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            pass  # another user's live process
    return Holder(None, f"{socket.gethostname()}:{pid}", alive, since)


def lock_sqlite(url: str, role: str) -> None:
    """Hold <db>.<role>.lock for the life of the process, or raise SingleServerError."""
    path = db.sqlite_path(url)
    if path is None:
        return
    lock = _lock_path(path, role)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SingleServerError(
            f"another funnel {role} (pid {other}) already runs on the SQLite database "
            f"{path}; SQLite allows one server and one reconciler per file "
            "(use PostgreSQL for replicas)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks.append(fd)


def make_lease(config: Config, engine: Engine, on_acquired: Callable[[], None],
               instance: str | None = None) -> Lease:
    """The lease of this process's reconciler of `instance` (default: the single
    `backend:` form's, named after its kind), not yet started. PostgreSQL: a lease row per
    instance. SQLite: one lock file for all of this process's reconcilers (taken once)."""
    url = config.database.url
    if engine.dialect.name == "sqlite":
        if url not in _locked_reconcilers:
            lock_sqlite(url, RECONCILER_ROLE)
            _locked_reconcilers.add(url)
        return Lease()
    opts = config.reconciler
    return DatabaseLease(engine, instance or config.backend.name, opts.lease_seconds,
                         opts.interval_seconds, on_acquired)
