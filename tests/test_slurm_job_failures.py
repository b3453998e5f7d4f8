"""Slurm jobs that never run or die before their worker records an end, on the real
cluster through a real server: an unrunnable job is canceled and its task is SYSTEM_ERROR
naming Slurm's reason; a crashed worker's slurm.out tail reaches system_logs."""

from __future__ import annotations

import os
import subprocess

import pytest
import requests

from tests.components import SLURM, SLURM_REASON, needs, slurm_ready
from tests.e2e_helpers import TERMINAL, create, get, make_server, sh, wait_state
from tests.waiting import wait_for

pytestmark = [pytest.mark.slurm, needs(SLURM, slurm_ready(), SLURM_REASON)]
QUEUE_WAIT = 900  # the one-node cluster may be busy with other tests' jobs


def node_cpus() -> int:
    done = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True,
                          check=True)
    return max(int(line.strip().rstrip("+")) for line in done.stdout.split())


def job_of(task: dict) -> str | None:
    logs = task.get("logs") or [{}]
    return logs[-1].get("metadata", {}).get("job_id")


def system_logs(task: dict) -> str:
    return "\n".join(line for entry in task["logs"] for line in entry.get("system_logs", []))


def test_more_cpus_than_any_node_is_system_error_naming_the_reason(databases, tmp_path):
    server = make_server("slurm", tmp_path / "srv", databases.new("sqlite")).start()
    try:
        cpus = node_cpus() + 2  # under resources.max_cpu_cores: accepted at POST
        task_id = create(server, [sh("true")], resources={"cpu_cores": cpus})
        task = wait_state(server, task_id, TERMINAL, timeout=QUEUE_WAIT)
        assert task["state"] == "SYSTEM_ERROR", task
        logs = system_logs(task)
        assert "can never start" in logs and "PartitionConfig" in logs, logs
        job_id = task["logs"][-1]["metadata"]["job_id"]
        queued = subprocess.run(["squeue", "-h", "-j", job_id, "-t", "PENDING", "-o", "%i"],
                                capture_output=True, text=True)
        assert job_id not in queued.stdout  # canceled, not left pending forever
    finally:
        server.stop()


def test_crashed_worker_leaves_its_slurm_output_in_system_logs(databases, tmp_path):
    server = make_server("slurm", tmp_path / "srv", databases.new("sqlite"))
    crash = ["/bin/sh", "-c", "echo worker-crashed-before-any-event >&2; exit 3", "crash"]
    server.overrides["worker"]["command"] = crash
    server.start()
    try:
        task_id = create(server, [sh("true")])
        task = wait_state(server, task_id, TERMINAL, timeout=QUEUE_WAIT)
        assert task["state"] == "SYSTEM_ERROR", task
        logs = system_logs(task)
        assert "exit=3:0" in logs, logs
        assert "of slurm.err:\nworker-crashed-before-any-event" in logs, logs
        assert get(server, task_id, "MINIMAL")["state"] == "SYSTEM_ERROR"
    finally:
        server.stop()


def test_task_files_are_private_whatever_the_umask(databases, tmp_path):
    old = os.umask(0o022)  # the server inherits it
    try:
        server = make_server("slurm", tmp_path / "srv", databases.new("sqlite")).start()
    finally:
        os.umask(old)
    try:
        task_id = create(server, [sh("sleep 600")])
        wait_for(lambda: job_of(get(server, task_id)), 60, f"task {task_id} to be submitted",
                 detail=server.log)
        directory = server.work_dir / task_id
        assert directory.stat().st_mode & 0o777 == 0o700
        for name in ("task.json", "slurm.sh"):
            assert (directory / name).stat().st_mode & 0o777 == 0o600, name
        assert (server.work_dir / "worker-config.json").stat().st_mode & 0o777 == 0o600
        assert requests.post(f"{server.api}/tasks/{task_id}:cancel", timeout=10).ok
        # its job gone before the server stops: else `sleep 600` holds a Slurm slot
        assert wait_state(server, task_id, TERMINAL, timeout=120)["state"] == "CANCELED"
    finally:
        server.stop()
