"""Live logs through the real server on the real Slurm backend (issue 18.1): the lines a
Slurm job's executor printed show in the FULL view while it still runs, and `funnel task
logs --follow` prints every line once and ends with the task.

tests/test_live_logs_e2e.py is the same on the local backend. Nothing here waits for a
time: a task sleeps (canceled once its line was seen) or waits for a file the test writes
into its volume; the limits are generous because Slurm may be busy with other tests' jobs.
"""

from __future__ import annotations

import subprocess

import pytest
import requests

from tests.components import SLURM, SLURM_REASON, needs, slurm_ready
from tests.e2e_helpers import TICK
from tests.live_logs_helpers import (
    TERMINAL,
    create,
    follow_five_lines,
    live_logs_server,
    running_stdout,
)
from tests.server_helpers import clean_env, funnel_argv
from tests.waiting import wait_for, wait_for_state

pytestmark = [pytest.mark.slurm, needs(SLURM, slurm_ready(), SLURM_REASON)]

QUEUE_WAIT = 600  # other tests' jobs may hold both slots first


@pytest.fixture(scope="module")
def server(databases, tmp_path_factory):
    srv = live_logs_server(tmp_path_factory.mktemp("live-logs-slurm"), databases.new("sqlite"),
                           {"name": "slurm"}, TICK)
    yield srv
    srv.stop()


def job_listed(job_id: str) -> bool:
    """Whether Slurm still lists the job as pending or running."""
    listed = subprocess.run(["squeue", "-h", "-j", job_id, "-t", "PENDING,RUNNING",
                             "-o", "%i"], capture_output=True, text=True)
    return job_id in listed.stdout.split()


def test_a_running_slurm_task_shows_its_line_then_cancels(server):
    task_id = create(server, "echo first line; sleep 3600")
    try:
        wait_for_state(server.api, task_id, "RUNNING", QUEUE_WAIT,
                       detail=lambda: server.log()[-2000:])
        # log_update_seconds + the worker's post + a busy machine: generous, and the task
        # cannot end by itself within the wait
        wait_for(lambda: running_stdout(server, task_id) == "first line\n", 120,
                 "the first line in the FULL view", detail=lambda: server.log()[-2000:])
        task = requests.get(f"{server.api}/tasks/{task_id}", params={"view": "FULL"},
                            timeout=10).json()
        assert task["state"] == "RUNNING"  # the line came while the job still ran
        job_id = task["logs"][0]["metadata"]["job_id"]
    finally:
        canceled = subprocess.run(funnel_argv("task", "cancel", task_id, "--server",
                                              server.url), env=clean_env(),
                                  capture_output=True, text=True, timeout=60)
    assert canceled.returncode == 0, canceled.stderr
    done = wait_for_state(server.api, task_id, TERMINAL, 120)
    assert done["state"] == "CANCELED"
    wait_for(lambda: not job_listed(job_id), 120, f"Slurm job {job_id} to go")


def test_task_logs_follow_on_slurm_prints_each_line_once(server):
    follow_five_lines(server, QUEUE_WAIT, 180)
