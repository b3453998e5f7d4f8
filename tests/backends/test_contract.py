"""The backend contract of backends/base.py, held by every backend: poll never raises,
recover answers "no such job" only when the scheduler said so, one transient rule for
the command-line backends (backends/commands.py). Fake runners and bindings; the real
Slurm outage is in tests/test_faults.py."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from funnel_hpc.backends.base import BackendError, JobState
from funnel_hpc.backends.commands import Result, failure, is_transient
from funnel_hpc.backends.gridengine import GridEngineBackend
from funnel_hpc.backends.htcondor import HTCondorBackend
from funnel_hpc.backends.slurm import UNREACHABLE as SLURM_UNREACHABLE
from funnel_hpc.backends.slurm import SlurmBackend
from tests.backend_helpers import NO_WORK_DIR, FakeRunner, backend_options, make_request

SLURM_DOWN = Result(1, "", "slurm_load_jobs error: Unable to contact slurm controller "
                           "(connect failure)\n")
QMASTER_DOWN = Result(1, "", 'error: commlib error: got select error (Connection refused)\n'
                             'unable to send message to qmaster using port 6444 on host "vm"\n')
MISSING = Result(127, "", "qsub: command not found")
TASK = {"id": "c0ffee00", "executors": [{"image": "busybox", "command": ["true"]}]}


def slurm(answers: dict, **options) -> tuple[SlurmBackend, FakeRunner]:
    backend = SlurmBackend(backend_options("slurm", **options), NO_WORK_DIR)
    backend.runner = FakeRunner(answers)
    return backend, backend.runner


def gridengine(answers: dict, mode: str = "cli", **options) -> GridEngineBackend:
    backend = GridEngineBackend(backend_options("gridengine", mode=mode, **options), NO_WORK_DIR)
    backend.runner = FakeRunner(answers)
    return backend


# ---- one transient rule (commands.failure) ----

def test_transient_rule_for_command_line_backends():
    assert is_transient(Result(124, "", "squeue: timed out after 60s"))
    assert is_transient(Result(255, "", "ssh login: Connection reset"))
    assert is_transient(SLURM_DOWN, SLURM_UNREACHABLE)
    assert not is_transient(SLURM_DOWN)  # the phrases are each scheduler's own
    assert not is_transient(Result(1, "", "sbatch: error: invalid partition"), SLURM_UNREACHABLE)
    missing = failure("qsub", MISSING)
    assert not missing.transient  # a missing command is configuration: it will not heal
    assert str(missing).startswith("qsub failed (127): qsub: command not found")
    assert "configuration" in str(missing)
    long = failure("sbatch", Result(1, "x" * 1000, ""))
    assert str(long) == f"sbatch failed (1): {'x' * 300}"


def test_gridengine_missing_qsub_fails_the_submission_not_retried(tmp_path):
    backend = gridengine({("qsub",): MISSING})
    with pytest.raises(BackendError, match=r"qsub failed \(127\)") as raised:
        backend.submit(make_request(tmp_path, TASK))
    assert not raised.value.transient
    down = gridengine({("qsub",): QMASTER_DOWN})
    with pytest.raises(BackendError) as raised:
        down.submit(make_request(tmp_path, TASK))
    assert raised.value.transient


def test_slurm_sbatch_errors_follow_the_rule(tmp_path):
    for result, transient in ((SLURM_DOWN, True), (Result(124, "", "timed out"), True),
                              (Result(1, "", "sbatch: error: invalid partition"), False),
                              (Result(127, "", "sbatch: command not found"), False)):
        backend, _ = slurm({("sbatch",): result})
        with pytest.raises(BackendError) as raised:
            backend.submit(make_request(tmp_path, TASK))
        assert raised.value.transient is transient, result


# ---- recover: None only when the scheduler said so ----

def test_slurm_recover_raises_when_squeue_cannot_ask():
    for result in (SLURM_DOWN, Result(124, "", "squeue: timed out after 60s"),
                   Result(1, "", "squeue: error: something else")):
        backend, _ = slurm({("squeue",): result})
        with pytest.raises(BackendError) as raised:
            backend.recover("c0ffee00", Path("/nonexistent"))
        assert raised.value.transient, result
    backend, runner = slurm({("squeue",): Result(0, "", "")})
    assert backend.recover("c0ffee00", Path("/nonexistent")) is None  # Slurm said: no such job
    assert runner.commands[-1][:4] == ["squeue", "-h", "--me", "-t"]
    backend, _ = slurm({("squeue",): Result(0, "41\n417\n", "")})
    assert backend.recover("c0ffee00", Path("/nonexistent")) == "417"  # the newest, numerically


def test_gridengine_recover_raises_when_qstat_cannot_ask(tmp_path):
    backend = gridengine({("qstat",): QMASTER_DOWN},
                         accounting_file=str(tmp_path / "accounting"))
    with pytest.raises(BackendError) as raised:
        backend.recover("c0ffee00", tmp_path)
    assert raised.value.transient and "commlib error" in str(raised.value)
    empty = gridengine({("qstat",): Result(0, "<job_info><queue_info/><job_info/></job_info>",
                                           "")}, accounting_file=str(tmp_path / "accounting"))
    assert empty.recover("c0ffee00", tmp_path) is None


# ---- poll never raises ----

def test_every_command_line_poll_is_unknown_when_the_scheduler_is_down(tmp_path):
    backend, _ = slurm({("squeue",): SLURM_DOWN})
    statuses = backend.poll(["1", "2"])
    assert {s.state for s in statuses.values()} == {JobState.UNKNOWN}
    assert "Unable to contact slurm controller" in statuses["1"].reason
    ge = gridengine({("qstat",): QMASTER_DOWN})
    statuses = ge.poll(["1", "2"])
    assert {s.state for s in statuses.values()} == {JobState.UNKNOWN}
    assert "commlib error" in statuses["2"].reason


class NoSchedd:
    """Bindings whose schedd cannot be located (the daemon is down)."""

    JobAction = types.SimpleNamespace(Remove="Remove")

    @staticmethod
    def Schedd():
        raise RuntimeError("Unable to locate local daemon")


def test_htcondor_poll_without_a_schedd_is_unknown_and_recover_raises(tmp_path):
    backend = HTCondorBackend(backend_options("htcondor"), NO_WORK_DIR, bindings=NoSchedd)
    statuses = backend.poll(["12", "13"])
    assert {s.state for s in statuses.values()} == {JobState.UNKNOWN}
    assert "cannot locate the schedd" in statuses["12"].reason
    with pytest.raises(BackendError) as raised:
        backend.recover("c0ffee00", tmp_path)
    assert raised.value.transient


# ---- Slurm with submit_as_owner: the in-flight jobs only, not every user's ----

def test_slurm_owner_mode_polls_the_jobs_by_id():
    listed = Result(0, "7|RUNNING|0|None\n", "")
    backend, runner = slurm({("squeue",): listed, ("sacct",): Result(1, "", "disabled")},
                            submit_as_owner=True)
    statuses = backend.poll(["12", "7", "100"])
    squeue = runner.commands[0]
    assert "--me" not in squeue and squeue[squeue.index("-j") + 1] == "7,12,100"
    assert statuses["7"].state == JobState.RUNNING
    assert statuses["12"].state == statuses["100"].state == JobState.LOST
    assert sum(1 for c in runner.commands if c[0] == "squeue") == 1


def test_slurm_owner_mode_one_forgotten_job_is_lost_not_unknown():
    forgotten = Result(1, "", "slurm_load_jobs error: Invalid job id specified\n")
    backend, _ = slurm({("squeue",): forgotten, ("sacct",): Result(1, "", "disabled")},
                       submit_as_owner=True)
    assert backend.poll(["12"])["12"].state == JobState.LOST
    backend, _ = slurm({("squeue",): SLURM_DOWN}, submit_as_owner=True)
    assert backend.poll(["12"])["12"].state == JobState.UNKNOWN
