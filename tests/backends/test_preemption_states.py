"""Preemption, node failure and never-runnable jobs as each backend reports them, on
canned scheduler output (squeue, sacct, HTCondor ClassAds, AWS Batch describe_jobs)."""

from __future__ import annotations

from funnel_hpc.backends import awsbatch, htcondor
from funnel_hpc.backends.base import FINISHED_JOB_STATES, JobState
from funnel_hpc.backends.commands import Result
from funnel_hpc.backends.slurm import SlurmBackend, map_state
from tests.backend_helpers import NO_WORK_DIR, FakeRunner, backend_options

SQUEUE = ("20|PREEMPTED|0|None\n"
          "21|NODE_FAIL|0|NodeDown\n"
          "22|PENDING|0|PartitionConfig\n"
          "23|PENDING|0|Resources\n"
          "24|PENDING|0|ReqNodeNotAvail, UnavailableNodes:vm\n"
          "25|PENDING|0|BadConstraints\n"
          "26|REQUEUED|0|None\n")
SACCT = "30|PREEMPTED|0:15|None\n31|BOOT_FAIL|0:0|None\n"


def test_slurm_preemption_node_failure_and_unrunnable_from_squeue_and_sacct():
    backend = SlurmBackend(backend_options("slurm"), NO_WORK_DIR)
    backend.runner = runner = FakeRunner({
        ("squeue",): Result(0, SQUEUE, ""),
        ("sacct", "-n", "-X", "-P", "-o", "JobID", "-j", "1"): Result(0, "", ""),
        ("sacct",): Result(0, SACCT, "")})
    statuses = backend.poll(["20", "21", "22", "23", "24", "25", "26", "30", "31"])
    assert {job: status.state for job, status in statuses.items()} == {
        "20": JobState.PREEMPTED, "21": JobState.NODE_FAILED, "22": JobState.UNRUNNABLE,
        "23": JobState.PENDING, "24": JobState.PENDING,  # nodes come back: keep waiting
        "25": JobState.UNRUNNABLE, "26": JobState.PENDING,
        "30": JobState.PREEMPTED, "31": JobState.NODE_FAILED}
    assert statuses["22"].reason == "squeue: PENDING exit=0:0 reason=PartitionConfig"
    assert statuses["30"].reason.startswith("sacct: PREEMPTED")
    assert [command[0] for command in runner.commands] == ["squeue", "sacct", "sacct"]


def test_unrunnable_is_waiting_not_finished():
    assert JobState.UNRUNNABLE not in FINISHED_JOB_STATES
    assert {JobState.PREEMPTED, JobState.NODE_FAILED} <= FINISHED_JOB_STATES
    assert map_state("RUNNING", "PartitionConfig") == JobState.RUNNING  # reasons: pending only


def test_htcondor_eviction_is_preempted():
    evicted = {"ClusterId": 7, "JobStatus": 1, "NumJobStarts": 1}
    waiting = {"ClusterId": 8, "JobStatus": 1, "NumJobStarts": 0}
    assert htcondor.job_status(evicted).state == JobState.PREEMPTED
    assert "evicted" in htcondor.job_status(evicted).reason
    assert htcondor.job_status(waiting).state == JobState.PENDING


def test_aws_batch_spot_reclaim_is_preempted():
    reclaimed = {"status": "FAILED",
                 "statusReason": "Host EC2 (instance i-0abc) terminated."}
    failed = {"status": "FAILED", "statusReason": "Essential container in task exited"}
    assert awsbatch.job_status(reclaimed).state == JobState.PREEMPTED
    assert awsbatch.job_status(failed).state == JobState.FAILED
