"""What the reconciler's parts share. gateway/reconcile/reconciler.py makes one of each in
its constructor and hands them to its submitter (submission.py) and event folder
(event_folding.py), each a small class with its dependencies named in its constructor:

- LookAgain: the tasks to look at next tick whatever changed (a step failed for them);
- EventTails: the event tail of every task looked at, opened when first needed;
- TaskWriter: a task's logs with its worker's merged in, and its state changes
  (compare-and-set through the store's reconciler_queries, counted in the metrics).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from funnel_hpc.backends import files
from funnel_hpc.backends.base import Backend, BackendError, JobState
from funnel_hpc.core import config as config_mod
from funnel_hpc.core.config import Config
from funnel_hpc.core.events import EventFold
from funnel_hpc.core.states import TERMINAL, State
from funnel_hpc.gateway.ops import metrics
from funnel_hpc.gateway.reconcile.event_tail import EventTail
from funnel_hpc.gateway.reconcile.index import SUBMITTING, InFlightIndex
from funnel_hpc.gateway.store.reconciler_queries import ReconcilerQueries

LOGGER_NAME = "funnel_hpc.gateway.reconcile.reconciler"  # one logger for all its parts
log = logging.getLogger(LOGGER_NAME)
__all__ = ["LOGGER_NAME", "SUBMITTING", "EventTails", "LookAgain", "TaskWriter", "TickStats",
           "attempt_logs", "task_dir", "worker_command", "write_worker_config"]

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
    """What one tick did, counted."""

    submitted: int = 0
    polled: int = 0
    poll_calls: int = 0
    updated: int = 0
    finished: int = 0
    rows_read: int = 0     # rows the tick read from the database (all on a full read)
    looked_at: int = 0     # in-flight tasks whose event logs the tick read
    seconds: float = 0.0
    unreachable: str | None = None  # why a submission found the scheduler unreachable


class LookAgain:
    """The tasks the next tick looks at whatever changed: a step for them failed this
    tick, or a bounded read left some of their events."""

    def __init__(self) -> None:
        self._task_ids: set[str] = set()

    def add(self, task_id: str) -> None:
        self._task_ids.add(task_id)

    def update(self, task_ids: Iterable[str]) -> None:
        self._task_ids.update(task_ids)

    def take(self) -> set[str]:
        """The ids collected since the last take (for the tick starting now)."""
        taken, self._task_ids = self._task_ids, set()
        return taken

    def isolated(self, row: Any, what: str, step: Callable[..., Any], *args: Any) -> Any:
        """step(*args) for one task; a failure is logged and touches no other task (that
        task is looked at again next tick). None when it failed."""
        try:
            return step(*args)
        except BackendError as exc:
            log.warning("task %s: %s failed, trying again next tick: %s", row.id, what, exc)
        except Exception:
            log.exception("task %s: %s failed, trying again next tick", row.id, what)
        self.add(row.id)
        return None


class EventTails:
    """The event tail (event_tail.py) of each task the reconciler looks at, opened when
    first needed, each knowing its task's executor count and the uid its logs must have."""

    def __init__(self, queries: ReconcilerQueries, backend: Backend, work_dir: Path):
        self.queries = queries
        self.backend = backend
        self.work_dir = work_dir
        self._tails: dict[str, EventTail] = {}

    def open(self, rows: list[Any]) -> None:
        """Tails for the rows that have none yet (one read of the task documents for
        all of them)."""
        new = [row for row in rows if row.id not in self._tails]
        if not new:
            return
        tasks = self.queries.full_tasks([row.id for row in new])
        for row in new:
            executors = len((tasks.get(row.id) or {}).get("executors") or []) or None
            self.start(row, executors)

    def start(self, row: Any, executors: int | None, new_attempt: bool = False,
              directory: Path | None = None) -> None:
        """A new tail for the row's task; new_attempt: its job was just submitted (its
        event logs are yet to be written: EventTail.new_attempt); directory: its task
        dir, <work_dir>/<id>, when the caller has it already."""
        tail = EventTail(directory or self.work_dir / row.id, executors,
                         self.backend.job_uid(row.owner))
        if new_attempt:
            tail.new_attempt()
        self._tails[row.id] = tail

    def of(self, row: Any) -> EventTail:
        if row.id not in self._tails:
            self.open([row])
        return self._tails[row.id]

    def drop(self, task_id: str) -> None:
        """Forget the task's tail (it ended, or its next attempt starts afresh)."""
        self._tails.pop(task_id, None)

    def clear(self) -> None:
        self._tails.clear()


class TaskWriter:
    """Writes what the reconciler decided about a task: its logs with the worker's log
    merged in, and state changes by compare-and-set (a task that ended is counted in the
    metrics; a row that moved meanwhile is read again next tick)."""

    def __init__(self, queries: ReconcilerQueries, index: InFlightIndex, backend_name: str):
        self.queries = queries
        self.index = index
        self.backend_name = backend_name

    def transition(self, row: Any, current: State, target: State, **changes: Any) -> bool:
        """queries.transition, counting a task that ended in the metrics."""
        ok = self.queries.transition(row.id, current, target, **changes)
        if ok and target in TERMINAL:
            last = (changes.get("logs") or [{}])[-1]
            notes = [*(last.get("system_logs") or []), *(last.get("gateway_logs") or [])]
            metrics.observe_task_finished(
                target.value, row.creation_time, last.get("start_time"), last.get("end_time"),
                metrics.TaskEnd(row.id, row.owner, self.backend_name,
                                      changes.get("job_id", row.job_id),
                                      notes[-1] if notes else None))
        if not ok:
            self.index.recheck(row.id)
        return ok

    def stored_logs(self, row: Any) -> list:
        """The task's stored logs (the index leaves them out; read when needed)."""
        return self.queries.stored_logs([row.id]).get(row.id, [])

    def with_worker_log(self, row: Any, fold: EventFold, note: str | None = None,
                        stored: list | None = None) -> list:
        """The task's logs with the worker's log of this attempt merged in; `stored`: the
        stored logs when the caller has read them already."""
        if stored is None:
            stored = self.stored_logs(row)
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
