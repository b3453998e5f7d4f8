"""The task service: one code path for validation, views, pagination, filters
and cancel, shared by the HTTP API, the gRPC server and the dashboard.

It is the one store object of a process: the API and the reconciler share it. The
reconciler's own reads and writes are a part it owns, ``reconciler_queries``
(gateway/store/reconciler_queries.py), made in its constructor over the same engine and
``changed`` event; the LeaseView it is given says whether a reconciler here is active.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import re
import secrets
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from marshmallow import ValidationError
from sqlalchemy import and_, exists, func, select
from sqlalchemy.engine import Engine

from funnel_hpc.backends.owners import OwnerRefused
from funnel_hpc.core.config import Config
from funnel_hpc.core.events import now_rfc3339  # the one timestamp format, worker and gateway
from funnel_hpc.core.routing import Unroutable
from funnel_hpc.core.states import TERMINAL, State
from funnel_hpc.gateway.store import db, outbox
from funnel_hpc.gateway.store.admission import Admission, AdmissionError
from funnel_hpc.gateway.store.leases import LeaseView
from funnel_hpc.gateway.store.owner_counts import task_cores
from funnel_hpc.gateway.store.page_budget import PageBudget, PageHold
from funnel_hpc.gateway.store.placement import REQUEST_KEY, Placement
from funnel_hpc.gateway.store.prepared import PreparedInsert
from funnel_hpc.gateway.store.reconciler_queries import ReconcilerQueries
from funnel_hpc.gateway.store.task_views import apply_view, full_task
from funnel_hpc.gateway.store.tes_schemas import (
    flatten_errors,
    ignored_fields_notice,
    load_task,
    load_task_lenient,
)

DEFAULT_PAGE_SIZE = 256
MAX_PAGE_SIZE = 2047  # TES 1.1 ListTasks: page_size "must be less than 2048"
TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# service-info's own key (an extension: the schema allows more properties)
SERVICE_INFO_KEY = "funnel_hpc"


class ServiceError(Exception):
    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    status = 400


class NotFound(ServiceError):
    status = 404


class Unavailable(ServiceError):
    """Not now: retry after a few seconds (HTTP 503 with Retry-After, gRPC UNAVAILABLE)."""

    status = 503


class Forbidden(ServiceError):
    """The caller may not do this at all (e.g. own a task whose job would run as them)."""

    status = 403


def _routing_message(reason: str) -> str:
    """An Unroutable's reason as a 400 message: it names its field, else "routing"."""
    head = reason.split(":", 1)[0]
    return reason if re.fullmatch(r"[A-Za-z_][\w.]*", head) and head != reason \
        else f"routing: {reason}"


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


# the create path's INSERTs, compiled once per dialect (gateway/store/prepared.py)
_INSERT_TASK = PreparedInsert(db.tasks, [
    "id", "state", "name", "owner", "creation_time", "spec", "logs", "backend", "job_id",
    "attempt", "event_seq", "updated_at", "cpu_cores"], returning=db.tasks.c.seq)
_INSERT_TAG = PreparedInsert(db.task_tags, ["task_seq", "key", "value"])


class TaskService:
    """What the API, gRPC and the dashboard call; the reconciler's own reads and writes
    are its reconciler_queries (gateway/store/reconciler_queries.py)."""

    def __init__(self, engine: Engine, config: Config, lease_view: LeaseView | None = None):
        self.engine = engine
        self.config = config
        self.admission = Admission(config)
        self.placement = Placement.from_config(config)  # the routing rules, built once
        self.strict_fields: bool = config.server.strict_fields
        self.max_list_bytes: int = config.limits.max_list_bytes
        self.page_budget = PageBudget(config.limits.max_list_bytes_in_flight)
        # set when something the reconciler should act on happens in this process
        # (a task created or canceled, a worker event received): it ticks at once
        self.changed = threading.Event()
        # whether a reconciler in this process is the active one (it marks the view)
        self.lease_view = lease_view or LeaseView()
        self.reconciler_queries = ReconcilerQueries(engine, self.changed, self.lease_view)

    # ---- create ----

    def create(self, document: Any, owner: str | None = None) -> str:
        return self.create_noting(document, owner)[0]

    def create_noting(self, document: Any, owner: str | None = None,
                      unknown: Sequence[str] = ()) -> tuple[str, list[str]]:
        """create, and its notices for the client (fields ignored as unknown: refused
        instead when server.strict_fields is set), also kept in the system logs.
        `unknown`: fields the protocol already dropped (gRPC's unknown field numbers)."""
        if unknown and self.strict_fields:
            raise BadRequest("; ".join(f"{path}: Unknown field." for path in unknown))
        try:
            spec, ignored = (load_task(document), []) if self.strict_fields else \
                load_task_lenient(document)
            self.admission.check_task(spec)
            route = self.placement.route(spec, owner)
            instance = self.admission.instances[route.instance]
            instance.check_owner(owner)
            instance.check_kind(spec)
            self.placement.take_request(spec, route)
            logs = instance.admit_backend_parameters(spec)
        except ValidationError as exc:
            raise BadRequest("; ".join(flatten_errors(exc.messages))) from None
        except Unroutable as exc:
            raise BadRequest(_routing_message(str(exc))) from None
        except AdmissionError as exc:
            raise BadRequest(str(exc)) from None
        except OwnerRefused as exc:
            raise Forbidden(str(exc)) from None
        ignored = [*unknown, *ignored]
        notices = [ignored_fields_notice(ignored)] if ignored else []
        # with several instances, the first system log line says where the task goes
        lines = [route.describe()] if self.placement.several else []
        if lines or notices:
            logs = logs or [{"logs": [], "outputs": [], "system_logs": []}]
            logs[0]["system_logs"][:0] = lines
            logs[0]["system_logs"] += notices
        task_id = new_task_id()
        with db.writing(self.engine) as conn:
            now = now_rfc3339()  # under the write lock: (nearly) the commit time
            seq = _INSERT_TASK.execute(conn, {"cpu_cores": task_cores(spec),
                "id": task_id, "state": State.QUEUED.value, "name": spec.get("name"),
                "owner": owner, "creation_time": now, "spec": spec, "logs": logs,
                "backend": route.instance, "job_id": None, "attempt": 0, "event_seq": 0,
                "updated_at": now}).scalar_one()
            tags = spec.get("tags") or {}
            if tags:
                _INSERT_TAG.execute_many(
                    conn, [{"task_seq": seq, "key": k, "value": v} for k, v in tags.items()])
            # in the same transaction: an event is published iff the change was made
            outbox.record(conn, task_id, owner, "state",
                          {"state": State.QUEUED.value, "previous": None})
        self.changed.set()
        return task_id, notices

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

    def instances_of(self, task_ids: Sequence[str]) -> dict[str, str]:
        """Task id -> the backend instance it was routed to (the dashboard's column): one
        query for a page of tasks."""
        if not task_ids:
            return {}
        query = select(db.tasks.c.id, db.tasks.c.backend).where(db.tasks.c.id.in_(task_ids))
        with db.reading(self.engine) as conn:
            return {row.id: row.backend for row in conn.execute(query)}

    # Below this method, `list` in an annotation names it: they say builtins.list.
    def list(self, q: ListQuery,
             hold: PageHold | None = None) -> tuple[list[dict], str | None]:
        """A page of tasks, newest first. BASIC and FULL pages also end early once their
        documents reach limits.max_list_bytes (at least one task per page), read row by
        row so memory stays near that bound whatever the page size. With ``hold`` (the
        API's and gRPC's pages: gateway/store/page_budget.py) the documents' bytes are
        taken from the process's budget too: a page ends early when it is spent, or is
        refused (Unavailable) when it would hold no task."""
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
                    task = apply_view(self._row_to_task(row), q.view)
                    task_bytes = len(json.dumps(task))
                    if hold is not None and not hold.take(task_bytes):
                        if not tasks:
                            raise Unavailable("server busy: too many large task pages being "
                                              "sent at once (limits.max_list_bytes_in_flight); "
                                              "retry")
                        more = True
                        break
                    tasks.append(task)
                    size += task_bytes
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

    def count_matching(self, q: ListQuery) -> int:
        """How many tasks list(q) and the pages after it hold (one COUNT: the dashboard's
        total, and with q.page_token, where its page starts)."""
        query = self._list_query(q, 1).limit(None).order_by(None)
        with db.reading(self.engine) as conn:
            return conn.execute(select(func.count()).select_from(query.subquery())).scalar_one()

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
            if self.reconciler_queries.transition(task_id, state, target,
                                                  job_id_is_null=row.job_id is None):
                self.changed.set()
                return target.value
            row = self.get_row(task_id, owner)  # it moved under us; look again
        raise ServiceError(f"task {task_id} kept changing state; cancel not applied")

    # ---- service-info ----

    def service_info(self, caller: str | None = None, extended: bool = False) -> dict:
        """GA4GH service-info for TES 1.1; `extended`: plus SERVICE_INFO_KEY, the backend
        instances the caller's tasks may be routed to (gateway/store/placement.py)."""
        from funnel_hpc.core import __version__

        info = self.config.service_info
        instances = self.instances_for(caller)
        keys = {key for instance in instances for key in instance["backend_parameters"]}
        if any(instance["requestable"] for instance in instances):
            keys.add(REQUEST_KEY)
        out: dict[str, Any] = {
            "id": info.id,
            "name": info.name,
            "type": {"group": "org.ga4gh", "artifact": "tes", "version": "1.1.0"},
            "description": info.description,
            "organization": {"name": info.organization_name, "url": info.organization_url},
            "version": __version__,
            # the configured list, else the stores this server has (admission.py)
            "storage": list(info.storage) or self.admission.advertised_storage(),
            # every key an instance the caller may reach accepts
            "tesResources_backend_parameters": sorted(keys),
        }
        for key, name in (("contact_url", "contactUrl"), ("documentation_url", "documentationUrl"),
                          ("environment", "environment")):
            if getattr(info, key):
                out[name] = getattr(info, key)
        if extended:  # valid TES, but strict clients (py-tes) refuse a key they lack
            out[SERVICE_INFO_KEY] = {"backends": instances}
        return out

    def instances_for(self, caller: str | None) -> builtins.list[dict[str, Any]]:
        """The instances the caller's tasks may be routed to: name, kind, the accepted
        backend_parameters keys, and whether backend_parameters.backend may name it."""
        return [{"name": reach.name, "kind": reach.kind,
                 "backend_parameters": sorted(self.admission.instances[reach.name]
                                              .parameter_keys),
                 "requestable": reach.requestable}
                for reach in self.placement.reachable(caller)]
