"""Issue #5: each backend's poll makes one scheduler call per tick per 100 jobs or fewer,
counted at 500 in-flight jobs. Here the local backend and the real Slurm; Grid Engine,
AWS Batch and HTCondor have theirs next to their other tests (grep IN_FLIGHT)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from funnel_hpc.backends.base import JobState
from funnel_hpc.backends.local import LocalBackend, _group_has_members
from funnel_hpc.backends.slurm import SlurmBackend
from tests.backend_helpers import NO_WORK_DIR, backend_options, make_request

IN_FLIGHT = 500
SLURM_COMMANDS = ("sbatch", "squeue", "sacct", "scancel")


def task(i: int) -> dict:
    return {"id": f"poll500x{i:04d}", "name": "poll 500", "resources": {"cpu_cores": 1}}


def test_local_poll_of_500_jobs_runs_no_command(tmp_path, monkeypatch):
    """The local backend has no scheduler: a poll reads the task dirs and /proc only."""
    backend = LocalBackend(backend_options("local", max_concurrent=2, cancel_grace_seconds=1),
                           tmp_path)
    ids = [backend.submit(make_request(tmp_path, task(i), ["/bin/sh", "-c", "sleep 60"]))
           for i in range(IN_FLIGHT)]
    started: list[list[str]] = []
    real_popen = subprocess.Popen

    def counting_popen(argv, *args, **kwargs):
        started.append(list(argv))
        return real_popen(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", counting_popen)
    try:
        statuses = backend.poll(ids)
        assert started == []
        states = [statuses[i].state for i in ids]
        assert states.count(JobState.RUNNING) == 2
        assert states.count(JobState.PENDING) == IN_FLIGHT - 2
    finally:
        for job_id in ids:
            backend.cancel(job_id)
        for pid_file in tmp_path.glob("*/local.pid"):
            pid = json.loads(pid_file.read_text())["pid"]
            if _group_has_members(pid):
                os.killpg(pid, signal.SIGKILL)
        backend.close()


@pytest.fixture
def counted_slurm_commands(slurm, tmp_path, monkeypatch) -> Path:
    """sbatch/squeue/sacct/scancel on PATH as wrappers that log their name, then run the
    real command: the log counts what the backend really ran."""
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    log = tmp_path / "commands.log"
    for name in SLURM_COMMANDS:
        real = shutil.which(name)
        assert real, f"{name} not on PATH"
        script = wrappers / name
        script.write_text(f"#!/bin/sh\necho {name} >> '{log}'\nexec '{real}' \"$@\"\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrappers}:{os.environ['PATH']}")
    log.touch()
    return log


@pytest.mark.slurm
def test_slurm_poll_of_500_held_jobs_is_one_squeue(counted_slurm_commands, tmp_path):
    log = counted_slurm_commands
    backend = SlurmBackend(backend_options("slurm", backend_parameters={"hold": "--hold"}),
                           NO_WORK_DIR)
    ids: list[str] = []
    try:
        with ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(lambda i: backend.submit(make_request(
                tmp_path, task(i), ["/bin/true"], {"hold": ""})), range(IN_FLIGHT)))
        assert log.read_text().split() == ["sbatch"] * IN_FLIGHT
        log.write_text("")
        statuses = backend.poll(ids)
        calls = log.read_text().split()
        assert calls == ["squeue"], calls  # one call for 500 jobs, all of them in squeue
        assert {statuses[j].state for j in ids} == {JobState.PENDING}
        assert all("reason=JobHeldUser" in statuses[j].reason for j in ids)
    finally:
        if ids:
            subprocess.run(["scancel", *ids], check=False, capture_output=True)
