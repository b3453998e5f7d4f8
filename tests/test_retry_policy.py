"""The reconciler's policy for jobs that end without their worker recording an end
(reconciler.retry_on, max_attempts), preemption, jobs the scheduler can never start, the
scheduler's own output in system_logs, and the metrics it records; on a scripted backend,
in process, one tick at a time (nothing here waits on the clock)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from sqlalchemy import update

from funnel_hpc.backends.base import JobState
from funnel_hpc.gateway.ops import metrics
from funnel_hpc.gateway.store import db
from tests.metrics_helpers import samples
from tests.reconciler_helpers import (
    TRIVIAL,
    ScriptedBackend,
    job_of,
    make,
    system_logs,
    write_events,
)


def task_dir(reconciler, task_id: str) -> Path:
    return Path(reconciler.config.work_dir) / task_id


def ended_by_scheduler(tmp_path, state: JobState, **options):
    """A task whose first job the scheduler ends as `state`, its worker silent; one tick."""
    backend = ScriptedBackend()
    service, reconciler = make(tmp_path, backend, **options)
    task_id = service.create(TRIVIAL)
    reconciler.tick()
    first = job_of(service, task_id)
    backend.end(first, state, f"scheduler says {state.value}")
    reconciler.tick()
    return backend, service, reconciler, task_id, first


@pytest.mark.parametrize("state", [JobState.PREEMPTED, JobState.NODE_FAILED, JobState.LOST])
def test_each_default_kind_runs_again_as_its_own_attempt(tmp_path, state):
    backend, service, reconciler, task_id, first = ended_by_scheduler(
        tmp_path, state, max_attempts=2)
    assert service.get_row(task_id).state == "QUEUED"
    reconciler.tick()  # the second attempt's job
    second = job_of(service, task_id)
    assert second != first
    write_events(task_dir(reconciler, task_id), "INITIALIZING", "RUNNING", "COMPLETE")
    reconciler.tick()
    task = service.get(task_id, "FULL")
    assert task["state"] == "COMPLETE"
    assert [entry["metadata"]["job_id"] for entry in task["logs"]] == [first, second]
    first_logs = system_logs(service, task_id)[0]
    assert any(f"ended as {state.value}" in line for line in first_logs)
    assert any("retrying: attempt 2 of 2" in line for line in first_logs)
    # a preempted job, or one whose node failed, is removed, or a requeueing scheduler
    # would run it beside attempt 2
    assert (first in backend.canceled) == (state != JobState.LOST)


def test_preempted_on_the_last_attempt_ends_preempted(tmp_path):
    _, service, _, task_id, _ = ended_by_scheduler(tmp_path, JobState.PREEMPTED)
    assert service.get(task_id)["state"] == "PREEMPTED"


@pytest.mark.parametrize("state", [JobState.NODE_FAILED, JobState.FAILED])
def test_an_end_not_in_retry_on_is_system_error(tmp_path, state):
    _, service, _, task_id, _ = ended_by_scheduler(tmp_path, state, max_attempts=3,
                                                   retry_on=["preempted"])
    assert service.get(task_id)["state"] == "SYSTEM_ERROR"
    assert len(service.get(task_id, "FULL")["logs"]) == 1


def test_failed_is_retried_when_listed(tmp_path):
    _, service, _, task_id, _ = ended_by_scheduler(tmp_path, JobState.FAILED, max_attempts=2,
                                                   retry_on=["failed"])
    assert service.get_row(task_id).state == "QUEUED"


def test_unknown_retry_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="retry_on"):
        make(tmp_path, ScriptedBackend(), retry_on=["preempted", "sunspots"])


def test_a_worker_signalled_by_preemption_is_retried_not_blamed(tmp_path):
    """Preemption sends SIGTERM: the worker records CANCELED. That alone decides nothing;
    the scheduler's PREEMPTED makes it another attempt, not 'stopped outside'."""
    backend = ScriptedBackend()
    service, reconciler = make(tmp_path, backend, max_attempts=2)
    task_id = service.create(TRIVIAL)
    reconciler.tick()
    first = job_of(service, task_id)
    write_events(task_dir(reconciler, task_id), "INITIALIZING", "RUNNING", "CANCELED")
    backend.end(first, JobState.RUNNING)  # still completing
    reconciler.tick()
    assert service.get_row(task_id).state in ("QUEUED", "INITIALIZING")  # not judged yet
    backend.end(first, JobState.PREEMPTED, "PREEMPTED")
    reconciler.tick()
    row = service.get_row(task_id)
    assert row.state == "QUEUED" and row.job_id is None
    assert any("retrying: attempt 2 of 2" in line
               for line in system_logs(service, task_id)[0])


def test_a_worker_signalled_by_someone_else_is_system_error(tmp_path):
    backend = ScriptedBackend()
    service, reconciler = make(tmp_path, backend, max_attempts=2)
    task_id = service.create(TRIVIAL)
    reconciler.tick()
    write_events(task_dir(reconciler, task_id), "INITIALIZING", "RUNNING", "CANCELED")
    backend.end(job_of(service, task_id), JobState.CANCELLED, "CANCELLED by 0")
    reconciler.tick()
    assert service.get(task_id)["state"] == "SYSTEM_ERROR"
    assert any("stopped outside the gateway" in line and "CANCELLED by 0" in line
               for line in system_logs(service, task_id)[0])


def test_unrunnable_job_is_canceled_and_system_error_with_the_reason(tmp_path):
    backend = ScriptedBackend()
    service, reconciler = make(tmp_path, backend)
    task_id = service.create(TRIVIAL)
    reconciler.tick()
    job_id = job_of(service, task_id)
    backend.end(job_id, JobState.UNRUNNABLE, "squeue: PENDING exit=0:0 reason=PartitionConfig")
    reconciler.tick()
    assert backend.canceled == [job_id]
    assert service.get(task_id)["state"] == "SYSTEM_ERROR"
    assert any("can never start" in line and "PartitionConfig" in line
               for line in system_logs(service, task_id)[0])


def test_scheduler_output_tail_goes_to_system_logs_and_symlinks_are_not_read(tmp_path):
    backend = ScriptedBackend()
    backend.job_output_files = ("job.out", "job.err")
    service, reconciler = make(tmp_path, backend)
    task_id = service.create(TRIVIAL)
    reconciler.tick()
    directory = task_dir(reconciler, task_id)
    (directory / "job.out").write_text("x" * 10_000 + "worker: cannot exec\n")
    secret = tmp_path / "secret"
    secret.write_text("TOP-SECRET")
    os.symlink(secret, directory / "job.err")  # planted: must not be read
    backend.end(job_of(service, task_id), JobState.FAILED, "exit=3:0")
    reconciler.tick()
    assert service.get(task_id)["state"] == "SYSTEM_ERROR"
    logs = "\n".join(system_logs(service, task_id)[0])
    assert "of job.out:" in logs and logs.endswith("worker: cannot exec\n")
    assert "x" * 5000 not in logs  # a tail (4 KB), not the whole file
    assert "TOP-SECRET" not in logs and "job.err" not in logs


def test_finished_tasks_and_scheduler_calls_are_counted(tmp_path):
    def value(name: str, **labels: str) -> float:
        text = generate_latest(metrics.REGISTRY).decode()
        return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)

    preempted = value("funnel_tasks_finished_total", state="PREEMPTED")
    errors = value("funnel_tasks_finished_total", state="SYSTEM_ERROR")
    polls = value("funnel_scheduler_calls_total", backend="scripted", command="poll")
    cancels = value("funnel_scheduler_calls_total", backend="scripted", command="cancel")
    ended_by_scheduler(tmp_path / "a", JobState.PREEMPTED)
    ended_by_scheduler(tmp_path / "b", JobState.FAILED)
    assert value("funnel_tasks_finished_total", state="PREEMPTED") == preempted + 1
    assert value("funnel_tasks_finished_total", state="SYSTEM_ERROR") == errors + 1
    assert value("funnel_scheduler_calls_total", backend="scripted", command="poll") \
        == polls + 2
    assert value("funnel_scheduler_calls_total", backend="scripted", command="cancel") \
        == cancels + 1


# ---- retention.task_days, run by the reconciler ----

def test_reconciler_purges_tasks_that_ended_before_retention_days(tmp_path):
    service, reconciler = make(tmp_path, ScriptedBackend(), {"retention": {"task_days": 1}})
    old_done, old_running, new_done = (service.create({**TRIVIAL, "name": name})
                                       for name in ("old-done", "old-running", "new-done"))
    reconciler.tick()
    for task_id in (old_done, new_done):
        write_events(task_dir(reconciler, task_id), "INITIALIZING", "RUNNING", "COMPLETE")
    reconciler.tick()
    assert service.get(old_done)["state"] == "COMPLETE"
    with db.writing(service.engine) as conn:  # long ago
        conn.execute(update(db.tasks).where(db.tasks.c.id.in_([old_done, old_running]))
                     .values(updated_at="2000-01-01T00:00:00.000000Z"))
    reconciler._next_purge = 0.0  # due now (it runs at most once an hour)
    reconciler.tick()
    assert not task_dir(reconciler, old_done).exists()
    assert task_dir(reconciler, new_done).exists() and task_dir(reconciler, old_running).exists()
    assert service.reconciler_queries.stored_logs([old_done, old_running, new_done]).keys() == \
        {old_running, new_done}  # the record is gone; one that has not ended stays
