"""What the reconciler's parts share (gateway/reconcile/reconciler.py puts them together): its
settings, the in-flight index, each task's event tail, the task logs it merges and the
state changes and scheduler calls it makes and counts.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from funnel_hpc.backends import files
from funnel_hpc.backends.base import Backend, BackendError, JobState
from funnel_hpc.core import config as config_mod
from funnel_hpc.core import worker_tokens
from funnel_hpc.core.config import Config
from funnel_hpc.core.events import EventFold
from funnel_hpc.core.states import TERMINAL, State
from funnel_hpc.gateway.ops import metrics
from funnel_hpc.gateway.reconcile import owner_worker
from funnel_hpc.gateway.reconcile.event_tail import EventTail
from funnel_hpc.gateway.reconcile.index import SUBMITTING, InFlightIndex
from funnel_hpc.gateway.store.leases import Lease
from funnel_hpc.gateway.store.tasks import TaskService

LOGGER_NAME = "funnel_hpc.gateway.reconcile.reconciler"  # one logger for all its parts
log = logging.getLogger(LOGGER_NAME)
__all__ = ["LOGGER_NAME", "SUBMITTING", "ReconcilerCore", "TickStats", "attempt_logs", "task_dir",
           "worker_command", "write_worker_config"]

TASK_FILE = "task.json"
WORKER_CONFIG_FILE = "worker-config.json"  # in the work dir; with submit_as_owner, per task
# how a job ended without its worker recording an end -> its reconciler.retry_on name
RETRY_KINDS: dict[JobState, str] = {JobState.PREEMPTED: "preempted",
                                    JobState.NODE_FAILED: "node_fail", JobState.LOST: "lost"}
OTHER_END = "failed"  # any other end (the worker crashed, a time limit, ...)
RETRY_ON_CHOICES = (*RETRY_KINDS.values(), OTHER_END)


def task_dir(config: Config, task_id: str) -> Path:
    return Path(config.work_dir) / task_id


def worker_command(config: Config) -> list[str]:
    command = list(config.worker.command)
    # `python -m funnel_hpc.worker run` is `funnel worker run` without click: cheaper to start
    return command or [sys.executable, "-m", "funnel_hpc.worker", "run"]


def write_worker_config(config: Config) -> Path:
    """The sections a worker needs, already merged, written once per server start as
    JSON (mode 600): the worker reads it without parsing the YAML defaults again. Workers
    that run as their task's owner cannot read it: theirs is per task (owner_worker.py)."""
    work_dir = Path(config.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    return files.write_private(work_dir, WORKER_CONFIG_FILE,
                               json.dumps(config_mod.worker_sections(config)))


@dataclass
class TickStats:
    submitted: int = 0
    polled: int = 0
    poll_calls: int = 0
    updated: int = 0
    finished: int = 0
    rows_read: int = 0     # rows the tick read from the database (all on a full read)
    looked_at: int = 0     # in-flight tasks whose event logs the tick read
    seconds: float = 0.0


class ReconcilerCore:
    """The reconciler's state and the steps its parts share."""

    lease: Lease = Lease()  # server.make_reconciler sets this process's lease

    def __init__(self, service: TaskService, backend: Backend, config: Config):
        self.service = service
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
        self.submit_threads = max(1, opts.submit_threads)
        self._pool: ThreadPoolExecutor | None = None
        self.pass_server_url = opts.pass_server_url
        self.index = InFlightIndex(service)
        self.tails: dict[str, EventTail] = {}
        self.cancels_sent: set[str] = set()
        # tasks whose step failed this tick: looked at again next tick whatever changed
        self.retry: set[str] = set()
        # task id -> (updated_at, logs) the last batch of live-log updates stored
        self.written_logs: dict[str, tuple[str, list]] = {}
        self.worker_config = write_worker_config(config)
        # jobs run as their owners: each task dir gets this (no site secret in it), and
        # the worker command must run for an unprivileged user (checked now, not per task)
        self.owner_config: str | None = None
        if owner_worker.runs_as_owners(config):
            owner_worker.check_worker_command(worker_command(config))
            self.owner_config = json.dumps(owner_worker.owner_sections(config))
        backend.on_change = service.changed.set
        # with auth on, each worker gets a token for its own task (core/worker_tokens.py)
        self.worker_key = (worker_tokens.load_key(config.work_dir)
                           if config.auth.mode != "none" else None)
        self._stop = threading.Event()
        self.last_tick = TickStats()

    def _isolated(self, row: Any, what: str, step: Callable[..., Any], *args: Any) -> Any:
        """step(*args) for one task; a failure is logged and touches no other task (that
        task is looked at again next tick). None when it failed."""
        try:
            return step(*args)
        except BackendError as exc:
            log.warning("task %s: %s failed, trying again next tick: %s", row.id, what, exc)
        except Exception:
            log.exception("task %s: %s failed, trying again next tick", row.id, what)
        self.retry.add(row.id)
        return None

    def _count(self, command: str, ok: bool) -> None:
        metrics.count_scheduler_call(self.backend.name, command, ok)

    def _transition(self, row: Any, current: State, target: State, **changes: Any) -> bool:
        """service.transition, counting a task that ended in the metrics; a row that
        moved meanwhile is read again next tick."""
        ok = self.service.transition(row.id, current, target, **changes)
        if ok and target in TERMINAL:
            last = (changes.get("logs") or [{}])[-1]
            notes = [*(last.get("system_logs") or []), *(last.get("gateway_logs") or [])]
            metrics.observe_task_finished(
                target.value, row.creation_time, last.get("start_time"), last.get("end_time"),
                metrics.TaskEnd(row.id, row.owner, self.backend.name,
                                      changes.get("job_id", row.job_id),
                                      notes[-1] if notes else None))
        if not ok:
            self.index.recheck(row.id)
        return ok

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
            self.retry.add(row.id)  # try again next tick
            log.warning("cancel of job %s (task %s) failed: %s", row.job_id, row.id, exc)
            return False
        self._count("cancel", ok=True)
        return True

    # ---- event tails and task logs ----

    def _open_tails(self, rows: list[Any]) -> None:
        """Event tails for the rows that have none yet, each knowing its task's executor
        count (one read of the task documents for all of them)."""
        new = [row for row in rows if row.id not in self.tails]
        if not new:
            return
        tasks = self.service.full_tasks([row.id for row in new])
        for row in new:
            executors = len((tasks.get(row.id) or {}).get("executors") or []) or None
            self.tails[row.id] = EventTail(task_dir(self.config, row.id), executors,
                                           self.backend.job_uid(row.owner))

    def _tail(self, row: Any) -> EventTail:
        if row.id not in self.tails:
            self._open_tails([row])
        return self.tails[row.id]

    def _stored_logs(self, row: Any) -> list:
        """The task's stored logs (the index leaves them out; read when needed)."""
        return self.service.stored_logs([row.id]).get(row.id, [])

    def _merge_worker_log(self, row: Any, fold: EventFold, note: str | None = None,
                          stored: list | None = None) -> list:
        """The task's logs with the worker's log of this attempt merged in; `stored`: the
        stored logs when the caller has read them already."""
        if stored is None:
            stored = self._stored_logs(row)
        logs = attempt_logs(stored, max(row.attempt, 1), new=False)
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


def attempt_logs(stored: list | None, attempt: int, new: bool = True) -> list:
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
