"""The reconciler: drives every task to its true state.

Each tick it
1. reads the task rows that changed since the last tick (gateway/reconcile/index.py),
2. asks the backend about all in-flight jobs with ONE batched poll,
3. looks at the tasks whose row or job state changed, whose worker reported over HTTP,
   that a step failed for, plus a bounded round-robin sweep: reads the new lines of their
   worker event logs and applies what it learned through the state machine
   (compare-and-set in SQL; gateway/reconcile/event_folding.py), then their job state,
4. stops the jobs of CANCELING tasks, and
5. submits QUEUED tasks that have no job yet (gateway/reconcile/submission.py).

A job that ended (or vanished) without its worker recording an end becomes
SYSTEM_ERROR (PREEMPTED when the scheduler took it back) with a system log quoting
the scheduler and the tail of the job's own output file, or goes back to QUEUED for
another attempt, its own ``logs[]`` entry, when its kind of end is listed in
``reconciler.retry_on`` and attempts remain (``reconciler.max_attempts``). A job the
scheduler says can never start is canceled and its task ends SYSTEM_ERROR.
State lives in the database and the event logs only, so a restarted gateway
picks up where the old one stopped (its first tick reads everything).
Cost of a tick where nothing changed (SQLite, scheduler answer prebuilt): 10 ms CPU at
1,000 in flight, 12 ms at 10,000, 22 ms at 100,000 (benchmarks/reconciler_tick.py).

The Reconciler owns its collaborators, each passed to or made in its constructor: its
lease (gateway/store/leases.py; a SQLite one unless given), its in-flight index, a
Submitter, an EventFolder and the small parts they share (core.py). It talks to the
store through ``service.reconciler_queries`` and marks ``service.lease_view`` while it
reconciles, so the worker-event intake of this process tells it directly.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError

from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus
from funnel_hpc.core.config import Config
from funnel_hpc.core.states import State
from funnel_hpc.gateway.ops import metrics
from funnel_hpc.gateway.ops.readiness import Repeated
from funnel_hpc.gateway.reconcile import collector
from funnel_hpc.gateway.reconcile.core import (
    LOGGER_NAME,
    OTHER_END,
    RETRY_KINDS,
    RETRY_ON_CHOICES,
    SUBMITTING,
    TASK_FILE,
    EventTails,
    LookAgain,
    TaskWriter,
    TickStats,
    attempt_logs,
    task_dir,
    worker_command,
    write_worker_config,
)
from funnel_hpc.gateway.reconcile.event_folding import EventFolder
from funnel_hpc.gateway.reconcile.index import NOT_REPORTED, InFlightIndex
from funnel_hpc.gateway.reconcile.lingering import LingeringJobs
from funnel_hpc.gateway.reconcile.overflow import Overflow
from funnel_hpc.gateway.reconcile.submission import Submitter, WorkerLaunch
from funnel_hpc.gateway.store import backend_health, retention
from funnel_hpc.gateway.store.leases import Lease
from funnel_hpc.gateway.store.reconciler_queries import ReconcilerQueries
from funnel_hpc.gateway.store.tasks import TaskService, now_rfc3339

log = logging.getLogger(LOGGER_NAME)
_repeated = Repeated(log)  # a tick failing each interval: one line per 30 s

__all__ = ["SUBMITTING", "TASK_FILE", "Reconciler", "TickStats", "task_dir", "worker_command",
           "write_worker_config"]

MIN_TICK_GAP = 0.02  # seconds
JOB_OUTPUT_BYTES = 4096
PURGE_EVERY = 3600.0  # seconds between retention.task_days purges


class Reconciler:
    """Drives every task of one backend instance to its true state, one tick at a time
    (gateway/reconcile/instances.py makes one per instance)."""

    def __init__(self, service: TaskService, backend: Backend, config: Config, *,
                 lease: Lease | None = None, index: InFlightIndex | None = None,
                 queries: ReconcilerQueries | None = None,
                 wakeup: threading.Event | None = None):
        """`lease`: whether this process may reconcile now (default: always, SQLite's one
        reconciler; gateway/cli/server.py passes leases.make_lease's); `index`: its
        in-flight index (default: a new one over its queries); `queries`: the store's
        queries it uses (default: the service's reconciler_queries, every task; with
        several instances, for_instance(backend.name)'s); `wakeup`: what makes it tick
        at once (default: the service's `changed`; with several instances, its own)."""
        self.service = service
        self.queries = queries if queries is not None else service.reconciler_queries
        self.wakeup = wakeup if wakeup is not None else service.changed
        self.backend = backend
        self.config = config
        opts = config.reconciler
        self.interval = opts.interval_seconds
        self.max_attempts = max(1, opts.max_attempts)
        self.retry_on = frozenset(opts.retry_on)
        if not self.retry_on <= set(RETRY_ON_CHOICES):
            raise ValueError(f"reconciler.retry_on: {sorted(self.retry_on)} is not a list of "
                             f"{', '.join(RETRY_ON_CHOICES)}")
        self.submit_per_tick = opts.submit_per_tick
        self.lease = lease if lease is not None else Lease()
        self.index = index if index is not None else InFlightIndex(self.queries)
        self.look_again = LookAgain()
        self.tails = EventTails(self.queries, backend, Path(config.work_dir))
        self.writer = TaskWriter(self.queries, self.index, backend.name)
        self.folder = EventFolder(self.queries, self.index, self.tails, self.look_again,
                                  self.writer, backend.name)
        launch = WorkerLaunch.from_config(config, opts.pass_server_url, backend.options)
        self.submitter = Submitter(self.queries, backend, self.index, self.tails, self.writer,
                                   launch, opts.submit_threads, config.limits.per_owner)
        self.overflow = Overflow(self.queries, backend, self.index, self.tails, self.writer,
                                 self.look_again, config)
        # a worker event of one of its tasks wakes this reconciler (and not the others);
        # index.rows is read, never changed, by the intake's thread
        self.queries.open_worker_events(self.wakeup.set,
                                        lambda task_id: task_id in self.index.rows)
        self.lingering = LingeringJobs(backend, opts.linger_seconds)
        self.cancels_sent: set[str] = set()
        self.retention_seconds = config.retention.task_days * 86400
        self._next_purge = 0.0  # monotonic time of the next retention purge
        self._stop = threading.Event()
        self.last_tick = TickStats()

    # ---- loop ----

    def run_forever(self) -> None:
        log.info("reconciler started: backend=%s interval=%ss", self.backend.name, self.interval)
        changed = self.wakeup
        name = self.backend.name
        # running with the lease: this process's worker events come straight here
        view = self.service.lease_view
        reconciling = False
        while not self._stop.is_set():
            changed.clear()
            if not self.lease.held():  # another replica reconciles (gateway/store/leases.py)
                reconciling = False
                view.mark(False, name)
                changed.wait(self.interval)
                continue
            if not reconciling:  # (again) the active one: whatever we knew is old
                self.index.reset()
                self.tails.clear()
                reconciling = True
                view.mark(True, name)
            started = time.monotonic()
            backlog = False
            try:
                self.last_tick = self.tick()
                metrics.observe_tick(self.last_tick.seconds)
                backend_health.record_tick(self.service.engine, self.backend.name)  # /readyz
                backlog = self.last_tick.submitted >= self.submit_per_tick
            except Exception as exc:  # noqa: BLE001 - the loop goes on; next tick retries
                # an unreachable database is an outage, not a bug: no traceback for it
                _repeated.warning("tick", "reconciler tick failed: %s: %s",
                                  type(exc).__name__, str(exc).strip().split("\n")[0],
                                  exc_info=not isinstance(exc, (OperationalError,
                                                                InterfaceError)))
            # the next tick comes after the interval, or at once when a task is created or
            # canceled, a worker reports in this process, the backend sees a job end or
            # this tick submitted a full batch (more QUEUED tasks wait: 20,000 took 200 s
            # at 500 per 5 s tick); never sooner than MIN_TICK_GAP after this one began
            if not backlog:
                changed.wait(self.interval)
            self._stop.wait(max(0.0, MIN_TICK_GAP - (time.monotonic() - started)))
        view.mark(False, name)

    def start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, name=f"reconciler-{self.backend.name}",
                                  daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self.wakeup.set()
        self.submitter.stop()

    # ---- one tick ----

    def tick(self) -> TickStats:
        """One pass: poll, read event logs, apply job states, submit, overflow, purge
        (with Python's cyclic collector paused: gateway/reconcile/collector.py)."""
        with collector.paused():
            return self._tick()

    def _tick(self) -> TickStats:
        started = time.monotonic()
        stats = TickStats()
        index = self.index
        changed, gone, stats.rows_read = index.refresh()
        for task_id in gone:
            self.tails.drop(task_id)
        look = {row.id for row in changed if row.job_id} | self.look_again.take()
        look |= self.queries.take_worker_events()
        isolated = self.look_again.isolated
        for row in list(index.submitting.values()):
            isolated(row, "recovering its submission", self._recover_submission, row)

        statuses: dict[str, JobStatus] = {}
        job_ids = index.job_ids()
        job_ids += [job_id for job_id in self.lingering.job_ids() if job_id not in index.jobs]
        if job_ids:
            statuses = self._poll(job_ids)
            stats.polled, stats.poll_calls = len(job_ids), 1
            backend_health.record_poll(self.service.engine, self.backend.name,
                                       backend_health.poll_error(statuses))
            look |= index.job_changes(statuses)
        swept = set(index.sweep()) - look
        rows = sorted((index.rows[task_id] for task_id in look | swept
                       if task_id in index.rows and index.rows[task_id].job_id),
                      key=lambda row: row.seq)

        # worker event logs first: a task whose worker recorded its end needs no job state
        news, ended = self.folder.read_events(rows, stats)
        for row in rows:
            if row.id in ended:
                self.lingering.watch(row, statuses.get(row.job_id))
        self.lingering.reap(statuses)
        for row in rows:
            # a task only swept that had nothing new: its job state is as last applied;
            # one whose job is being withdrawn for overflow: its job state is overflow's
            if row.id in ended or (row.id in swept and row.id not in news) \
                    or self.overflow.holds(row.id):
                continue
            status = statuses.get(row.job_id, NOT_REPORTED)
            isolated(row, "applying its job state", self._apply_job_status, row, status, stats)

        self.submitter.submit_next(self.submit_per_tick, stats)
        if not stats.poll_calls and stats.unreachable is not None:
            # nothing to poll, and the scheduler could not take a job: the health row says
            # so (an instance whose every submission fails has no poll to fail)
            backend_health.record_poll(self.service.engine, self.backend.name,
                                       f"submission: {stats.unreachable}")
        self.overflow.note_tick()
        self.overflow.step(statuses)
        self._purge_if_due()
        stats.seconds = time.monotonic() - started
        return stats

    def _purge_if_due(self) -> None:
        """retention.task_days: delete tasks that ended longer ago, at most once an hour."""
        if not self.retention_seconds or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + PURGE_EVERY
        try:
            result = retention.purge(self.service.engine, self.config.work_dir,
                                     self.retention_seconds)
        except Exception:
            log.exception("retention purge failed")
            return
        if result.tasks:
            log.info("retention: deleted %d task(s) that ended before %s",
                     len(result.tasks), result.cutoff)

    def _poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """backend.poll, which never raises by contract; a backend that breaks it leaves
        this tick's jobs UNKNOWN instead of stopping the tick."""
        try:
            statuses = self.backend.poll(job_ids)
        except Exception as exc:
            log.exception("%s poll raised (it must not)", self.backend.name)
            self._count("poll", ok=False)
            reason = f"poll failed: {exc}"
            return {job_id: JobStatus(JobState.UNKNOWN, reason) for job_id in job_ids}
        # a failed query makes every job UNKNOWN (the contract)
        self._count("poll", ok=any(status.state != JobState.UNKNOWN
                                   for status in statuses.values()))
        return statuses

    def _count(self, command: str, ok: bool) -> None:
        metrics.count_scheduler_call(self.backend.name, command, ok)

    def _cancel_job(self, row: Any) -> bool:
        """Ask the scheduler to stop the row's job once; False if that request failed."""
        if row.job_id in self.cancels_sent:
            return True
        self.cancels_sent.add(row.job_id)
        try:
            self.backend.cancel(row.job_id)
        except (BackendError, OSError) as exc:
            self._count("cancel", ok=False)
            self.cancels_sent.discard(row.job_id)
            self.look_again.add(row.id)  # try again next tick
            log.warning("cancel of job %s (task %s) failed: %s", row.job_id, row.id, exc)
            return False
        self._count("cancel", ok=True)
        return True

    # ---- a claim the gateway stopped in the middle of ----

    def _recover_submission(self, row: Any) -> None:
        """The gateway stopped between claiming and recording a job. When the backend
        could not ask its scheduler, recover raises and the claim stays for next tick."""
        if not self.lease.may_recover(row.updated_at):  # its claimer may be submitting it
            return
        try:
            job_id = self.backend.recover(row.id, task_dir(self.config, row.id), row.owner)
        except Exception:
            self._count("recover", ok=False)
            raise  # LookAgain.isolated logs it; the claim stays for next tick
        self._count("recover", ok=True)
        if job_id:
            logs = attempt_logs(self.writer.stored_logs(row), row.attempt, new=False)
            logs[-1].setdefault("metadata", {}).update(
                {"backend": self.backend.name, "job_id": str(job_id), "attempt": str(row.attempt)})
            self.queries.set_job_id(row.id, job_id, logs)
            return
        tail = self.tails.of(row)
        tail.read_new()
        if row.state == State.QUEUED.value and tail.fold.last_seq == 0:
            # no job and no worker event: the gateway stopped before the job was made.
            # Give the claim back (the attempt was not used); the task is submitted anew.
            log.info("task %s was claimed but not submitted when the gateway stopped; "
                     "submitting it again", row.id)
            self.queries.release_claims([(row.id, row.attempt - 1, 0)])
            self.tails.drop(row.id)
            return
        self._fail_or_retry(row, "the gateway stopped while submitting this task and the "
                                 f"{self.backend.name} backend has no job for it")

    # ---- scheduler states ----

    def _apply_job_status(self, row: Any, status: JobStatus, stats: TickStats) -> None:
        current = State(row.state)
        if current == State.CANCELING:
            self._cancel_job(row)
            if status.state.finished:
                logs = self.writer.with_worker_log(
                    row, self.tails.of(row).fold, f"{now_rfc3339()} canceled; scheduler: "
                    f"{status.state.value} {status.reason}".rstrip())
                if self.writer.transition(row, current, State.CANCELED, logs=logs):
                    stats.finished += 1
            return
        if status.state == JobState.UNRUNNABLE:
            self._end_unrunnable(row, status, stats)
            return
        if status.state == JobState.RUNNING and current == State.QUEUED:
            if self.queries.transition(row.id, current, State.INITIALIZING):
                stats.updated += 1
            return
        if not status.state.finished:
            return
        if status.state in (JobState.PREEMPTED, JobState.NODE_FAILED):
            # a requeueing scheduler (Slurm PreemptMode=REQUEUE or JobRequeue after a
            # node failure, a job held after a failed launch, HTCondor) would run the old
            # job again beside the next attempt: remove it
            self._cancel_job(row)
        # the job ended: read the event log once more, the worker may have just finished
        if self.folder.apply_events(row, stats, status):
            return
        worker = ("the worker was signalled to end" if self.tails.of(row).fold.terminal
                  else "the worker did not record an end")
        reason = (f"the {self.backend.name} job {row.job_id} ended as {status.state.value}"
                  f" ({status.reason or 'no reason given'}) but {worker}")
        self._fail_or_retry(row, reason, status.state)
        stats.finished += 1

    def _end_unrunnable(self, row: Any, status: JobStatus, stats: TickStats) -> None:
        """The scheduler says the job can never start: cancel it, then SYSTEM_ERROR."""
        if not self._cancel_job(row):
            return  # the job stays until it is gone: asked again next tick
        logs = self.writer.with_worker_log(row, self.tails.of(row).fold, (
            f"{now_rfc3339()} the {self.backend.name} job {row.job_id} can never start as "
            f"submitted ({status.reason or 'no reason given'}); it was canceled"))
        if self.writer.transition(row, State(row.state), State.SYSTEM_ERROR, logs=logs):
            stats.finished += 1

    def _fail_or_retry(self, row: Any, reason: str, job_state: JobState = JobState.LOST) -> None:
        """A job ended without its worker recording an end: another attempt when that kind
        of end is in retry_on and attempts remain, else PREEMPTED or SYSTEM_ERROR."""
        current = State(row.state)
        logs = self.writer.with_worker_log(row, self.tails.of(row).fold,
                                           f"{now_rfc3339()} {reason}")
        for name, text in self.backend.job_output(task_dir(self.config, row.id),
                                                  JOB_OUTPUT_BYTES, row.owner):
            logs[-1]["gateway_logs"].append(
                f"{now_rfc3339()} {self.backend.name} job output, last {JOB_OUTPUT_BYTES} bytes"
                f" of {name}:\n{text}")
        kind = RETRY_KINDS.get(job_state, OTHER_END)
        if current != State.CANCELING and kind in self.retry_on \
                and row.attempt < self.max_attempts:
            logs[-1]["gateway_logs"].append(
                f"{now_rfc3339()} retrying: attempt {row.attempt + 1} of {self.max_attempts}"
                f" ({kind} is in reconciler.retry_on)")
            if self.queries.transition(row.id, current, State.QUEUED, logs=logs, job_id=None):
                metrics.log_task_retry(metrics.TaskEnd(
                    row.id, row.owner, self.backend.name, row.job_id, reason),
                    row.attempt + 1, self.max_attempts)
            self.tails.drop(row.id)
            return
        target = (State.CANCELED if current == State.CANCELING else
                  State.PREEMPTED if job_state == JobState.PREEMPTED else State.SYSTEM_ERROR)
        self.writer.transition(row, current, target, logs=logs)
