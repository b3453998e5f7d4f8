"""backend.slurm.submit_as_owner: each job is submitted with sudo as its task's owner."""

from __future__ import annotations

import pwd
import subprocess

import pytest

from funnel_hpc.backends.base import BackendError, JobState, JobStatus
from funnel_hpc.backends.slurm import SlurmBackend
from tests.backend_helpers import backend_options, make_request
from tests.waiting import wait_for


def wait(backend, job_id, states, timeout=60.0):
    last: list[JobStatus] = []

    def reached() -> JobStatus | None:
        status = backend.poll([job_id])[job_id]
        last[:] = [status]
        return status if status.state in states else None

    return wait_for(reached, timeout, f"job {job_id} to reach {states}", interval=0.5,
                    detail=lambda: f"last seen: {last[0] if last else None}")


def test_owner_names_are_checked_before_sudo(tmp_path):
    backend = SlurmBackend(backend_options("slurm", submit_as_owner=True),
                           {"work_dir": str(tmp_path)})
    for bad in (None, "root; rm -rf /", "../x", "Alice", "-u", "a b"):
        request = make_request(tmp_path, {"id": "own0"}, ["/bin/true"])
        request.owner = bad
        with pytest.raises(BackendError, match="cannot submit as owner"):
            backend.submit(request)


@pytest.mark.slurm
def test_job_runs_as_the_owner(tmp_path, slurm):
    try:
        uid = pwd.getpwnam("funneltest").pw_uid
    except KeyError:
        pytest.skip("user funneltest missing (scripts/setup/30-slurm.sh creates it)")
    tmp_path.chmod(0o755)
    for parent in tmp_path.parents:
        if parent == parent.parent:
            break
        parent.chmod(parent.stat().st_mode | 0o111)  # traversable for the owner
    backend = SlurmBackend(backend_options("slurm", submit_as_owner=True),
                           {"work_dir": str(tmp_path)})
    request = make_request(tmp_path, {"id": "own1"},
                           ["/bin/sh", "-c", f"id -u > {tmp_path}/own1/whoami"])
    request.owner = "funneltest"
    job = backend.submit(request)
    assert wait(backend, job, {JobState.COMPLETED}).state == JobState.COMPLETED
    assert (tmp_path / "own1" / "whoami").read_text().strip() == str(uid)
    assert (tmp_path / "own1").stat().st_uid == uid
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    assert "UserId=funneltest" in shown.stdout
