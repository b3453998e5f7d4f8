"""The reconciler: drives every task to its true state.

Each tick it
1. submits QUEUED tasks that have no job yet (task.json written to the task dir),
2. reads the new lines of each in-flight task's worker event log(s),
3. asks the backend about all in-flight jobs with ONE batched poll,
4. applies what it learned through the state machine (compare-and-set in SQL),
5. stops the jobs of CANCELING tasks.

A job that ended (or vanished) without its worker recording an end becomes
SYSTEM_ERROR with a system log quoting the scheduler, or goes back to QUEUED
for another attempt while attempts remain (``reconciler.max_attempts``).
State lives in the database and the event logs only, so a restarted gateway
picks up where the old one stopped.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.core import config as config_mod
from funnel_hpc.core import worker_tokens
from funnel_hpc.gateway.service import TaskService, now_rfc3339
from funnel_hpc.core.states import TERMINAL, State, can_transition
from funnel_hpc.core.events import EventFold

log = logging.getLogger(__name__)

EVENT_FILES = ("events.jsonl", "events.received.jsonl")
MIN_TICK_GAP = 0.02  # seconds
SUBMITTING = ""  # job_id while a submission is under way
ACTIVE_JOB_STATES = {State.QUEUED, State.INITIALIZING, State.RUNNING, State.PAUSED,
                     State.CANCELING}


def task_dir(config: dict, task_id: str) -> Path:
    return Path(config["work_dir"]) / task_id


def worker_command(config: dict) -> list[str]:
    command = list(config["worker"]["command"])
    # `python -m funnel_hpc.worker run` is `funnel worker run` without click: cheaper to start
    return command or [sys.executable, "-m", "funnel_hpc.worker", "run"]


def write_worker_config(config: dict) -> Path:
    """The sections a worker needs, already merged, written once per server start as
    JSON (mode 600): the worker reads it without parsing the YAML defaults again."""
    path = Path(config["work_dir"]) / "worker-config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(config_mod.worker_sections(config), fh)
    os.replace(tmp, path)
    return path


@dataclass
class EventTail:
    """Incremental reader of one task attempt's event logs."""

    directory: Path
    fold: EventFold = field(default_factory=EventFold)
    offsets: dict[str, int] = field(default_factory=dict)
    paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # plain strings: at 10,000 tasks in flight each tick stats 20,000 files
        self.paths = tuple(os.path.join(self.directory, name) for name in EVENT_FILES)

    def read_new(self) -> bool:
        """Apply events appended since the last call; True if any was new."""
        before = self.fold.last_seq
        for path in self.paths:
            offset = self.offsets.get(path, 0)
            try:
                if os.stat(path).st_size <= offset:
                    continue
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1  # only whole lines; a torn tail waits
            for line in data[:end].splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    log.warning("skipping unreadable event line in %s", path)
                    continue
                if isinstance(event, dict) and event.get("seq", 0) > self.fold.last_seq:
                    self.fold.apply(event)
            self.offsets[path] = offset + end
        return self.fold.last_seq > before


@dataclass
class TickStats:
    submitted: int = 0
    polled: int = 0
    poll_calls: int = 0
    updated: int = 0
    finished: int = 0
    seconds: float = 0.0


class Reconciler:
    def __init__(self, service: TaskService, backend: Backend, config: dict):
        self.service = service
        self.backend = backend
        self.config = config
        opts = config["reconciler"]
        self.interval = float(opts["interval_seconds"])
        self.max_attempts = max(1, int(opts["max_attempts"]))
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

    # ---- loop ----

    def run_forever(self) -> None:
        log.info("reconciler started: backend=%s interval=%ss", self.backend.name, self.interval)
        changed = self.service.changed
        while not self._stop.is_set():
            changed.clear()
            started = time.monotonic()
            try:
                self.last_tick = self.tick()
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
                self._recover_submission(row)
            else:
                in_flight[row.id] = row

        # worker event logs first: a task whose worker recorded its end needs no poll
        to_poll: dict[str, Any] = {}
        for task_id, row in in_flight.items():
            if self._apply_events(row, stats):
                continue
            to_poll[task_id] = row

        if to_poll:
            ids = sorted({row.job_id for row in to_poll.values()})
            statuses = self.backend.poll(ids)
            stats.polled, stats.poll_calls = len(ids), 1
            for task_id, row in to_poll.items():
                status = statuses.get(row.job_id, JobStatus(JobState.UNKNOWN, "not reported"))
                self._apply_job_status(row, status, stats)

        self._submit_batch(to_submit[: self.submit_per_tick], stats)

        # forget tails of tasks that are no longer active
        active = {row.id for row in rows}
        for task_id in list(self.tails):
            if task_id not in active:
                del self.tails[task_id]
        stats.seconds = time.monotonic() - started
        return stats

    # ---- submission ----

    def _submit_batch(self, rows: list[Any], stats: TickStats) -> None:
        """Submit the jobs of QUEUED tasks: one read, one claim transaction, the backend's
        submissions (several at once where the backend allows it), one record transaction."""
        if not rows:
            return
        tasks = self.service.full_tasks([row.id for row in rows])
        rows = [row for row in rows if row.id in tasks]
        stored_logs = self.service.stored_logs([row.id for row in rows])
        for row in rows:
            directory = task_dir(self.config, row.id)
            directory.mkdir(parents=True, exist_ok=True)
            self._archive_events(directory, row.attempt)
            task_file = directory / "task.json"
            tmp = task_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(tasks[row.id]))
            os.replace(tmp, task_file)
            if self.worker_key is not None:
                worker_tokens.write_token(self.worker_key, directory, row.id)
        # claim the tasks: only one submitter, and a restart sees the claims
        claimed = self.service.claim_for_submission([(row.id, row.attempt + 1) for row in rows])
        rows = [row for row in rows if row.id in claimed]
        outcomes = self._map_submit(rows, tasks)
        recorded: list[tuple[str, str, list]] = []
        deferred: list[tuple[str, int, int]] = []
        for row, outcome in zip(rows, outcomes):
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
                self.tails.pop(row.id, None)
        if deferred:
            self.service.release_claims(deferred)
        if recorded:
            self.service.record_submissions(recorded)
            stats.submitted += len(recorded)

    def _map_submit(self, rows: list[Any], tasks: dict[str, dict]) -> list[Any]:
        """backend.submit for each row: the job id, or the exception it raised."""
        def one(row: Any) -> Any:
            directory = task_dir(self.config, row.id)
            task = tasks[row.id]
            request = SubmitRequest(task_id=row.id, task=task, task_dir=directory,
                                    worker_argv=self._worker_argv(directory),
                                    backend_parameters=_lower_keys(task), owner=row.owner)
            try:
                return self.backend.submit(request)
            except (BackendError, OSError, ValueError) as exc:
                return exc

        if self.submit_threads > 1 and self.backend.parallel_submit and len(rows) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.submit_threads,
                                                thread_name_prefix="submit")
            return list(self._pool.map(one, rows))
        return [one(row) for row in rows]

    def _submission_failed(self, row: Any, logs: list, exc: Exception, stats: TickStats) -> None:
        logs[-1]["gateway_logs"].append(f"{now_rfc3339()} submission to {self.backend.name} "
                                        f"failed: {exc}")
        self.service.transition(row.id, State.QUEUED, State.SYSTEM_ERROR, logs=logs, job_id=None)
        stats.finished += 1

    def _worker_argv(self, directory: Path) -> list[str]:
        argv = [*worker_command(self.config), "--task-file", str(directory / "task.json"),
                "--workdir", self.config["work_dir"], "--config", str(self.worker_config)]
        if self.pass_server_url:
            argv += ["--server", self.config["server"]["public_url"]]
        return argv

    def _recover_submission(self, row: Any) -> None:
        """The gateway stopped between claiming and recording a job."""
        job_id = self.backend.recover(row.id, task_dir(self.config, row.id))
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

    def _tail(self, row: Any) -> EventTail:
        tail = self.tails.get(row.id)
        if tail is None:
            tail = self.tails[row.id] = EventTail(task_dir(self.config, row.id))
        return tail

    def _apply_events(self, row: Any, stats: TickStats) -> bool:
        """Fold new worker events into the row; True if the task is now terminal."""
        tail = self._tail(row)
        tail.read_new()
        fold = tail.fold
        if fold.last_seq <= row.event_seq and not fold.terminal:
            return False
        current = State(row.state)
        target = current
        note = None
        if fold.state and can_transition(current, fold.state):
            target = State(fold.state)
        if current == State.CANCELING and fold.terminal:
            target = State.CANCELED
        elif target == State.CANCELED:
            # the worker was signalled, but nobody canceled the task through TES:
            # the scheduler (or an admin) stopped the job
            target = State.SYSTEM_ERROR
            note = (f"{now_rfc3339()} the {self.backend.name} job {row.job_id} was stopped "
                    "outside the gateway (the worker was signalled to end) without a TES cancel")
        logs = self._merge_worker_log(row, fold, note)
        if target != current:
            ok = self.service.transition(row.id, current, target, logs=logs,
                                         event_seq=fold.last_seq)
        else:
            ok = self.service.update_fields(row.id, current, logs=logs, event_seq=fold.last_seq)
        if ok:
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

    # ---- scheduler states ----

    def _apply_job_status(self, row: Any, status: JobStatus, stats: TickStats) -> None:
        current = State(row.state)
        if current == State.CANCELING:
            self._cancel_job(row)
            if status.state.finished:
                logs = self._merge_worker_log(row, self._tail(row).fold,
                                              f"{now_rfc3339()} canceled; scheduler: "
                                              f"{status.state.value} {status.reason}".rstrip())
                if self.service.transition(row.id, current, State.CANCELED, logs=logs):
                    stats.finished += 1
            return
        if status.state == JobState.RUNNING and current == State.QUEUED:
            if self.service.transition(row.id, current, State.INITIALIZING):
                stats.updated += 1
            return
        if not status.state.finished:
            return
        # the job ended: read the event log once more, the worker may have just finished
        if self._apply_events(row, stats):
            return
        reason = (f"the {self.backend.name} job {row.job_id} ended as {status.state.value}"
                  f" ({status.reason or 'no reason given'}) but the worker did not record an end")
        self._fail_or_retry(row, reason)
        stats.finished += 1

    def _fail_or_retry(self, row: Any, reason: str) -> None:
        current = State(row.state)
        logs = self._merge_worker_log(row, self._tail(row).fold, f"{now_rfc3339()} {reason}")
        if row.attempt < self.max_attempts and current != State.CANCELING:
            logs[-1]["gateway_logs"].append(
                f"{now_rfc3339()} retrying: attempt {row.attempt + 1} of {self.max_attempts}")
            self.service.transition(row.id, current, State.QUEUED, logs=logs, job_id=None)
            self.tails.pop(row.id, None)
            return
        target = State.CANCELED if current == State.CANCELING else State.SYSTEM_ERROR
        self.service.transition(row.id, current, target, logs=logs)

    def _cancel_job(self, row: Any) -> None:
        if row.job_id in self.cancels_sent:
            return
        self.cancels_sent.add(row.job_id)
        try:
            self.backend.cancel(row.job_id)
        except (BackendError, OSError) as exc:
            self.cancels_sent.discard(row.job_id)  # try again next tick
            log.warning("cancel of job %s (task %s) failed: %s", row.job_id, row.id, exc)

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
