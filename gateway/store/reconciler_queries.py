"""The reconciler's reads and writes of the task store: state transitions by
compare-and-set, logs and event_seq (one task, or many in one transaction), the rows
that changed since a time, submission claims, and the worker events the HTTP intake
noted for it. Every write records its events in the outbox in the same transaction.

ReconcilerQueries is a composed part of the one store object, not a second store: the
TaskService (gateway/store/tasks.py) makes it in its constructor over its own engine and
`changed` event and exposes it as ``service.reconciler_queries``; the API's cancel uses its
compare-and-set ``transition`` too. Kept apart because it is the reconciler's contract with
the database (what a tick may cost), not the API's. Whether a reconciler in this process
is reconciling, which decides where a worker event is noted, comes from the LeaseView the
store was given (gateway/store/leases.py).

Several backend instances: ``for_instance(name)`` gives the same store's queries seeing
only the tasks whose ``backend`` column is that instance (one reconciler each); every
read of the rows stays one query, filtered by the column. A worker event noted here goes
to every reconciler's inbox in this process (each ignores the tasks it does not hold).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Engine

from funnel_hpc.core.events import now_rfc3339
from funnel_hpc.core.routing import ROUTE_TAG
from funnel_hpc.core.states import TERMINAL, State, can_transition
from funnel_hpc.gateway.store import db, outbox
from funnel_hpc.gateway.store.leases import LeaseView
from funnel_hpc.gateway.store.task_views import full_task

_INSERT_EVENT = insert(outbox.event_outbox)
_UPDATE_FIELDS = (update(db.tasks)
                  .where(db.tasks.c.id == bindparam("b_id"),
                         db.tasks.c.state == bindparam("b_state"))
                  .values(logs=bindparam("b_logs"), event_seq=bindparam("b_event_seq"),
                          updated_at=bindparam("b_updated_at")))
# what the reconciler keeps of a task in memory: every column but the task document and logs
_ROW_COLUMNS = [c for c in db.tasks.c if c.name not in ("spec", "logs")]
_ACTIVE_STATES = [s.value for s in State if s not in TERMINAL]
# ids in one claim statement (SQLite takes 32,766 parameters a statement since 3.32)
CLAIM_CHUNK = 5000


@dataclass
class FieldUpdate:
    """One task's logs and event_seq, stored while it is still in expected_state, with
    the worker events folded into them (see ReconcilerQueries.update_many)."""

    task_id: str
    expected_state: str
    logs: list
    event_seq: int
    events: Sequence[dict] = ()


class WorkerEventInbox:
    """The tasks whose worker reported over HTTP since each reconciler of this process
    last looked: one set per reconciler. An event goes to the reconciler that holds its
    task, which alone is woken; one that none holds (not read yet) goes to all, and the
    caller wakes them all."""

    def __init__(self) -> None:
        self._sets: dict[str | None, set[str]] = {}
        # reconciler -> (wake it, whether it holds a task id)
        self._readers: dict[str | None, tuple[Callable[[], None], Callable[[str], bool]]] = {}
        self._lock = threading.Lock()

    def open(self, key: str | None, wake: Callable[[], None],
             holds: Callable[[str], bool]) -> None:
        with self._lock:
            self._sets.setdefault(key, set())
            self._readers[key] = (wake, holds)

    def note(self, task_id: str) -> bool:
        """Whether a reconciler holding the task was told (and woken)."""
        with self._lock:
            holders = [key for key, (_wake, holds) in self._readers.items() if holds(task_id)]
            for key in holders or self._sets:
                self._sets[key].add(task_id)
            wakes = [self._readers[key][0] for key in holders]
        for wake in wakes:
            wake()
        return bool(wakes)

    def take(self, key: str | None) -> set[str]:
        with self._lock:
            taken = self._sets.get(key, set())
            self._sets[key] = set()
        return taken


class ReconcilerQueries:
    """The task store's queries for the reconciler (and the worker-event intake)."""

    def __init__(self, engine: Engine, changed: threading.Event, lease_view: LeaseView,
                 instance: str | None = None, inbox: WorkerEventInbox | None = None):
        self.engine = engine
        # set when something the reconciler should act on happens in this process
        self.changed = changed
        self.lease_view = lease_view
        # None: every task (one backend instance); else only that instance's tasks
        self.instance = instance
        # tasks whose worker reported over HTTP since the reconciler last looked, kept
        # while the reconcilers in this process are reconciling (lease_view.held())
        self._inbox = inbox if inbox is not None else WorkerEventInbox()

    def for_instance(self, name: str) -> ReconcilerQueries:
        """These queries seeing only the tasks of backend instance `name` (for its
        reconciler), sharing this store's engine, wake-up event and worker-event inbox."""
        return ReconcilerQueries(self.engine, self.changed, self.lease_view, name, self._inbox)

    def _mine(self, condition: Any) -> Any:
        """condition, and (scoped to an instance) the row is that instance's."""
        return condition if self.instance is None else \
            condition & (db.tasks.c.backend == self.instance)

    def transition(self, task_id: str, current: State | str, target: State | str,
                   job_id_is_null: bool | None = None, events: Sequence[dict] = (),
                   **changes: Any) -> bool:
        """Compare-and-set the state (and other columns); False if the row moved. The
        state change and `events` (the worker's, folded into this change) go to the event
        outbox in the same transaction, after the UPDATE (whose row lock orders one task's
        events on PostgreSQL)."""
        current, target = State(current), State(target)
        if not can_transition(current, target):
            return False
        t = db.tasks
        query = update(t).where(t.c.id == task_id, t.c.state == current.value)
        if job_id_is_null is True:
            query = query.where(t.c.job_id.is_(None))
        with db.writing(self.engine) as conn:
            # updated_at is taken once the write lock is held, so it is (nearly) the commit
            # time: the reconciler reads rows changed since its last look by updated_at
            values = {"state": target.value, "updated_at": now_rfc3339(), **changes}
            if conn.execute(query.values(**values)).rowcount != 1:
                return False
            _record_changes(conn, task_id, events, current.value, target.value)
            return True

    def update_fields(self, task_id: str, expected_state: State | str,
                      job_id_is_null: bool = False, events: Sequence[dict] = (),
                      **changes: Any) -> bool:
        """Change columns other than state, only while the state is still expected_state
        (and, with job_id_is_null, while no job is recorded); `events` as in transition."""
        t = db.tasks
        query = update(t).where(t.c.id == task_id, t.c.state == State(expected_state).value)
        if job_id_is_null:
            query = query.where(t.c.job_id.is_(None))
        with db.writing(self.engine) as conn:
            if conn.execute(query.values(updated_at=now_rfc3339(), **changes)).rowcount != 1:
                return False
            _record_changes(conn, task_id, events, State(expected_state).value, None)
            return True

    def set_job_id(self, task_id: str, job_id: str, logs: list) -> None:
        """Record a job whatever the state (a cancel raced the submission)."""
        t = db.tasks
        with db.writing(self.engine) as conn:
            conn.execute(update(t).where(t.c.id == task_id)
                         .values(job_id=job_id, logs=logs, updated_at=now_rfc3339()))

    def update_many(self, updates: list[FieldUpdate]) -> tuple[set[str], str]:
        """update_fields (logs and event_seq) of many tasks in one transaction: the rows
        are locked, those still in their expected state updated by one executemany UPDATE
        and their worker events recorded by one executemany INSERT; returns the ids
        updated and the updated_at they got. One tick's live logs of 1,000 tasks cost
        one transaction, not 1,000."""
        now = now_rfc3339()
        if not updates:
            return set(), now
        t = db.tasks
        wanted = {update.task_id: update for update in updates}
        with db.writing(self.engine) as conn:
            now = now_rfc3339()
            rows = conn.execute(select(t.c.id, t.c.state, t.c.owner)
                                .where(t.c.id.in_(wanted)).order_by(t.c.seq)
                                .with_for_update()).all()
            owners = {row.id: row.owner for row in rows
                      if row.state == State(wanted[row.id].expected_state).value}
            if not owners:
                return set(), now
            conn.execute(_UPDATE_FIELDS, [
                {"b_id": task_id, "b_state": wanted[task_id].expected_state,
                 "b_logs": wanted[task_id].logs, "b_event_seq": wanted[task_id].event_seq,
                 "b_updated_at": now} for task_id in owners])
            # as _record_changes with no state change: the worker's other events
            events = [{"task_id": task_id, "owner": owner, "kind": str(event.get("type")),
                       "payload": event, "time": now}
                      for task_id, owner in owners.items()
                      for event in wanted[task_id].events if event.get("type") != "state"]
            if events:
                conn.execute(_INSERT_EVENT, events)
        return set(owners), now

    def active_rows(self, limit: int = 100_000) -> Sequence[Any]:
        """Tasks not yet terminal, oldest first (for the reconciler), without their task
        document and logs (see full_tasks, stored_logs): decoding those was most of a
        full read. The reconciler reads this on its first tick and now and then after;
        in between it reads changed_rows."""
        t = db.tasks
        query = (select(*_ROW_COLUMNS).where(self._mine(t.c.state.in_(_ACTIVE_STATES)))
                 .order_by(t.c.seq).limit(limit))
        with db.reading(self.engine) as conn:
            return conn.execute(query).all()

    def changed_rows(self, since: str, task_ids: Iterable[str] = ()) -> Sequence[Any]:
        """Rows (active_rows' columns, any state) whose updated_at is at or after `since`,
        and those of `task_ids`: one range read on ix_tasks_updated_at, costing what
        changed rather than what is in flight."""
        t = db.tasks
        condition = t.c.updated_at >= since
        ids = list(task_ids)
        if ids:
            condition = condition | t.c.id.in_(ids)
        with db.reading(self.engine) as conn:
            return conn.execute(select(*_ROW_COLUMNS).where(self._mine(condition))).all()

    def move_to_instance(self, task_id: str, job_id: str | None, target: str,
                         logs: list) -> bool:
        """Overflow: hand a QUEUED task of this instance to instance `target`, without a
        job (its next reconciler submits it), once its job here (job_id; None: it never
        got one) is confirmed gone. One compare-and-set on state, instance and job: False
        if the row moved meanwhile (a worker started, a cancel, another claim). The task's
        route tag (core/routing.py ROUTE_TAG), when it has one, names the new instance."""
        if self.instance is None:
            raise ValueError("only an instance's queries move its tasks")
        t = db.tasks
        job = t.c.job_id.is_(None) if job_id is None else t.c.job_id == job_id
        query = (update(t).where(t.c.id == task_id, t.c.state == State.QUEUED.value,
                                 t.c.backend == self.instance, job)
                 .values(backend=target, job_id=None, logs=logs))
        with db.writing(self.engine) as conn:
            if conn.execute(query.values(updated_at=now_rfc3339())).rowcount != 1:
                return False
            row = conn.execute(select(t.c.seq, t.c.spec).where(t.c.id == task_id)).one()
            tags = (row.spec or {}).get("tags") or {}
            if ROUTE_TAG in tags:
                conn.execute(update(t).where(t.c.id == task_id).values(
                    spec={**row.spec, "tags": {**tags, ROUTE_TAG: target}}))
                conn.execute(update(db.task_tags)
                             .where(db.task_tags.c.task_seq == row.seq,
                                    db.task_tags.c.key == ROUTE_TAG).values(value=target))
            return True

    # ---- worker events received over HTTP (events_api) ----

    def note_worker_event(self, task_id: str) -> None:
        """A worker's event for task_id was received: the reconciler reads that task's
        event logs on its next tick. One in this process holding the lease is told here;
        any other (another replica, `funnel reconcile`) sees the row's updated_at move
        (one single-row UPDATE)."""
        if self.lease_view.held():
            if self._inbox.note(task_id):
                return  # its reconciler was woken, and only it
        else:
            t = db.tasks
            with db.writing(self.engine) as conn:
                conn.execute(update(t).where(t.c.id == task_id, t.c.state.in_(_ACTIVE_STATES))
                             .values(updated_at=now_rfc3339()))
        self.changed.set()

    def open_worker_events(self, wake: Callable[[], None],
                           holds: Callable[[str], bool]) -> None:
        """Worker events for the tasks `holds` says the caller's reconciler holds go to it
        (take_worker_events) and `wake` it, not every reconciler of this process."""
        self._inbox.open(self.instance, wake, holds)

    def take_worker_events(self) -> set[str]:
        """The task ids note_worker_event collected since the last call (for the
        reconciler)."""
        return self._inbox.take(self.instance)

    def stored_logs(self, task_ids: list[str]) -> dict[str, list]:
        """The logs column (as stored, with gateway_logs/worker_logs) of many tasks."""
        t = db.tasks
        with db.reading(self.engine) as conn:
            rows = conn.execute(select(t.c.id, t.c.logs).where(t.c.id.in_(task_ids))).all()
        return {row.id: row.logs or [] for row in rows}

    def full_tasks(self, task_ids: list[str]) -> dict[str, dict]:
        """FULL view of many tasks, with one query."""
        return {task_id: task for task_id, (task, _) in self.tasks_and_logs(task_ids).items()}

    def tasks_and_logs(self, task_ids: list[str]) -> dict[str, tuple[dict, list]]:
        """FULL view and stored logs (stored_logs) of many tasks, each decoded once, with
        one query."""
        t = db.tasks
        query = select(t.c.id, t.c.state, t.c.spec, t.c.logs, t.c.creation_time)
        with db.reading(self.engine) as conn:
            rows = conn.execute(query.where(t.c.id.in_(task_ids))).all()
        return {row.id: _view_and_logs(row) for row in rows}

    # ---- submission bookkeeping (reconciler), one transaction per batch ----

    def claim_with_tasks(self, claims: list[tuple[str, int]]) -> dict[str, tuple[dict, list]]:
        """Mark QUEUED tasks without a job as being submitted (job_id "") with their new
        attempt number; return, for each task claimed, its FULL view and stored logs
        (as tasks_and_logs) read in the claim's own transaction: what the submission
        writes cannot be older than its claim. A task canceled or claimed by another
        reconciler meanwhile is not claimed.

        Safe with two reconcilers at once: on PostgreSQL the rows are locked first with
        SKIP LOCKED (a row another claimer holds is left to it, nobody waits or
        deadlocks), and each UPDATE is a compare-and-set on state, job_id and the
        previous attempt, so a claimer working from an old read claims nothing. SQLite
        writers are serialized by BEGIN IMMEDIATE (db.writing)."""
        t = db.tasks
        wanted = dict(claims)
        with db.writing(self.engine) as conn:
            now = now_rfc3339()
            free = conn.execute(
                select(t.c.id, t.c.attempt, t.c.state, t.c.spec, t.c.logs, t.c.creation_time)
                .where(self._mine(t.c.id.in_(wanted)), t.c.state == State.QUEUED.value,
                       t.c.job_id.is_(None))
                .order_by(t.c.seq).with_for_update(skip_locked=True)).all()
            # rows read in this write transaction (locked on PostgreSQL, the database's
            # one writer on SQLite) cannot change before the update: one statement for all
            claimed = [row for row in free if row.attempt == wanted[row.id] - 1]
            by_attempt: dict[int, list[str]] = {}
            for row in claimed:
                by_attempt.setdefault(wanted[row.id], []).append(row.id)
            # one statement per attempt number and CLAIM_CHUNK ids (a tick's first
            # attempts: one), not one per row
            for attempt, ids in by_attempt.items():
                for at in range(0, len(ids), CLAIM_CHUNK):
                    conn.execute(update(t).where(t.c.id.in_(ids[at:at + CLAIM_CHUNK]))
                                 .values(job_id="", attempt=attempt, event_seq=0,
                                         updated_at=now))
        return {row.id: _view_and_logs(row) for row in claimed}

    def record_submissions(self, jobs: list[tuple[str, str, list]]) -> None:
        """Record (task id, job id, logs) of submitted jobs, whatever the state: a task
        canceled while its job was submitted keeps the job id, so the cancel reaches it.
        One statement, executed for every job."""
        if not jobs:
            return
        t = db.tasks
        with db.writing(self.engine) as conn:
            now = now_rfc3339()
            conn.execute(update(t).where(t.c.id == bindparam("b_id"))
                         .values(job_id=bindparam("b_job"), logs=bindparam("b_logs"),
                                 updated_at=now),
                         [{"b_id": task_id, "b_job": job_id, "b_logs": logs}
                          for task_id, job_id, logs in jobs])

    def release_claims(self, claims: list[tuple[str, int, int]]) -> None:
        """Give back claims (task id, previous attempt, previous event_seq) of submissions
        that could not be made now (scheduler unreachable): they are tried again."""
        t = db.tasks
        with db.writing(self.engine) as conn:
            now = now_rfc3339()
            for task_id, attempt, event_seq in claims:
                conn.execute(update(t).where(t.c.id == task_id, t.c.state == State.QUEUED.value,
                                             t.c.job_id == "")
                             .values(job_id=None, attempt=attempt, event_seq=event_seq,
                                     updated_at=now))



def _view_and_logs(row: Any) -> tuple[dict, list]:
    """A task row's (FULL view, stored logs), as tasks_and_logs and claims return them."""
    logs = row.logs or []
    return full_task(row.id, row.state, row.spec, logs, row.creation_time), logs


def _record_changes(conn: Any, task_id: str, events: Sequence[dict], current: str,
                    target: str | None) -> None:
    """To the event outbox, in order: the worker's events folded into this change, and
    each state the task went through, once (a tick may fold RUNNING and COMPLETE at once:
    both are shown). The worker's own terminal state is not: the task's is `target`."""
    shown = current
    for event in events:
        state = event.get("state")
        if event.get("type") != "state":
            outbox.record_task(conn, task_id, str(event.get("type")), event)
        elif (target is not None and state not in (shown, target)
              and state not in TERMINAL):
            outbox.record_task(conn, task_id, "state", {"state": state, "previous": shown})
            shown = str(state)
    if target is not None and target != shown:
        outbox.record_task(conn, task_id, "state", {"state": target, "previous": shown})
