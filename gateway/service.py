"""The task service: one code path for validation, views, pagination, filters
and cancel, shared by the HTTP API, the gRPC server and the dashboard.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Iterable

from marshmallow import ValidationError
from sqlalchemy import and_, exists, func, insert, select, update
from sqlalchemy.engine import Engine

from funnel_hpc.backends.registry import backend_options
from funnel_hpc.gateway import db
from funnel_hpc.gateway.schemas import flatten_errors, load_task
from funnel_hpc.core.states import TERMINAL, State, can_transition
from funnel_hpc.gateway.views import apply_view, full_task
from funnel_hpc.core.events import now_rfc3339  # the one timestamp format, worker and gateway

DEFAULT_PAGE_SIZE = 256
MAX_PAGE_SIZE = 2048
TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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


# built once: SQLAlchemy caches their compiled form
_INSERT_TASK = insert(db.tasks)
_INSERT_TAG = insert(db.task_tags)


def _like_escape(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class TaskService:
    def __init__(self, engine: Engine, config: dict):
        self.engine = engine
        self.config = config
        self.backend_name: str = config["backend"]["name"]
        allowed = backend_options(config).get("backend_parameters") or {}
        # lower-cased TES backend_parameters key -> scheduler option
        self.backend_parameters: dict[str, Any] = {str(k).lower(): v for k, v in allowed.items()}
        # set when something the reconciler should act on happens in this process
        # (a task created or canceled, a worker event received): it ticks at once
        self.changed = threading.Event()

    # ---- create ----

    def create(self, document: Any, owner: str | None = None) -> str:
        try:
            spec = load_task(document)
        except ValidationError as exc:
            raise BadRequest("; ".join(flatten_errors(exc.messages))) from None
        logs = self._check_backend_parameters(spec)
        task_id = new_task_id()
        now = now_rfc3339()
        with db.writing(self.engine) as conn:
            result = conn.execute(_INSERT_TASK, {
                "id": task_id, "state": State.QUEUED.value, "name": spec.get("name"),
                "owner": owner, "creation_time": now, "spec": spec, "logs": logs,
                "backend": self.backend_name, "job_id": None, "attempt": 0, "event_seq": 0,
                "updated_at": now})
            seq = result.inserted_primary_key[0]
            tags = spec.get("tags") or {}
            if tags:
                conn.execute(_INSERT_TAG,
                             [{"task_seq": seq, "key": k, "value": v} for k, v in tags.items()])
        self.changed.set()
        return task_id

    def _check_backend_parameters(self, spec: dict) -> list:
        """Refuse (strict) or drop with a warning (default) unsupported keys."""
        resources = spec.get("resources") or {}
        params = resources.get("backend_parameters")
        if not params:
            return []
        unknown = sorted(k for k in params if k.lower() not in self.backend_parameters)
        if not unknown:
            return []
        if resources.get("backend_parameters_strict"):
            raise BadRequest(
                "resources.backend_parameters: unsupported by backend "
                f"{self.backend_name!r}: {', '.join(unknown)} (supported: "
                f"{', '.join(sorted(self.backend_parameters)) or 'none'})")
        resources["backend_parameters"] = {k: v for k, v in params.items() if k not in unknown}
        warning = (f"backend_parameters not supported by backend {self.backend_name!r} "
                   f"were ignored: {', '.join(unknown)}")
        return [{"logs": [], "outputs": [], "system_logs": [warning]}]

    # ---- read ----

    def _row_to_task(self, row: Any) -> dict:
        return full_task(row.id, row.state, row.spec, row.logs or [], row.creation_time)

    def get(self, task_id: str, view: str = "MINIMAL", owner: str | None = None) -> dict:
        row = self.get_row(task_id, owner)
        if view == "MINIMAL":
            return {"id": row.id, "state": row.state}
        return apply_view(self._row_to_task(row), view)

    def get_row(self, task_id: str, owner: str | None = None) -> Any:
        if not TASK_ID.match(task_id or ""):
            raise NotFound(f"task {task_id!r} not found")
        query = select(db.tasks).where(db.tasks.c.id == task_id)
        if owner is not None:
            query = query.where(db.tasks.c.owner == owner)
        with db.reading(self.engine) as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFound(f"task {task_id!r} not found")
        return row

    def list(self, q: ListQuery) -> tuple[list[dict], str | None]:
        page_size = q.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise BadRequest(f"page_size: must be between 1 and {MAX_PAGE_SIZE}")
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
            query = query.where(t.c.name.like(_like_escape(q.name_prefix) + "%", escape="\\"))
        if q.owner is not None:
            query = query.where(t.c.owner == q.owner)
        for key, value in q.tags.items():
            cond = and_(db.task_tags.c.task_seq == t.c.seq, db.task_tags.c.key == key)
            if value != "":
                cond = and_(cond, db.task_tags.c.value == value)
            query = query.where(exists().where(cond))
        with db.reading(self.engine) as conn:
            rows = conn.execute(query).all()
        next_token = encode_page_token(rows[page_size - 1].seq) if len(rows) > page_size else None
        rows = rows[:page_size]
        if q.view == "MINIMAL":
            tasks = [{"id": r.id, "state": r.state} for r in rows]
        else:
            tasks = [apply_view(self._row_to_task(r), q.view) for r in rows]
        return tasks, next_token

    def count(self) -> int:
        with db.reading(self.engine) as conn:
            return conn.execute(select(func.count()).select_from(db.tasks)).scalar_one()

    def state_counts(self, owner: str | None = None) -> dict[str, int]:
        t = db.tasks
        query = select(t.c.state, func.count()).group_by(t.c.state)
        if owner is not None:
            query = query.where(t.c.owner == owner)
        with db.reading(self.engine) as conn:
            return {state: n for state, n in conn.execute(query).all()}

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
                   job_id_is_null: bool | None = None, **changes: Any) -> bool:
        """Compare-and-set the state (and other columns); False if the row moved."""
        current, target = State(current), State(target)
        if not can_transition(current, target):
            return False
        t = db.tasks
        query = update(t).where(t.c.id == task_id, t.c.state == current.value)
        if job_id_is_null is True:
            query = query.where(t.c.job_id.is_(None))
        values = {"state": target.value, "updated_at": now_rfc3339(), **changes}
        with db.writing(self.engine) as conn:
            return conn.execute(query.values(**values)).rowcount == 1

    def update_fields(self, task_id: str, expected_state: State | str,
                      job_id_is_null: bool = False, **changes: Any) -> bool:
        """Change columns other than state, only while the state is still expected_state
        (and, with job_id_is_null, while no job is recorded)."""
        t = db.tasks
        query = update(t).where(t.c.id == task_id, t.c.state == State(expected_state).value)
        if job_id_is_null:
            query = query.where(t.c.job_id.is_(None))
        with db.writing(self.engine) as conn:
            return conn.execute(query.values(updated_at=now_rfc3339(), **changes)).rowcount == 1

    def set_job_id(self, task_id: str, job_id: str, logs: list) -> None:
        """Record a job whatever the state (a cancel raced the submission)."""
        t = db.tasks
        with db.writing(self.engine) as conn:
            conn.execute(update(t).where(t.c.id == task_id)
                         .values(job_id=job_id, logs=logs, updated_at=now_rfc3339()))

    def active_rows(self, limit: int = 100_000) -> list[Any]:
        """Tasks not yet terminal, oldest first (for the reconciler), without their task
        document and logs (see full_tasks, stored_logs): at 10,000 in flight it is read
        every tick, and decoding those was most of a tick."""
        t = db.tasks
        columns = [c for c in t.c if c.name not in ("spec", "logs")]
        query = (select(*columns).where(t.c.state.not_in([s.value for s in TERMINAL]))
                 .order_by(t.c.seq).limit(limit))
        with db.reading(self.engine) as conn:
            return conn.execute(query).all()

    def stored_logs(self, task_ids: list[str]) -> dict[str, list]:
        """The logs column (as stored, with gateway_logs/worker_logs) of many tasks."""
        t = db.tasks
        with db.reading(self.engine) as conn:
            rows = conn.execute(select(t.c.id, t.c.logs).where(t.c.id.in_(task_ids))).all()
        return {row.id: row.logs or [] for row in rows}

    def full_tasks(self, task_ids: list[str]) -> dict[str, dict]:
        """FULL view of many tasks, with one query."""
        t = db.tasks
        query = select(t.c.id, t.c.state, t.c.spec, t.c.logs, t.c.creation_time)
        with db.reading(self.engine) as conn:
            rows = conn.execute(query.where(t.c.id.in_(task_ids))).all()
        return {row.id: self._row_to_task(row) for row in rows}

    # ---- submission bookkeeping (reconciler), one transaction per batch ----

    def claim_for_submission(self, claims: list[tuple[str, int]]) -> set[str]:
        """Mark QUEUED tasks without a job as being submitted (job_id "") with their new
        attempt number; return the ids claimed (a task canceled or claimed by another
        reconciler meanwhile is not)."""
        t = db.tasks
        claimed: set[str] = set()
        now = now_rfc3339()
        with db.writing(self.engine) as conn:
            for task_id, attempt in claims:
                query = (update(t).where(t.c.id == task_id, t.c.state == State.QUEUED.value,
                                         t.c.job_id.is_(None))
                         .values(job_id="", attempt=attempt, event_seq=0, updated_at=now))
                if conn.execute(query).rowcount == 1:
                    claimed.add(task_id)
        return claimed

    def record_submissions(self, jobs: list[tuple[str, str, list]]) -> None:
        """Record (task id, job id, logs) of submitted jobs, whatever the state: a task
        canceled while its job was submitted keeps the job id, so the cancel reaches it."""
        t = db.tasks
        now = now_rfc3339()
        with db.writing(self.engine) as conn:
            for task_id, job_id, logs in jobs:
                conn.execute(update(t).where(t.c.id == task_id)
                             .values(job_id=job_id, logs=logs, updated_at=now))

    def release_claims(self, claims: list[tuple[str, int, int]]) -> None:
        """Give back claims (task id, previous attempt, previous event_seq) of submissions
        that could not be made now (scheduler unreachable): they are tried again."""
        t = db.tasks
        now = now_rfc3339()
        with db.writing(self.engine) as conn:
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
            "storage": list(info["storage"]),
            "tesResources_backend_parameters": sorted(self.backend_parameters),
        }
        for key, name in (("contact_url", "contactUrl"), ("documentation_url", "documentationUrl"),
                          ("environment", "environment")):
            if info[key]:
                out[name] = info[key]
        return out
