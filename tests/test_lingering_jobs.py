"""A job that outlives its task (gateway/reconcile/lingering.py): a worker that wrote its
end in the event log and went on is canceled after reconciler.linger_seconds; one that
ended as workers do is never touched."""

from __future__ import annotations

from funnel_hpc.backends.base import JobState, JobStatus
from funnel_hpc.gateway.reconcile.core import task_dir
from tests.reconciler_helpers import TRIVIAL, ScriptedBackend, job_of, make, write_events


def ended_by_its_worker(tmp_path, linger_seconds: float):
    backend = ScriptedBackend()
    service, reconciler = make(tmp_path, backend, linger_seconds=linger_seconds)
    task_id = service.create(TRIVIAL)
    reconciler.tick()  # submits job 100
    job_id = job_of(service, task_id)
    backend.status[job_id] = JobStatus(JobState.RUNNING)
    write_events(task_dir(reconciler.config, task_id), "INITIALIZING", "RUNNING", "COMPLETE")
    reconciler.look_again.add(task_id)
    reconciler.tick()  # reads the end: the task is COMPLETE, its job still RUNNING
    assert service.get(task_id, "MINIMAL")["state"] == "COMPLETE"
    return backend, reconciler, job_id


def test_a_job_running_on_after_its_task_ended_is_canceled(tmp_path):
    # linger_seconds 0: canceled in the very tick that saw the task end while it ran
    backend, reconciler, job_id = ended_by_its_worker(tmp_path, linger_seconds=0)
    assert backend.canceled == [job_id]
    assert reconciler.lingering.job_ids() == []
    reconciler.tick()
    assert backend.canceled == [job_id]  # once


def test_a_job_that_ends_after_its_worker_is_left_alone(tmp_path):
    backend, reconciler, job_id = ended_by_its_worker(tmp_path, linger_seconds=3600)
    polls = backend.polls
    reconciler.tick()  # watched: in the tick's one poll, though no task is in flight
    assert backend.polls == polls + 1
    assert backend.canceled == [] and reconciler.lingering.job_ids() == [job_id]
    backend.end(job_id, JobState.COMPLETED)
    reconciler.tick()
    assert reconciler.lingering.job_ids() == [] and backend.canceled == []
