"""Jobs that outlive their task: a task ended by its worker's word (its event log's last
state) while the scheduler still runs its job.

A worker writes its end and exits, so its job ends a moment later; a job still running
`reconciler.linger_seconds` after its task ended is a worker that wrote an end and went
on (one run as its owner, who may write its event log: SECURITY.md), and would hold
resources the gateway no longer counts (per-owner quotas count tasks in flight). Such
jobs are polled in the tick's one batched query, with the jobs in flight, and canceled
once their time is up. Kept in memory: a restarted gateway does not watch the jobs of
tasks that ended before it started.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from funnel_hpc.backends.base import Backend, BackendError, JobStatus
from funnel_hpc.gateway.ops import metrics
from funnel_hpc.gateway.reconcile.core import LOGGER_NAME

log = logging.getLogger(LOGGER_NAME)


class LingeringJobs:
    """The jobs of ended tasks that the scheduler has not yet seen end."""

    def __init__(self, backend: Backend, linger_seconds: float):
        self.backend = backend
        self.linger_seconds = linger_seconds
        self.jobs: dict[str, tuple[str, float]] = {}  # job id -> (task id, cancel after)

    def watch(self, row: Any, status: JobStatus | None) -> None:
        """The task of `row` just ended by its event log; `status`: its job's state in
        this tick's poll (None: not polled). A finished job needs no watching."""
        if row.job_id and not (status is not None and status.state.finished):
            self.jobs[row.job_id] = (row.id, time.monotonic() + self.linger_seconds)

    def job_ids(self) -> list[str]:
        return list(self.jobs)

    def reap(self, statuses: dict[str, JobStatus]) -> None:
        """Forget the jobs the poll saw end; cancel those whose time is up (a failed
        cancel is asked again next tick)."""
        now = time.monotonic()
        for job_id, (task_id, deadline) in list(self.jobs.items()):
            status = statuses.get(job_id)
            if status is not None and status.state.finished:
                del self.jobs[job_id]
            elif now >= deadline:
                try:
                    self.backend.cancel(job_id)
                except BackendError as exc:
                    metrics.count_scheduler_call(self.backend.name, "cancel", False)
                    log.warning("task %s: its %s job %s outlived the task; cancel failed: %s",
                                task_id, self.backend.name, job_id, exc)
                    continue
                metrics.count_scheduler_call(self.backend.name, "cancel", True)
                log.warning("task %s ended by its worker's word but its %s job %s still ran "
                            "%gs later (%s): canceled", task_id, self.backend.name, job_id,
                            self.linger_seconds, status.state.value if status else "unpolled")
                del self.jobs[job_id]
