"""The reconciler: drives every task to its true state.

Each tick it
1. submits QUEUED tasks that have no job yet (task.json written to the task dir),
2. reads the new lines of each in-flight task's worker event log(s),
3. asks the backend about all in-flight jobs with ONE batched poll,
4. applies what it learned through the state machine (compare-and-set in SQL),
5. stops the jobs of CANCELING tasks.

A job that ended (or vanished) without its worker recording an end becomes
SYSTEM_ERROR (PREEMPTED when the scheduler took it back) with a system log quoting
the scheduler and the tail of the job's own output file, or goes back to QUEUED for
another attempt, its own ``logs[]`` entry, when its kind of end is listed in
``reconciler.retry_on`` and attempts remain (``reconciler.max_attempts``). A job the
scheduler says can never start is canceled and its task ends SYSTEM_ERROR.
State lives in the database and the event logs only, so a restarted gateway
picks up where the old one stopped.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from funnel_hpc.backends import files
from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.core import config as config_mod
from funnel_hpc.core import worker_tokens
from funnel_hpc.core.events import EventFold
from funnel_hpc.core.states import TERMINAL, State, can_transition
from funnel_hpc.gateway import observability, retention
from funnel_hpc.gateway.event_tail import EVENT_FILES, EventTail
from funnel_hpc.gateway.leader import Lease
from funnel_hpc.gateway.service import TaskService, now_rfc3339

log = logging.getLogger(__name__)

MIN_TICK_GAP = 0.02  # seconds
SUBMITTING = ""  # job_id while a submission is under way
TASK_FILE = "task.json"
ACTIVE_JOB_STATES = {State.QUEUED, State.INITIALIZING, State.RUNNING, State.PAUSED,
                     State.CANCELING}
# how a job ended without its worker recording an end -> its reconciler.retry_on name
RETRY_KINDS: dict[JobState, str] = {JobState.PREEMPTED: "preempted",
                                    JobState.NODE_FAILED: "node_fail", JobState.LOST: "lost"}
OTHER_END = "failed"  # any other end (the worker crashed, a time limit, ...)
RETRY_ON_CHOICES = (*RETRY_KINDS.values(), OTHER_END)
# the scheduler took the job back: a worker that saw its SIGTERM is not a user's cancel
SCHEDULER_STOPS = frozenset({JobState.PREEMPTED, JobState.NODE_FAILED})
JOB_OUTPUT_BYTES = 4096
PURGE_EVERY = 3600.0  # seconds between retention.task_days purges


def task_dir(config: dict, task_id: str) -> Path:
    return Path(config["work_dir"]) / task_id


def worker_command(config: dict) -> list[str]:
    command = list(config["worker"]["command"])
    # `python -m funnel_hpc.worker run` is `funnel worker run` without click: cheaper to start
    return command or [sys.executable, "-m", "funnel_hpc.worker", "run"]


def write_worker_config(config: dict) -> Path:
    """The sections a worker needs, already merged, written once per server start as
    JSON (mode 600): the worker reads it without parsing the YAML defaults again."""
    work_dir = Path(config["work_dir"])
    work_dir.mkdir(parents=True, exist_ok=True)
    return files.write_private(work_dir, "worker-config.json",
                               json.dumps(config_mod.worker_sections(config)))


@dataclass
class TickStats:
    submitted: int = 0
    polled: int = 0
    poll_calls: int = 0
    updated: int = 0
    finished: int = 0
    seconds: float = 0.0


class Reconciler:
    lease: Lease = Lease()  # server.make_reconciler sets this process's lease

    def __init__(self, service: TaskService, backend: Backend, config: dict):
        self.service = service
        self.backend = backend
        self.config = config
        opts = config["reconciler"]
        self.interval = float(opts["interval_seconds"])
        self.max_attempts = max(1, int(opts["max_attempts"]))
        self.retry_on = frozenset(str(kind) for kind in opts["retry_on"] or ())
        if not self.retry_on <= set(RETRY_ON_CHOICES):
            raise ValueError(f"reconciler.retry_on: {sorted(self.retry_on)} is not a list of "
                             f"{', '.join(RETRY_ON_CHOICES)}")
        self.submit_per_tick = int(opts["submit_per_tick"])
        self.submit_threads = max(1, int(opts["submit_threads"]))
        self._pool: ThreadPoolExecutor | None = None
        self.pass_server_url = bool(opts["pass_server_url"])
        self.tails: dict[str, EventTail] = {}
        self.cancels_sent: set[str] = set()
        self.worker_config = write_worker_config(config)
        backend.on_change = service.changed.set
        # with auth on, each worker gets a token for its own task (core/worker_tokens.py)
        self.worker_key = (worker_tokens.load_key(config["work_dir"])
                           if config["auth"]["mode"] != "none" else None)
        self._stop = threading.Event()
        self.last_tick = TickStats()
        self.retention_seconds = float(config["retention"]["task_days"] or 0) * 86400
        self._next_purge = 0.0  # monotonic time of the next retention purge

    # ---- loop ----

    def run_forever(self) -> None:
        log.info("reconciler started: backend=%s interval=%ss", self.backend.name, self.interval)
        changed = self.service.changed
        while not self._stop.is_set():
            changed.clear()
            if not self.lease.held():  # another replica reconciles (gateway/leader.py)
                changed.wait(self.interval)
                continue
            started = time.monotonic()
            try:
                self.last_tick = self.tick()
                observability.observe_tick(self.last_tick.seconds)
            except Exception:  # keep the loop alive; the next tick retries
                log.exception("reconciler tick failed")
            # the next tick comes after the interval, or at once when a task is created or
            # canceled, a worker reports in this process or the backend sees a job end
            # (never sooner than MIN_TICK_GAP after the previous tick began)
            changed.wait(self.interval)
            self._stop.wait(max(0.0, MIN_TICK_GAP - (time.monotonic() - started)))

    def start_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, name="reconciler", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self.service.changed.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # ---- one tick ----

    def tick(self) -> TickStats:
        started = time.monotonic()
        stats = TickStats()
        rows = self.service.active_rows()
        in_flight: dict[str, Any] = {}
        to_submit: list[Any] = []
        for row in rows:
            if row.job_id is None:
                if row.state == State.QUEUED.value:
                    to_submit.append(row)
            elif row.job_id == SUBMITTING:
                self._isolated(row, "recovering its submission", self._recover_submission, row)
            else:
                in_flight[row.id] = row

        # worker event logs first: a task whose worker recorded its end needs no poll
        self._open_tails(list(in_flight.values()))
        to_poll: dict[str, Any] = {}
        for task_id, row in in_flight.items():
            if not self._isolated(row, "reading its events", self._apply_events, row, stats):
                to_poll[task_id] = row

        if to_poll:
            ids = sorted({row.job_id for row in to_poll.values()})
            statuses = self._poll(ids)
            stats.polled, stats.poll_calls = len(ids), 1
            for row in to_poll.values():
                status = statuses.get(row.job_id, JobStatus(JobState.UNKNOWN, "not reported"))
                self._isolated(row, "applying its job state", self._apply_job_status,
                               row, status, stats)

        self._submit_batch(to_submit[: self.submit_per_tick], stats)

        # forget tails of tasks that are no longer active
        active = {row.id for row in rows}
        for task_id in list(self.tails):
            if task_id not in active:
                del self.tails[task_id]
        self._purge_if_due()
        stats.seconds = time.monotonic() - started
        return stats

    def _purge_if_due(self) -> None:
        """retention.task_days: delete tasks that ended longer ago, at most once an hour."""
        if not self.retention_seconds or time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + PURGE_EVERY
        try:
            result = retention.purge(self.service.engine, self.config["work_dir"],
                                     self.retention_seconds)
        except Exception:  # housekeeping must not stop the tick; tried again in an hour
            log.exception("retention purge failed")
            return
        if result.tasks:
            log.info("retention: deleted %d task(s) that ended before %s",
                     len(result.tasks), result.cutoff)

    def _isolated(self, row: Any, what: str, step: Callable[..., Any], *args: Any) -> Any:
        """step(*args) for one task; a failure is logged and touches no other task (that
        task's step runs again next tick). None when it failed."""
        try:
            return step(*args)
        except BackendError as exc:
            log.warning("task %s: %s failed, trying again next tick: %s", row.id, what, exc)
        except Exception:  # one task's surprise must not stop the others' ticks
            log.exception("task %s: %s failed, trying again next tick", row.id, what)
        return None

    def _poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """backend.poll, which never raises by contract; a backend that breaks it leaves
        this tick's jobs UNKNOWN instead of stopping the tick."""
        try:
            statuses = self.backend.poll(job_ids)
        except Exception as exc:  # a broken contract: log it, the tick goes on
            log.exception("%s poll raised (it must not)", self.backend.name)
            self._count("poll", ok=False)
            reason = f"poll failed: {exc}"
            return {job_id: JobStatus(JobState.UNKNOWN, reason) for job_id in job_ids}
        # a failed query makes every job UNKNOWN (the contract)
        self._count("poll", ok=any(status.state != JobState.UNKNOWN
                                   for status in statuses.values()))
        return statuses

    def _count(self, command: str, ok: bool) -> None:
        observability.count_scheduler_call(self.backend.name, command, ok)

    # ---- submission ----

    def _submit_batch(self, rows: list[Any], stats: TickStats) -> None:
        """Submit the jobs of QUEUED tasks: one read, one claim transaction, the backend's
        submissions (several at once where the backend allows it), one record transaction."""
        if not rows:
            return
        tasks = self.service.full_tasks([row.id for row in rows])
        rows = [row for row in rows if row.id in tasks]
        stored_logs = self.service.stored_logs([row.id for row in rows])
        # claim the tasks before touching their dirs: only one submitter (even with two
        # reconcilers at once), and a restart sees the claims
        claimed = self.service.claim_for_submission([(row.id, row.attempt + 1) for row in rows])
        rows = [row for row in rows if row.id in claimed]
        prepared = []
        for row in rows:
            try:
                self._prepare_task_dir(row, tasks[row.id])
            except OSError as exc:  # this task's directory only (disk full, a planted dir)
                logs = self._attempt_logs(stored_logs.get(row.id), row.attempt + 1)
                self._submission_failed(row, logs, exc, stats)
                continue
            prepared.append(row)
        rows = prepared
        outcomes = self._map_submit(rows, tasks)
        recorded: list[tuple[str, str, list]] = []
        deferred: list[tuple[str, int, int]] = []
        for row, outcome in zip(rows, outcomes, strict=True):
            attempt = row.attempt + 1
            logs = self._attempt_logs(stored_logs.get(row.id), attempt)
            if isinstance(outcome, BackendError) and outcome.transient:
                # scheduler unreachable: give the claim back, retry next tick
                log.warning("submission of task %s deferred: %s", row.id, outcome)
                deferred.append((row.id, row.attempt, row.event_seq))
            elif isinstance(outcome, Exception):
                self._submission_failed(row, logs, outcome, stats)
            else:
                logs[-1].setdefault("metadata", {}).update(
                    {"backend": self.backend.name, "job_id": str(outcome),
                     "attempt": str(attempt)})
                recorded.append((row.id, str(outcome), logs))
                self.tails[row.id] = EventTail(task_dir(self.config, row.id),
                                               len(tasks[row.id]["executors"]))
        if deferred:
            self.service.release_claims(deferred)
        if recorded:
            self.service.record_submissions(recorded)
            stats.submitted += len(recorded)

    def _prepare_task_dir(self, row: Any, task: dict) -> None:
        """task.json (and the worker's token) in the task dir, made ours and private first:
        files.py's writes follow no symlink a user may have left there."""
        directory = task_dir(self.config, row.id)
        files.private_dir(directory)
        self._archive_events(directory, row.attempt)
        # the owner rides along (users cannot set it: the API refuses unknown fields), so
        # a root worker opens file:// paths as that user (worker/owner_access.py)
        files.write_private(directory, TASK_FILE, json.dumps({**task, "owner": row.owner}))
        if self.worker_key is not None:
            files.write_private(directory, worker_tokens.TOKEN_FILE,
                                worker_tokens.token_for(self.worker_key, row.id))

    def _map_submit(self, rows: list[Any], tasks: dict[str, dict]) -> list[Any]:
        """backend.submit for each row: the job id, or the exception it raised."""
        def one(row: Any) -> Any:
            directory = task_dir(self.config, row.id)
            task = tasks[row.id]
            token = (worker_tokens.token_for(self.worker_key, row.id)
                     if self.worker_key is not None else None)
            request = SubmitRequest(task_id=row.id, task=task, task_dir=directory,
                                    worker_argv=self._worker_argv(directory),
                                    backend_parameters=_lower_keys(task), owner=row.owner,
                                    worker_token=token)
            try:
                job_id = self.backend.submit(request)
            except (BackendError, OSError, ValueError) as exc:
                # a refusal is the scheduler answering: only "unreachable" is a failed call
                self._count("submit", ok=not getattr(exc, "transient", False))
                return exc
            except Exception as exc:  # a backend bug fails this task only, not the batch
                log.exception("task %s: %s submit raised", row.id, self.backend.name)
                self._count("submit", ok=False)
                return exc
            self._count("submit", ok=True)
            return job_id

        if self.submit_threads > 1 and self.backend.parallel_submit and len(rows) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.submit_threads,
                                                thread_name_prefix="submit")
            return list(self._pool.map(one, rows))
        return [one(row) for row in rows]

    def _submission_failed(self, row: Any, logs: list, exc: Exception, stats: TickStats) -> None:
        logs[-1]["gateway_logs"].append(f"{now_rfc3339()} submission to {self.backend.name} "
                                        f"failed: {exc}")
        self._transition(row, State.QUEUED, State.SYSTEM_ERROR, logs=logs, job_id=None)
        stats.finished += 1

    def _worker_argv(self, directory: Path) -> list[str]:
        argv = [*worker_command(self.config), "--task-file", str(directory / TASK_FILE),
                "--workdir", self.config["work_dir"], "--config", str(self.worker_config)]
        if self.pass_server_url:
            argv += ["--server", self.config["server"]["public_url"]]
        return argv

    def _recover_submission(self, row: Any) -> None:
        """The gateway stopped between claiming and recording a job. When the backend
        could not ask its scheduler, recover raises and the claim stays for next tick."""
        if not self.lease.may_recover(row.updated_at):  # its claimer may be submitting it
            return
        try:
            job_id = self.backend.recover(row.id, task_dir(self.config, row.id))
        except Exception:
            self._count("recover", ok=False)
            raise  # _isolated logs it; the claim stays for next tick
        self._count("recover", ok=True)
        if job_id:
            logs = self._attempt_logs(self._stored_logs(row), row.attempt, new=False)
            logs[-1].setdefault("metadata", {}).update(
                {"backend": self.backend.name, "job_id": str(job_id), "attempt": str(row.attempt)})
            self.service.set_job_id(row.id, job_id, logs)
            return
        tail = self._tail(row)
        tail.read_new()
        if row.state == State.QUEUED.value and tail.fold.last_seq == 0:
            # no job and no worker event: the gateway stopped before the job was made.
            # Give the claim back (the attempt was not used); the task is submitted anew.
            log.info("task %s was claimed but not submitted when the gateway stopped; "
                     "submitting it again", row.id)
            self.service.release_claims([(row.id, row.attempt - 1, 0)])
            self.tails.pop(row.id, None)
            return
        self._fail_or_retry(row, "the gateway stopped while submitting this task and the "
                                 f"{self.backend.name} backend has no job for it")

    # ---- worker events ----

    def _open_tails(self, rows: list[Any]) -> None:
        """Event tails for the rows that have none yet, each knowing its task's executor
        count (one read of the task documents for all of them)."""
        new = [row.id for row in rows if row.id not in self.tails]
        if not new:
            return
        tasks = self.service.full_tasks(new)
        for task_id in new:
            executors = len((tasks.get(task_id) or {}).get("executors") or []) or None
            self.tails[task_id] = EventTail(task_dir(self.config, task_id), executors)

    def _tail(self, row: Any) -> EventTail:
        if row.id not in self.tails:
            self._open_tails([row])
        return self.tails[row.id]

    def _apply_events(self, row: Any, stats: TickStats, status: JobStatus | None = None) -> bool:
        """Fold new worker events into the row; True if the task is now terminal.

        `status`: the scheduler's word on a job that ended, when known. A worker that was
        signalled (CANCELED) without a TES cancel is not judged without it: preemption
        and a node failure are retried or PREEMPTED by the caller, any other stop is
        SYSTEM_ERROR."""
        tail = self._tail(row)
        tail.read_new()
        fold = tail.fold
        # the worker's events this change stores, once each (a restarted gateway re-reads
        # the logs from the start: the row's event_seq says what was stored before)
        events = [event for event in tail.fresh if event.get("seq", 0) > row.event_seq]
        if fold.last_seq <= row.event_seq and not fold.terminal:
            tail.fresh.clear()
            return False
        current = State(row.state)
        target = current
        note = None
        if fold.state and can_transition(current, fold.state):
            target = State(fold.state)
        if current == State.CANCELING and fold.terminal:
            target = State.CANCELED
        elif target == State.CANCELED:
            if status is None or status.state in SCHEDULER_STOPS:
                target = current  # ask the scheduler (poll), or let the caller retry
            else:
                target = State.SYSTEM_ERROR
                note = (f"{now_rfc3339()} the {self.backend.name} job {row.job_id} was stopped "
                        "outside the gateway (the worker was signalled to end) without a TES "
                        f"cancel; scheduler: {status.state.value} {status.reason}".rstrip())
        if target == current and fold.last_seq <= row.event_seq:
            tail.fresh.clear()
            return False  # a stopped worker waiting for the scheduler's word: nothing new
        logs = self._merge_worker_log(row, fold, note)
        if target != current:
            ok = self._transition(row, current, target, logs=logs, event_seq=fold.last_seq,
                                  events=events)
        else:
            ok = self.service.update_fields(row.id, current, logs=logs, event_seq=fold.last_seq,
                                            events=events)
        if ok:
            tail.fresh.clear()
            stats.updated += 1
            if target in TERMINAL:
                stats.finished += 1
        return target in TERMINAL

    def _merge_worker_log(self, row: Any, fold: EventFold, note: str | None = None) -> list:
        logs = self._attempt_logs(self._stored_logs(row), max(row.attempt, 1), new=False)
        current = logs[-1]
        worker_log = fold.task_log
        for key in ("start_time", "end_time", "logs", "outputs"):
            if worker_log.get(key):
                current[key] = worker_log[key]
        metadata = {**worker_log.get("metadata", {}), **current.get("metadata", {})}
        current["metadata"] = metadata
        current["worker_logs"] = list(worker_log.get("system_logs", []))
        if note:
            current["gateway_logs"].append(note)
        return logs

    def _transition(self, row: Any, current: State, target: State, **changes: Any) -> bool:
        """service.transition, counting a task that ended in the metrics."""
        ok = self.service.transition(row.id, current, target, **changes)
        if ok and target in TERMINAL:
            last = (changes.get("logs") or [{}])[-1]
            observability.observe_task_finished(target.value, row.creation_time,
                                                last.get("start_time"), last.get("end_time"))
        return ok

    # ---- scheduler states ----

    def _apply_job_status(self, row: Any, status: JobStatus, stats: TickStats) -> None:
        current = State(row.state)
        if current == State.CANCELING:
            self._cancel_job(row)
            if status.state.finished:
                logs = self._merge_worker_log(row, self._tail(row).fold,
                                              f"{now_rfc3339()} canceled; scheduler: "
                                              f"{status.state.value} {status.reason}".rstrip())
                if self._transition(row, current, State.CANCELED, logs=logs):
                    stats.finished += 1
            return
        if status.state == JobState.UNRUNNABLE:
            self._end_unrunnable(row, status, stats)
            return
        if status.state == JobState.RUNNING and current == State.QUEUED:
            if self.service.transition(row.id, current, State.INITIALIZING):
                stats.updated += 1
            return
        if not status.state.finished:
            return
        if status.state == JobState.PREEMPTED:
            # a requeueing scheduler (Slurm PreemptMode=REQUEUE, HTCondor) would run the
            # old job again beside the next attempt: remove it
            self._cancel_job(row)
        # the job ended: read the event log once more, the worker may have just finished
        if self._apply_events(row, stats, status):
            return
        worker = ("the worker was signalled to end" if self._tail(row).fold.terminal
                  else "the worker did not record an end")
        reason = (f"the {self.backend.name} job {row.job_id} ended as {status.state.value}"
                  f" ({status.reason or 'no reason given'}) but {worker}")
        self._fail_or_retry(row, reason, status.state)
        stats.finished += 1

    def _end_unrunnable(self, row: Any, status: JobStatus, stats: TickStats) -> None:
        """The scheduler says the job can never start: cancel it, then SYSTEM_ERROR."""
        if not self._cancel_job(row):
            return  # the job stays until it is gone: asked again next tick
        logs = self._merge_worker_log(row, self._tail(row).fold, (
            f"{now_rfc3339()} the {self.backend.name} job {row.job_id} can never start as "
            f"submitted ({status.reason or 'no reason given'}); it was canceled"))
        if self._transition(row, State(row.state), State.SYSTEM_ERROR, logs=logs):
            stats.finished += 1

    def _fail_or_retry(self, row: Any, reason: str, job_state: JobState = JobState.LOST) -> None:
        """A job ended without its worker recording an end: another attempt when that kind
        of end is in retry_on and attempts remain, else PREEMPTED or SYSTEM_ERROR."""
        current = State(row.state)
        logs = self._merge_worker_log(row, self._tail(row).fold, f"{now_rfc3339()} {reason}")
        for name, text in self.backend.job_output(task_dir(self.config, row.id),
                                                  JOB_OUTPUT_BYTES):
            logs[-1]["gateway_logs"].append(
                f"{now_rfc3339()} {self.backend.name} job output, last {JOB_OUTPUT_BYTES} bytes"
                f" of {name}:\n{text}")
        kind = RETRY_KINDS.get(job_state, OTHER_END)
        if current != State.CANCELING and kind in self.retry_on \
                and row.attempt < self.max_attempts:
            logs[-1]["gateway_logs"].append(
                f"{now_rfc3339()} retrying: attempt {row.attempt + 1} of {self.max_attempts}"
                f" ({kind} is in reconciler.retry_on)")
            self.service.transition(row.id, current, State.QUEUED, logs=logs, job_id=None)
            self.tails.pop(row.id, None)
            return
        target = (State.CANCELED if current == State.CANCELING else
                  State.PREEMPTED if job_state == JobState.PREEMPTED else State.SYSTEM_ERROR)
        self._transition(row, current, target, logs=logs)

    def _cancel_job(self, row: Any) -> bool:
        """Ask the scheduler to stop the row's job once; False if that request failed."""
        if row.job_id in self.cancels_sent:
            return True
        self.cancels_sent.add(row.job_id)
        try:
            self.backend.cancel(row.job_id)
        except (BackendError, OSError) as exc:
            self._count("cancel", ok=False)
            self.cancels_sent.discard(row.job_id)  # try again next tick
            log.warning("cancel of job %s (task %s) failed: %s", row.job_id, row.id, exc)
            return False
        self._count("cancel", ok=True)
        return True

    # ---- helpers ----

    def _stored_logs(self, row: Any) -> list:
        """The task's stored logs (active_rows leaves them out; read when needed)."""
        return self.service.stored_logs([row.id]).get(row.id, [])

    @staticmethod
    def _attempt_logs(stored: list | None, attempt: int, new: bool = True) -> list:
        """Copy of the task logs with an entry for `attempt` (1-based)."""
        logs = [dict(entry) for entry in (stored or [])]
        while len(logs) < attempt:
            logs.append({"logs": [], "outputs": [], "system_logs": []})
        for entry in logs:
            entry.setdefault("gateway_logs", list(entry.pop("system_logs", []) or []))
            entry.setdefault("worker_logs", [])
            entry.setdefault("logs", [])
            entry.setdefault("outputs", [])
        return logs[:attempt] if not new else logs

    @staticmethod
    def _archive_events(directory: Path, previous_attempt: int) -> None:
        if previous_attempt < 1:
            return
        for name in EVENT_FILES:
            path = directory / name
            if path.exists():
                path.rename(directory / f"{name}.attempt{previous_attempt}")


def _lower_keys(task: dict) -> dict[str, str]:
    params = (task.get("resources") or {}).get("backend_parameters") or {}
    return {str(k).lower(): str(v) for k, v in params.items()}
