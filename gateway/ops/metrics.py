"""Metrics: what /metrics shows (gateway/web/ops_routes.py serves it).

Two kinds of metrics. Counts kept in the database are read when Prometheus scrapes
(``TaskCollector``: three indexed queries, whichever process serves /metrics): tasks by
state, submissions waiting, the age of the oldest QUEUED task; and per configured event
sink (``SinkCollector``: one query) the events it has not taken and the age of the
oldest; what owners have in flight against their limits (``OwnerCollector``: one
query). What only the reconciler or the publisher sees is recorded where it happens,
through this module's small API, in that process:

- ``observe_tick(seconds)``: one reconciler tick;
- ``count_scheduler_call(backend, command, ok)``: one scheduler command (submit, poll,
  cancel, recover); the last outcome per backend also decides /readyz;
- ``observe_task_finished(state, creation_time, start_time, end_time)``: a task ended
  (counted by final state; queue wait and run time histograms, from RFC 3339 times);
- ``observe_delivered(sink, times)``, ``count_sink_failure(sink)``: the publisher
  delivered events (counted; latency from each event's recording time) or failed a batch."""

from __future__ import annotations

import json
import logging
import logging.handlers
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from funnel_hpc.core.config import Config, PerOwnerSection
from funnel_hpc.core.quotas import NO_OWNER, QuotaPolicy
from funnel_hpc.core.states import ALL_STATES, State
from funnel_hpc.gateway.ops import readiness
from funnel_hpc.gateway.ops.logs import task_log
from funnel_hpc.gateway.store import db, outbox
from funnel_hpc.gateway.store.placement import OwnerGroups

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
    (gateway/store/leases.py's leases, gateway/store/backend_health.py's polls): one read."""

    def __init__(self, engine: Any, config: Config):
        self.engine = engine
        self.config = config

    def collect(self) -> Iterator[Metric]:
        from funnel_hpc.gateway.store import backend_health

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
        errors = CounterMetricFamily("funnel_backend_poll_errors",
                                     "Failed scheduler polls of the backend, recorded by "
                                     "every reconciler.", labels=["backend"])
        for health in found:
            errors.add_metric([health.backend], health.poll_errors)
            lease = health.lease
            held.add_metric([health.backend], 1 if lease is not None and lease.held else 0)
            if lease is not None and lease.renewed_at is not None:
                renewed.add_metric([health.backend], max(0.0, now - lease.renewed_at))
            polled.add_metric([health.backend], -1 if health.last_poll_at is None
                              else max(0.0, now - health.last_poll_at))
            failing.add_metric([health.backend], 0 if health.failing_since is None
                               else max(0.0, now - health.failing_since))
        yield from (held, renewed, polled, failing, errors)


class OwnerCollector(Collector):
    """What owners have in flight (gateway/store/owner_counts.py: one grouped query per
    scrape) against limits.per_owner: totals and the owners at a limit; per owner, labelled
    by name, only with limits.per_owner.metrics_by_owner (/metrics needs no credentials,
    and one series per user is many)."""

    def __init__(self, engine: Any, per_owner: PerOwnerSection):
        self.engine = engine
        self.by_owner = per_owner.metrics_by_owner
        self.policy = QuotaPolicy(per_owner, OwnerGroups())

    def collect(self) -> Iterator[Metric]:
        from funnel_hpc.gateway.store import owner_counts

        try:
            found = owner_counts.in_flight(self.engine)
        except SQLAlchemyError:  # funnel_database_up says so
            return
        at_limit = {owner for owner, usage in found.items()
                    if self.policy.enabled and self.policy.limits(owner).at_limit(usage)}
        yield GaugeMetricFamily("funnel_owners_in_flight",
                                "Owners with tasks in flight (holding a job).",
                                value=len(found))
        yield GaugeMetricFamily("funnel_owners_at_limit",
                                "Owners who reached a limits.per_owner bound.",
                                value=len(at_limit))
        yield GaugeMetricFamily("funnel_cpu_cores_in_flight",
                                "CPU cores of the tasks in flight (resources.cpu_cores, "
                                "1 when unset).",
                                value=sum(usage.overall.cores for usage in found.values()))
        if not self.by_owner:
            return
        tasks = GaugeMetricFamily("funnel_owner_tasks_in_flight",
                                  "Tasks in flight, by owner.", labels=["owner"])
        cores = GaugeMetricFamily("funnel_owner_cpu_cores_in_flight",
                                  "CPU cores of the tasks in flight, by owner.",
                                  labels=["owner"])
        limited = GaugeMetricFamily("funnel_owner_at_limit",
                                    "1 when the owner reached a limits.per_owner bound.",
                                    labels=["owner"])
        for owner, usage in sorted(found.items(), key=lambda item: item[0] or ""):
            name = owner if owner is not None else NO_OWNER
            tasks.add_metric([name], usage.overall.tasks)
            cores.add_metric([name], usage.overall.cores)
            limited.add_metric([name], 1 if owner in at_limit else 0)
        yield from (tasks, cores, limited)


def _now() -> str:
    from funnel_hpc.core.events import now_rfc3339

    return now_rfc3339()
