"""The task service: one code path for validation, views, pagination, filters
and cancel, shared by the HTTP API, the gRPC server and the dashboard.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from marshmallow import ValidationError
from sqlalchemy import and_, bindparam, exists, func, insert, select, update
from sqlalchemy.engine import Engine

from funnel_hpc.core.events import now_rfc3339  # the one timestamp format, worker and gateway
from funnel_hpc.core.states import TERMINAL, State, can_transition
from funnel_hpc.gateway import db, outbox
from funnel_hpc.gateway.admission import Admission, AdmissionError
from funnel_hpc.gateway.prepared import PreparedInsert
from funnel_hpc.gateway.schemas import flatten_errors, load_task
from funnel_hpc.gateway.views import apply_view, full_task

DEFAULT_PAGE_SIZE = 256
MAX_PAGE_SIZE = 2047  # TES 1.1 ListTasks: page_size "must be less than 2048"
TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ServiceError(Exception):
    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    status = 400


class NotFound(ServiceError):
    status = 404


def new_task_id() -> str:
    return secrets.token_hex(10)


def encode_page_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def decode_page_token(token: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        version, seq = raw.split(":", 1)
        if version != "v1" or not seq.isdigit():
            raise ValueError(raw)
        return int(seq)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("page_token: not a page token this server issued") from None


@dataclass
class ListQuery:
    view: str = "MINIMAL"
    page_size: int | None = None
    page_token: str | None = None
    name_prefix: str | None = None
    state: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    owner: str | None = None


def zip_tags(keys: Iterable[str] | None, values: Iterable[str] | None) -> dict[str, str]:
    """TES 1.1: tag_key[i] pairs with tag_value[i]; a missing value matches any."""
    keys, values = list(keys or []), list(values or [])
    if len(values) > len(keys):
        raise BadRequest("tag_value: more tag_value than tag_key parameters")
    return {k: (values[i] if i < len(values) else "") for i, k in enumerate(keys)}


# the create path's INSERTs, compiled once per dialect (gateway/prepared.py)
_INSERT_TASK = PreparedInsert(db.tasks, [
    "id", "state", "name", "owner", "creation_time", "spec", "logs", "backend", "job_id",
    "attempt", "event_seq", "updated_at"], returning=db.tasks.c.seq)
_INSERT_TAG = PreparedInsert(db.task_tags, ["task_seq", "key", "value"])
_INSERT_EVENT = insert(outbox.event_outbox)
_UPDATE_FIELDS = (update(db.tasks)
                  .where(db.tasks.c.id == bindparam("b_id"),
                         db.tasks.c.state == bindparam("b_state"))
                  .values(logs=bindparam("b_logs"), event_seq=bindparam("b_event_seq"),
                          updated_at=bindparam("b_updated_at")))
# what the reconciler keeps of a task in memory: every column but the task document and logs
_ROW_COLUMNS = [c for c in db.tasks.c if c.name not in ("spec", "logs")]
_ACTIVE_STATES = [s.value for s in State if s not in TERMINAL]


@dataclass
class FieldUpdate:
    """One task's logs and event_seq, stored while it is still in expected_state, with
    the worker events folded into them (see TaskService.update_many)."""

    task_id: str
    expected_state: str
    logs: list
    event_seq: int
    events: Sequence[dict] = ()


class TaskService:
    def __init__(self, engine: Engine, config: dict):
        self.engine = engine
        self.config = config
        self.backend_name: str = config["backend"]["name"]
        self.admission = Admission(config)
        self.max_list_bytes: int = config["limits"]["max_list_bytes"]
        # set when something the reconciler should act on happens in this process
        # (a task created or canceled, a worker event received): it ticks at once
        self.changed = threading.Event()
        # tasks whose worker reported over HTTP since the reconciler last looked, kept
        # while a reconciler in this process holds the lease (it sets reconciles_here)
        self.reconciles_here: Callable[[], bool] = lambda: False
        self._worker_events: set[str] = set()
        self._worker_events_lock = threading.Lock()

    # ---- create ----

    def create(self, document: Any, owner: str | None = None) -> str:
        try:
            spec = load_task(document)
            self.admission.check_task(spec)
            logs = self.admission.admit_backend_parameters(spec)
        except ValidationError as exc:
            raise BadRequest("; ".join(flatten_errors(exc.messages))) from None
        except AdmissionError as exc:
            raise BadRequest(str(exc)) from None
        task_id = new_task_id()
        with db.writing(self.engine) as conn:
            now = now_rfc3339()  # under the write lock: (nearly) the commit time
            seq = _INSERT_TASK.execute(conn, {
                "id": task_id, "state": State.QUEUED.value, "name": spec.get("name"),
                "owner": owner, "creation_time": now, "spec": spec, "logs": logs,
                "backend": self.backend_name, "job_id": None, "attempt": 0, "event_seq": 0,
                "updated_at": now}).scalar_one()
            tags = spec.get("tags") or {}
            if tags:
                _INSERT_TAG.execute_many(
                    conn, [{"task_seq": seq, "key": k, "value": v} for k, v in tags.items()])
            # in the same transaction: an event is published iff the change was made
            outbox.record(conn, task_id, owner, "state",
                          {"state": State.QUEUED.value, "previous": None})
        self.changed.set()
        return task_id

    # ---- read ----

    def _row_to_task(self, row: Any) -> dict:
        return full_task(row.id, row.state, row.spec, row.logs or [], row.creation_time)

    def get(self, task_id: str, view: str = "MINIMAL", owner: str | None = None) -> dict:
        row = self.get_row(task_id, owner)
        if view == "MINIMAL":
            return {"id": row.id, "state": row.state}
        return apply_view(self._row_to_task(row), view)

    def get_row(self, task_id: str, owner: str | None = None) -> Any:
        if not TASK_ID.fullmatch(task_id or ""):
            raise NotFound(f"task {task_id!r} not found")
        query = select(db.tasks).where(db.tasks.c.id == task_id)
        if owner is not None:
            query = query.where(db.tasks.c.owner == owner)
        with db.reading(self.engine) as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"task {task_id!r} not found")
        return row

    # Below this method, `list` in an annotation names it: they say builtins.list.
    def list(self, q: ListQuery) -> tuple[list[dict], str | None]:
        """A page of tasks, newest first. BASIC and FULL pages also end early once their
        documents reach limits.max_list_bytes (at least one task per page), read row by
        row so memory stays near that bound whatever the page size."""
        page_size = q.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise BadRequest(f"page_size: must be between 1 and {MAX_PAGE_SIZE} "
                             "(TES: less than 2048)")
        try:
            self.admission.check_list(q.name_prefix, len(q.tags))
        except AdmissionError as exc:
            raise BadRequest(str(exc)) from None
        tasks: builtins.list[dict] = []
        size, last_seq, more = 0, 0, False
        with db.reading(self.engine) as conn:
            rows = conn.execution_options(stream_results=True).execute(
                self._list_query(q, page_size))
            for row in rows:
                if len(tasks) == page_size or (tasks and size >= self.max_list_bytes):
                    more = True
                    break
                if q.view == "MINIMAL":
                    tasks.append({"id": row.id, "state": row.state})
                else:
                    tasks.append(apply_view(self._row_to_task(row), q.view))
                    size += len(json.dumps(tasks[-1]))
                last_seq = row.seq
            rows.close()
        return tasks, encode_page_token(last_seq) if more else None

    def _list_query(self, q: ListQuery, page_size: int) -> Any:
        t = db.tasks
        columns = [t.c.seq, t.c.id, t.c.state]
        if q.view != "MINIMAL":
            columns += [t.c.spec, t.c.logs, t.c.creation_time]
        query = select(*columns).order_by(t.c.seq.desc()).limit(page_size + 1)
        if q.page_token:
            query = query.where(t.c.seq < decode_page_token(q.page_token))
        if q.state:
            query = query.where(t.c.state == State(q.state).value)
        if q.name_prefix:
            # A case-sensitive literal prefix on SQLite and PostgreSQL alike: LIKE is
            # case-insensitive on SQLite, and a range (name >= p) follows PostgreSQL's
            # collation, not code points. substr counts characters on both.
            prefix = q.name_prefix
            query = query.where(func.substr(t.c.name, 1, len(prefix)) == prefix)
        if q.owner is not None:
            query = query.where(t.c.owner == q.owner)
        for key, value in q.tags.items():
            cond = and_(db.task_tags.c.task_seq == t.c.seq, db.task_tags.c.key == key)
            if value != "":
                cond = and_(cond, db.task_tags.c.value == value)
            query = query.where(exists().where(cond))
        return query

    def count(self) -> int:
        with db.reading(self.engine) as conn:
            return conn.execute(select(func.count()).select_from(db.tasks)).scalar_one()

    def state_counts(self, owner: str | None = None) -> dict[str, int]:
        t = db.tasks
        query = select(t.c.state, func.count()).group_by(t.c.state)
        if owner is not None:
            query = query.where(t.c.owner == owner)
        with db.reading(self.engine) as conn:
            return dict(conn.execute(query).tuples().all())

    # ---- cancel ----

    def cancel(self, task_id: str, owner: str | None = None) -> str:
        """Cancel a task; return its state afterwards.

        A terminal task is left as it is (TES: 200, nothing changes). A task no
        backend job was made for yet becomes CANCELED at once; otherwise
        CANCELING, and the reconciler stops the job and records CANCELED.
        """
        row = self.get_row(task_id, owner)
        for _ in range(5):
            state = State(row.state)
            if state in TERMINAL or state == State.CANCELING:
                return state.value
            target = State.CANCELED if row.job_id is None else State.CANCELING
            if self.transition(task_id, state, target, job_id_is_null=row.job_id is None):
                self.changed.set()
                return target.value
            row = self.get_row(task_id, owner)  # it moved under us; look again
        raise ServiceError(f"task {task_id} kept changing state; cancel not applied")

    # ---- updates (reconciler, event endpoint) ----

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

    def set_job_id(self, task_id: str, job_id: str, logs: builtins.list) -> None:
        """Record a job whatever the state (a cancel raced the submission)."""
        t = db.tasks
        with db.writing(self.engine) as conn:
            conn.execute(update(t).where(t.c.id == task_id)
                         .values(job_id=job_id, logs=logs, updated_at=now_rfc3339()))

    def update_many(self, updates: builtins.list[FieldUpdate]) -> tuple[set[str], str]:
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
        query = (select(*_ROW_COLUMNS).where(t.c.state.in_(_ACTIVE_STATES))
                 .order_by(t.c.seq).limit(limit))
        with db.reading(self.engine) as conn:
            return conn.execute(query).all()

    def changed_rows(self, since: str, task_ids: Iterable[str] = ()) -> Sequence[Any]:
        """Rows (active_rows' columns, any state) whose updated_at is at or after `since`,
        and those of `task_ids`: one range read on ix_tasks_updated_at, costing what
        changed rather than what is in flight."""
        t = db.tasks
        condition = t.c.updated_at >= since
        ids = builtins.list(task_ids)
        if ids:
            condition = condition | t.c.id.in_(ids)
        with db.reading(self.engine) as conn:
            return conn.execute(select(*_ROW_COLUMNS).where(condition)).all()

    # ---- worker events received over HTTP (events_api) ----

    def note_worker_event(self, task_id: str) -> None:
        """A worker's event for task_id was received: the reconciler reads that task's
        event logs on its next tick. One in this process holding the lease is told here;
        any other (another replica, `funnel reconcile`) sees the row's updated_at move
        (one single-row UPDATE)."""
        if self.reconciles_here():
            with self._worker_events_lock:
                self._worker_events.add(task_id)
        else:
            t = db.tasks
            with db.writing(self.engine) as conn:
                conn.execute(update(t).where(t.c.id == task_id, t.c.state.in_(_ACTIVE_STATES))
                             .values(updated_at=now_rfc3339()))
        self.changed.set()

    def take_worker_events(self) -> set[str]:
        """The task ids note_worker_event collected since the last call (for the
        reconciler)."""
        with self._worker_events_lock:
            taken, self._worker_events = self._worker_events, set()
        return taken

    def stored_logs(self, task_ids: builtins.list[str]) -> dict[str, builtins.list]:
        """The logs column (as stored, with gateway_logs/worker_logs) of many tasks."""
        t = db.tasks
        with db.reading(self.engine) as conn:
            rows = conn.execute(select(t.c.id, t.c.logs).where(t.c.id.in_(task_ids))).all()
        return {row.id: row.logs or [] for row in rows}

    def full_tasks(self, task_ids: builtins.list[str]) -> dict[str, dict]:
        """FULL view of many tasks, with one query."""
        t = db.tasks
        query = select(t.c.id, t.c.state, t.c.spec, t.c.logs, t.c.creation_time)
        with db.reading(self.engine) as conn:
            rows = conn.execute(query.where(t.c.id.in_(task_ids))).all()
        return {row.id: self._row_to_task(row) for row in rows}

    # ---- submission bookkeeping (reconciler), one transaction per batch ----

    def claim_for_submission(self, claims: builtins.list[tuple[str, int]]) -> set[str]:
        """Mark QUEUED tasks without a job as being submitted (job_id "") with their new
        attempt number; return the ids claimed (a task canceled or claimed by another
        reconciler meanwhile is not).

        Safe with two reconcilers at once: on PostgreSQL the rows are locked first with
        SKIP LOCKED (a row another claimer holds is left to it, nobody waits or
        deadlocks), and each UPDATE is a compare-and-set on state, job_id and the
        previous attempt, so a claimer working from an old read claims nothing. SQLite
        writers are serialized by BEGIN IMMEDIATE (db.writing)."""
        t = db.tasks
        wanted = dict(claims)
        claimed: set[str] = set()
        with db.writing(self.engine) as conn:
            now = now_rfc3339()
            free = conn.execute(
                select(t.c.id).where(t.c.id.in_(wanted), t.c.state == State.QUEUED.value,
                                     t.c.job_id.is_(None))
                .order_by(t.c.seq).with_for_update(skip_locked=True)).scalars().all()
            for task_id in free:
                attempt = wanted[task_id]
                query = (update(t).where(t.c.id == task_id, t.c.state == State.QUEUED.value,
                                         t.c.job_id.is_(None), t.c.attempt == attempt - 1)
                         .values(job_id="", attempt=attempt, event_seq=0, updated_at=now))
                if conn.execute(query).rowcount == 1:
                    claimed.add(task_id)
        return claimed

    def record_submissions(self, jobs: builtins.list[tuple[str, str, builtins.list]]) -> None:
        """Record (task id, job id, logs) of submitted jobs, whatever the state: a task
        canceled while its job was submitted keeps the job id, so the cancel reaches it."""
        t = db.tasks
        with db.writing(self.engine) as conn:
            now = now_rfc3339()
            for task_id, job_id, logs in jobs:
                conn.execute(update(t).where(t.c.id == task_id)
                             .values(job_id=job_id, logs=logs, updated_at=now))

    def release_claims(self, claims: builtins.list[tuple[str, int, int]]) -> None:
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

    # ---- service-info ----

    def service_info(self) -> dict:
        from funnel_hpc.core import __version__

        info = self.config["service_info"]
        out: dict[str, Any] = {
            "id": info["id"],
            "name": info["name"],
            "type": {"group": "org.ga4gh", "artifact": "tes", "version": "1.1.0"},
            "description": info["description"],
            "organization": {"name": info["organization_name"], "url": info["organization_url"]},
            "version": __version__,
            # the configured list, else the stores this server has (admission.py)
            "storage": list(info["storage"]) or self.admission.advertised_storage(),
            "tesResources_backend_parameters": sorted(self.admission.parameter_keys),
        }
        for key, name in (("contact_url", "contactUrl"), ("documentation_url", "documentationUrl"),
                          ("environment", "environment")):
            if info[key]:
                out[name] = info[key]
        return out


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
