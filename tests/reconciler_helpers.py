"""A scripted scheduler double and an in-process reconciler, for the reconciler's policy
tests (retries, preemption, unrunnable jobs, scheduler output, metrics)."""

from __future__ import annotations

import json
from itertools import repeat
from pathlib import Path

from funnel_hpc.backends.base import Backend, JobState, JobStatus, SubmitRequest
from funnel_hpc.core import config as config_mod
from funnel_hpc.gateway.reconcile.index import InFlightIndex
from funnel_hpc.gateway.reconcile.reconciler import Reconciler
from funnel_hpc.gateway.web.app import make_service
from tests.backend_helpers import NO_WORK_DIR, double_options

TRIVIAL = {"executors": [{"image": "busybox", "command": ["true"]}]}
PENDING = JobStatus(JobState.PENDING)


class ScriptedBackend(Backend):
    """Jobs are numbered from 100; each is PENDING until a test sets its status."""

    name = "scripted"

    def __init__(self) -> None:
        super().__init__(double_options(), NO_WORK_DIR)
        self.jobs: dict[str, str] = {}          # job id -> task id
        self.status: dict[str, JobStatus] = {}  # job id -> what poll answers
        self.canceled: list[str] = []
        self.polls = 0

    def submit(self, request: SubmitRequest) -> str:
        job_id = str(100 + len(self.jobs))
        self.jobs[job_id] = request.task_id
        return job_id

    def cancel(self, job_id: str) -> None:
        self.canceled.append(job_id)

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        self.polls += 1
        return dict(zip(job_ids, map(self.status.get, job_ids, repeat(PENDING)), strict=True))

    def end(self, job_id: str, state: JobState, reason: str = "") -> None:
        self.status[job_id] = JobStatus(state, reason)


def make(tmp_path: Path, backend: Backend, sections: dict | None = None, *,
         sweep_per_tick: int | None = None, **reconciler: object):
    """(service, reconciler) over a fresh SQLite database in tmp_path; reconciler.* keys
    as keyword arguments, other configuration sections in `sections`; `sweep_per_tick`:
    its in-flight index's sweep (index.SWEEP_PER_TICK when None)."""
    config = config_mod.load(environ={}, overrides={
        **(sections or {}), "work_dir": str(tmp_path / "work"),
        "reconciler": {"submit_threads": 1, **reconciler}})
    service = make_service(config)
    index = (InFlightIndex(service.reconciler_queries, sweep_per_tick)
             if sweep_per_tick is not None else None)
    return service, Reconciler(service, backend, config, index=index)


def write_events(task_dir: Path, *states: str, name: str = "events.jsonl") -> None:
    """A worker's event log reaching `states`, one state event each (seq from 1)."""
    lines = [{"seq": seq, "type": "state", "state": state}
             for seq, state in enumerate(states, start=1)]
    (task_dir / name).write_text("".join(json.dumps(line) + "\n" for line in lines))


def job_of(service, task_id: str) -> str:
    job_id = service.get_row(task_id).job_id
    assert job_id, "the task has no job"
    return str(job_id)


def system_logs(service, task_id: str) -> list[list[str]]:
    """system_logs of each attempt of the task."""
    return [entry.get("system_logs", []) for entry in service.get(task_id, "FULL")["logs"]]
