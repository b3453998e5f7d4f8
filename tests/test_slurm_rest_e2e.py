"""Slurm REST mode end to end: a real server (auth on) whose Slurm backend talks to the
real slurmctld only through the real slurmrestd (backend.slurm.mode: rest). A tick's
seven tasks go as one array (one POST), one is canceled while its six siblings complete,
a task of another header goes alone as a plain job, and a failing executor ends
EXECUTOR_ERROR with its exit code."""

from __future__ import annotations

import subprocess

import pytest
import requests

from tests.components import (
    BWRAP,
    BWRAP_REASON,
    SLURM,
    SLURM_REASON,
    bwrap_ready,
    needs,
    slurm_ready,
)
from tests.e2e_helpers import TERMINAL, executor_started
from tests.slurm_array_helpers import ARRAY_USER, array_list_names, arrays_server, post, task_of
from tests.slurm_rest_helpers import SOCKET, need_slurmrestd, patient
from tests.waiting import wait_for, wait_for_state

pytestmark = [pytest.mark.slurm, needs(SLURM, slurm_ready(), SLURM_REASON),
              needs(BWRAP, bwrap_ready(), BWRAP_REASON)]
QUEUE_WAIT = 600  # the one node may be busy with other tests' jobs
REST_SOCKET = {"socket": SOCKET}  # backend.slurm.rest


def job_of(task: dict) -> str:
    return str(task["logs"][-1]["metadata"]["job_id"])


def test_rest_mode_array_cancel_plain_job_and_exit_code(databases, tmp_path):
    need_slurmrestd()
    work, db_url = tmp_path / "srv", databases.new("sqlite")
    queued = arrays_server(work, db_url, reconcile=False, mode="rest",
                           rest=REST_SOCKET).start()
    try:
        ids = [post(queued, "echo started; sleep 600" if i == 3 else f"echo rest-{i}")
               for i in range(7)]  # the 4th is canceled
        alone = post(queued, "echo alone", resources={"cpu_cores": 2})  # another header
    finally:
        queued.stop()
    # its first tick sees all eight
    server = arrays_server(work, db_url, mode="rest", rest=REST_SOCKET).start()
    jobs: set[str] = set()
    try:
        wait_for(lambda: executor_started(server, ids[3]), QUEUE_WAIT, "the long task running",
                 detail=lambda: server.log()[-3000:])
        jobs.add(job_of(task_of(server, ids[3])).split("_")[0])
        resp = requests.post(f"{server.api}/tasks/{ids[3]}:cancel", auth=ARRAY_USER,
                             timeout=30)
        assert resp.status_code == 200, resp.text
        failing = post(server, "echo bad >&2; exit 3")
        ended = {task_id: wait_for_state(server.api, task_id, TERMINAL, QUEUE_WAIT,
                                         auth=ARRAY_USER, detail=lambda: server.log()[-3000:])
                 for task_id in [*ids, alone, failing]}
        jobs |= {job_of(task).split("_")[0] for task in ended.values() if task["logs"]}
        assert ended[ids[3]]["state"] == "CANCELED"
        for i, task_id in enumerate(ids):
            if i != 3:
                assert ended[task_id]["state"] == "COMPLETE", ended[task_id]
                assert ended[task_id]["logs"][-1]["logs"][0]["stdout"] == f"rest-{i}\n"
        elements = [job_of(ended[task_id]) for task_id in ids]
        job = elements[0].split("_")[0]
        assert sorted(elements) == sorted(f"{job}_{i}" for i in range(7)), elements
        assert job_of(ended[alone]).isdigit()  # a group of one: one plain job
        assert ended[alone]["state"] == "COMPLETE", ended[alone]
        assert ended[alone]["logs"][-1]["logs"][0]["stdout"] == "alone\n"
        assert ended[failing]["state"] == "EXECUTOR_ERROR", ended[failing]
        assert ended[failing]["logs"][-1]["logs"][0]["exit_code"] == 3
        assert len(array_list_names(work)) == 1
        # slurmrestd's view: that element only was canceled (or it already aged out)
        rest = patient()
        rows = {row.job_id: row for row in rest.jobs() if row.job_id in elements}
        # CANCELLED by the DELETE, or FAILED with exit 3: the worker saw the cancel on
        # the server first and ended CANCELED (worker/runner.py EXIT_CODES)
        canceled = rows.get(elements[3])
        assert canceled is None or canceled.state == "CANCELLED" or \
            (canceled.state, canceled.exit_code) == ("FAILED", "3:0"), canceled
        assert all(rows[e].state == "COMPLETED" for i, e in enumerate(elements)
                   if i != 3 and e in rows), rows
        rest.rest.close()
    finally:
        server.stop()
        if jobs:
            subprocess.run(["scancel", *sorted(jobs)])
