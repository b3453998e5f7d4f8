"""Metrics (/metrics), health (/healthz, /readyz) and the service's logging set-up.

Two kinds of metrics. Counts kept in the database are read when Prometheus scrapes
(``TaskCollector``: three indexed queries, whichever process serves /metrics): tasks by
state, submissions waiting, the age of the oldest QUEUED task; and per configured event
sink (``SinkCollector``: one query) the events it has not taken and the age of the
oldest. What only the reconciler or the publisher sees is recorded where it happens,
through this module's small API, in that process:

- ``observe_tick(seconds)``: one reconciler tick;
- ``count_scheduler_call(backend, command, ok)``: one scheduler command (submit, poll,
  cancel, recover); the last outcome per backend also decides /readyz;
- ``observe_task_finished(state, creation_time, start_time, end_time)``: a task ended
  (counted by final state; queue wait and run time histograms, from RFC 3339 times);
- ``observe_delivered(sink, times)``, ``count_sink_failure(sink)``: the publisher
  delivered events (counted; latency from each event's recording time) or failed a batch.

/healthz says the process answers; /readyz that the database answers a ``SELECT 1``
and the backend's last scheduler command in this process did not fail (a server run with
--no-reconciler makes none: its /readyz is the database's). None of the three needs
credentials or shows anything about a user (no owners, ids or names).

Log lines about a task carry its id (``task_id``): ``task_log(logger, id)`` gives an
adapter that sets it, and ``TaskIdFilter`` takes it from messages written
``"task %s ..."``. ``configure_logging`` applies ``logging.level|format|file``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from funnel_hpc.core.states import ALL_STATES, State
from funnel_hpc.gateway import db, outbox, readiness
from funnel_hpc.gateway.sinks import sink_names

log = logging.getLogger(__name__)
_repeated = readiness.Repeated(log)

# recorded metrics: one registry per process (the collector of a service is per app)
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
TASKS_FINISHED = Counter("funnel_tasks_finished", "Tasks that ended, by final state.",
                         ["state"], registry=REGISTRY)
QUEUE_WAIT = Histogram("funnel_task_queue_wait_seconds",
                       "Seconds from creation to the start of the task's last attempt.",
                       buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600,
                                86400), registry=REGISTRY)
RUN_TIME = Histogram("funnel_task_run_seconds", "Seconds from start to end of a task.",
                     buckets=(1, 10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400,
                              172800), registry=REGISTRY)
TICK = Histogram("funnel_reconciler_tick_seconds", "Duration of reconciler ticks.",
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                 registry=REGISTRY)
SCHEDULER_CALLS = Counter("funnel_scheduler_calls", "Scheduler commands made.",
                          ["backend", "command"], registry=REGISTRY)
SCHEDULER_ERRORS = Counter("funnel_scheduler_errors", "Scheduler commands that failed.",
                           ["backend", "command"], registry=REGISTRY)

SINK_DELIVERED = Counter("funnel_event_sink_delivered", "Events delivered to a sink.",
                         ["sink"], registry=REGISTRY)
SINK_FAILURES = Counter("funnel_event_sink_failures",
                        "Failed delivery attempts of a sink (each a batch, retried).",
                        ["sink"], registry=REGISTRY)
DELIVERY_LATENCY = Histogram("funnel_event_delivery_seconds",
                             "Seconds from an event's recording (in the transaction of its "
                             "change) to its delivery to a sink.", ["sink"],
                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                                      300, 1800, 3600), registry=REGISTRY)

_last_ok: dict[str, bool] = {}  # backend -> did its last scheduler command succeed
_last_call_lock = threading.Lock()


def observe_tick(seconds: float) -> None:
    TICK.observe(seconds)


def count_scheduler_call(backend: str, command: str, ok: bool) -> None:
    SCHEDULER_CALLS.labels(backend, command).inc()
    if not ok:
        SCHEDULER_ERRORS.labels(backend, command).inc()
    with _last_call_lock:
        _last_ok[backend] = ok


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        begun = datetime.fromisoformat(start.replace("Z", "+00:00"))
        ended = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, (ended - begun).total_seconds())


def observe_task_finished(state: str, creation_time: str | None = None,
                          start_time: str | None = None, end_time: str | None = None,
                          ended: TaskEnd | None = None) -> None:
    """Count a task that ended; with ``ended``, also its one INFO line."""
    TASKS_FINISHED.labels(State(state).value).inc()
    waited = _seconds(creation_time, start_time)
    if waited is not None:
        QUEUE_WAIT.observe(waited)
    ran = _seconds(start_time, end_time)
    if ran is not None:
        RUN_TIME.observe(ran)
    if ended is not None:
        task_log(log, ended.task_id).info(
            "task %s ended %s: owner=%s backend=%s job=%s queue_wait=%s run_time=%s reason=%s",
            ended.task_id, state, ended.owner or "-", ended.backend, ended.job_id or "-",
            _duration(waited), _duration(ran), _reason(ended.reason))


@dataclass(frozen=True)
class TaskEnd:
    """Who and where, for the line logged when a task ends or is tried again."""

    task_id: str
    owner: str | None
    backend: str
    job_id: str | None
    reason: str | None = None


def log_task_retry(ended: TaskEnd, attempt: int, max_attempts: int) -> None:
    """One INFO line: a task's job ended without its worker (LOST, preempted, ...) and
    the task goes back to QUEUED for another attempt."""
    task_log(log, ended.task_id).info(
        "task %s requeued for attempt %d of %d: owner=%s backend=%s job=%s reason=%s",
        ended.task_id, attempt, max_attempts, ended.owner or "-", ended.backend,
        ended.job_id or "-", _reason(ended.reason))


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s"


def _reason(text: str | None) -> str:
    """A log line's reason: one line, a leading RFC 3339 time taken off, 300 characters."""
    if not text:
        return "-"
    line = " ".join(text.split())
    first, _, rest = line.partition(" ")
    if rest and first[:4].isdigit() and "T" in first:
        line = rest
    return json.dumps(line[:300])


def start_sink(sink: str) -> None:
    """A sink's publisher started here: its counters and histogram show from 0."""
    for metric in (SINK_DELIVERED, SINK_FAILURES, DELIVERY_LATENCY):
        metric.labels(sink)


def observe_delivered(sink: str, recorded_times: Sequence[str]) -> None:
    """Events recorded at these RFC 3339 times were just delivered to the sink."""
    SINK_DELIVERED.labels(sink).inc(len(recorded_times))
    latency = DELIVERY_LATENCY.labels(sink)
    now = datetime.now(UTC)
    for recorded in recorded_times:
        try:
            latency.observe(max(0.0, (now - datetime.fromisoformat(recorded)).total_seconds()))
        except ValueError:
            continue  # not a time this gateway wrote: left out of the histogram


def count_sink_failure(sink: str) -> None:
    SINK_FAILURES.labels(sink).inc()


def backend_failing() -> list[str]:
    """Backends whose last scheduler command failed."""
    with _last_call_lock:
        return sorted(name for name, ok in _last_ok.items() if not ok)


# ---- scrape-time metrics from the database ----

class TaskCollector(Collector):
    """Task counts read from the database at each scrape."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("funnel_database_up", "1 when the database answered this scrape.")
        try:
            counts, waiting, oldest = self._read()
        except SQLAlchemyError as exc:
            _repeated.warning("metrics-db", "metrics: database unavailable: %s",
                              exc.__class__.__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        tasks = GaugeMetricFamily("funnel_tasks", "Tasks in the database, by state.",
                                  labels=["state"])
        for state in ALL_STATES:
            tasks.add_metric([state], counts.get(state, 0))
        yield tasks
        yield GaugeMetricFamily("funnel_submissions_waiting",
                                "QUEUED tasks with no scheduler job yet.", value=waiting)
        age = _seconds(oldest, _now()) if oldest else 0.0
        yield GaugeMetricFamily("funnel_oldest_queued_task_age_seconds",
                                "Age of the oldest QUEUED task (0: none).", value=age or 0.0)

    def _read(self) -> tuple[dict[str, int], int, str | None]:
        t = db.tasks
        queued = t.c.state == State.QUEUED.value
        with db.reading(self.engine) as conn:
            counts = {state: int(number) for state, number in
                      conn.execute(select(t.c.state, func.count()).group_by(t.c.state))}
            waiting = conn.execute(select(func.count()).select_from(t)
                                   .where(queued, t.c.job_id.is_(None))).scalar_one()
            oldest = conn.execute(select(t.c.creation_time).where(queued)
                                  .order_by(t.c.seq).limit(1)).scalar()
        return counts, int(waiting), oldest


class SinkCollector(Collector):
    """Each configured sink's backlog, read from the outbox at each scrape (one query:
    per sink an indexed count and a first row after its cursor)."""

    def __init__(self, engine: Any, sinks: Sequence[str]):
        self.engine = engine
        self.sinks = list(sinks)

    def collect(self) -> Iterator[Metric]:
        try:
            with db.reading(self.engine) as conn:
                found = outbox.backlog(conn, self.sinks)
        except SQLAlchemyError as exc:  # funnel_database_up says so; no sink figures
            log.warning("metrics: event backlog unavailable: %s", exc.__class__.__name__)
            return
        pending = GaugeMetricFamily("funnel_event_sink_pending",
                                    "Events in the outbox a sink has not taken yet.",
                                    labels=["sink"])
        age = GaugeMetricFamily("funnel_event_sink_oldest_pending_age_seconds",
                                "Age of the oldest event a sink has not taken (0: none).",
                                labels=["sink"])
        now = _now()
        for sink in self.sinks:
            count, oldest = found.get(sink, (0, None))  # no cursor yet: starts at the end
            pending.add_metric([sink], count)
            age.add_metric([sink], _seconds(oldest, now) or 0.0)
        yield pending
        yield age


class ReconcilerCollector(Collector):
    """What every replica reads of the reconcilers from the database at each scrape
    (gateway/leader.py's leases, gateway/backend_health.py's polls): one read."""

    def __init__(self, engine: Any, config: dict):
        self.engine = engine
        self.config = config

    def collect(self) -> Iterator[Metric]:
        from funnel_hpc.gateway import backend_health

        try:
            found, now = backend_health.overview(self.engine, self.config)
        except SQLAlchemyError:  # funnel_database_up says so
            return
        held = GaugeMetricFamily("funnel_reconciler_lease_held",
                                 "1 when a live reconciler holds the backend's lease.",
                                 labels=["backend"])
        renewed = GaugeMetricFamily("funnel_reconciler_lease_renewal_age_seconds",
                                    "Seconds since the lease holder's last renewal "
                                    "(PostgreSQL leases only).", labels=["backend"])
        polled = GaugeMetricFamily("funnel_backend_last_poll_age_seconds",
                                   "Seconds since a reconciler last recorded a scheduler "
                                   "poll of the backend (-1: never).", labels=["backend"])
        failing = GaugeMetricFamily("funnel_backend_failing_seconds",
                                    "Seconds the backend's polls have been failing (0: the "
                                    "last one succeeded).", labels=["backend"])
        for health in found:
            lease = health.lease
            held.add_metric([health.backend], 1 if lease is not None and lease.held else 0)
            if lease is not None and lease.renewed_at is not None:
                renewed.add_metric([health.backend], max(0.0, now - lease.renewed_at))
            polled.add_metric([health.backend], -1 if health.last_poll_at is None
                              else max(0.0, now - health.last_poll_at))
            failing.add_metric([health.backend], 0 if health.failing_since is None
                               else max(0.0, now - health.failing_since))
        yield from (held, renewed, polled, failing)


def _now() -> str:
    from funnel_hpc.core.events import now_rfc3339

    return now_rfc3339()


# ---- HTTP ----

blueprint = Blueprint("observability", __name__)
PUBLIC_ENDPOINTS = frozenset({"observability.metrics", "observability.healthz",
                              "observability.readyz"})


def _service_registry() -> CollectorRegistry:
    """This app's scrape-time collector, made at its first scrape."""
    registry = current_app.extensions.get("funnel.metrics")
    if registry is None:
        engine = current_app.extensions["funnel.service"].engine
        registry = CollectorRegistry(auto_describe=False)
        registry.register(TaskCollector(engine))
        registry.register(ReconcilerCollector(engine, current_app.extensions["funnel.config"]))
        sinks = sink_names(current_app.extensions["funnel.config"]["events"])
        if sinks:
            registry.register(SinkCollector(engine, sinks))
        current_app.extensions["funnel.metrics"] = registry
    return registry


@blueprint.get("/metrics")
def metrics() -> Response:
    body = generate_latest(_service_registry()) + generate_latest(REGISTRY)
    return Response(body, mimetype=None, content_type=CONTENT_TYPE_PLAIN_0_0_4)


@blueprint.get("/healthz")
def healthz() -> Response:
    return _json({"status": "alive"}, 200)


@blueprint.get("/readyz")
def readyz() -> Response:
    """200 when this replica can serve: the database reads and (SQLite) takes the write
    lock, a reconciler holds this backend's lease (server.readyz_needs_reconciler), and
    this process's last scheduler command (if it makes any) did not fail."""
    config = current_app.extensions["funnel.config"]
    cached = current_app.extensions.get("funnel.readiness")
    if cached is None:
        cached = current_app.extensions["funnel.readiness"] = readiness.Checks(
            current_app.extensions["funnel.service"].engine, config)
    checks = {"database": "ok", "backend": "ok"}
    problem, held = cached.result()
    if problem is not None:
        _repeated.warning("readyz-db", "readyz: database unavailable: %s", problem)
        checks["database"] = "unavailable"
    if config["server"]["readyz_needs_reconciler"]:
        checks["reconciler"] = "ok" if held else ("unknown" if held is None else "none")
    if backend_failing():
        checks["backend"] = "failing"
    ready = all(value == "ok" for value in checks.values())
    resp = _json({"status": "ready" if ready else "not ready", "checks": checks},
                 200 if ready else 503)
    if not ready:
        resp.headers["Retry-After"] = str(readiness.RETRY_AFTER_SECONDS)
    return resp


def _json(data: dict, status: int) -> Response:
    resp = Response(json.dumps(data), status=status, mimetype="application/json")
    resp.headers["Cache-Control"] = "no-store"
    return resp


# ---- logging ----

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(task_label)s: %(message)s"
_TASK_IN_MESSAGE = re.compile(r"%[sdr]|\btask %s")


class TaskIdFilter(logging.Filter):
    """Give every record ``task_id`` (None when it is about no task) and ``task_label``.

    A record without one takes the argument of a ``task %s`` in its message, so the
    existing ``log.warning("task %s: ...", task_id)`` lines carry the id too."""

    def filter(self, record: logging.LogRecord) -> bool:
        task_id = getattr(record, "task_id", None)
        if task_id is None and isinstance(record.msg, str) and "task %s" in record.msg:
            args = record.args if isinstance(record.args, tuple) else ()
            index = 0
            for match in _TASK_IN_MESSAGE.finditer(record.msg):
                if match.group(0) == "task %s":
                    task_id = str(args[index]) if index < len(args) else None
                    break
                index += 1
        record.task_id = task_id
        record.task_label = f" [task {task_id}]" if task_id else ""
        return True


def task_log(logger: logging.Logger, task_id: str) -> logging.LoggerAdapter:
    """A logger whose lines carry task_id."""
    return logging.LoggerAdapter(logger, {"task_id": task_id})


def _iso_time(record: logging.LogRecord) -> str:
    """The record's local time with its UTC offset, to the millisecond (RFC 3339)."""
    return datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT with an RFC 3339 time (zone included)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _iso_time(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339, zone included), level, logger, message,
    task_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso_time(record),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        task_id = getattr(record, "task_id", None)
        if task_id:
            entry["task_id"] = task_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class QuietAlembic(logging.Filter):
    """Alembic's INFO lines only when it changes the schema ("Running upgrade ..."): at
    every start it otherwise says which dialect and DDL mode it found."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("alembic") or record.levelno > logging.INFO:
            return True
        return record.getMessage().startswith(("Running upgrade", "Running downgrade",
                                           "Running stamp"))


def configure_logging(config: dict) -> None:
    """Root logging from the `logging` section: level, text|json, stderr or a file
    (reopened when logrotate moves it). Raises ValueError naming a bad key."""
    section = config["logging"]
    level = str(section["level"]).upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"logging.level: {section['level']!r} is not a log level")
    if section["format"] not in LOG_FORMATS:
        raise ValueError(f"logging.format must be one of {', '.join(LOG_FORMATS)}, "
                         f"not {section['format']!r}")
    handler: logging.Handler = (logging.handlers.WatchedFileHandler(section["file"])
                                if section["file"] else logging.StreamHandler(sys.stderr))
    handler.addFilter(TaskIdFilter())
    handler.addFilter(QuietAlembic())
    handler.setFormatter(JsonFormatter() if section["format"] == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
