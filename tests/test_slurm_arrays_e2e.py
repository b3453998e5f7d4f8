"""Slurm job arrays end to end: a real server (auth on) and real workers over real Slurm.
A tick's tasks go as one array (a task of another header alone, through sbatch of one
job), each runs its own task to its own output, one is canceled while its siblings
complete; a gateway that died between sbatch and recording the element ids, restarted
with the array half-done (an element COMPLETE, one running, one pending), adopts every
element and submits nothing again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests

from funnel_hpc.backends import arrays
from funnel_hpc.backends.slurm import SlurmBackend
from funnel_hpc.core import config as config_mod
from funnel_hpc.core.events import iter_events
from funnel_hpc.gateway.reconcile.reconciler import Reconciler
from funnel_hpc.gateway.web.app import make_service
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
from tests.slurm_array_helpers import (
    ARRAY_USER,
    array_jobs_named,
    array_list_names,
    arrays_server,
    post,
    squeue_elements,
    task_of,
    worker_ended,
)
from tests.waiting import wait_for, wait_for_state

pytestmark = [pytest.mark.slurm, needs(SLURM, slurm_ready(), SLURM_REASON),
              needs(BWRAP, bwrap_ready(), BWRAP_REASON)]
QUEUE_WAIT = 600  # the one node may be busy with other tests' jobs


def wait_end(server, task_id: str) -> dict:
    return wait_for_state(server.api, task_id, TERMINAL, QUEUE_WAIT, auth=ARRAY_USER,
                          detail=lambda: server.log()[-3000:])


def job_of(task: dict) -> str:
    return str(task["logs"][-1]["metadata"]["job_id"])


def test_a_tick_goes_as_one_array_and_one_element_is_canceled(databases, tmp_path):
    work, db_url = tmp_path / "srv", databases.new("sqlite")
    queued = arrays_server(work, db_url, reconcile=False).start()
    try:
        ids = [post(queued, "echo started; sleep 600" if i == 3 else f"echo task-{i}")
               for i in range(7)]  # the 4th is canceled
        alone = post(queued, "echo alone", resources={"cpu_cores": 2})  # another header
    finally:
        queued.stop()
    server = arrays_server(work, db_url).start()  # its first tick sees all eight
    try:
        wait_for(lambda: executor_started(server, ids[3]), QUEUE_WAIT, "the long task running",
                 detail=lambda: server.log()[-3000:])
        canceled = task_of(server, ids[3])
        resp = requests.post(f"{server.api}/tasks/{ids[3]}:cancel",
                                           auth=ARRAY_USER, timeout=30)
        assert resp.status_code == 200, resp.text
        ended = {task_id: wait_end(server, task_id) for task_id in [*ids, alone]}
        assert ended[ids[3]]["state"] == "CANCELED"
        for i, task_id in enumerate(ids):
            if i != 3:
                assert ended[task_id]["state"] == "COMPLETE", ended[task_id]
                assert ended[task_id]["logs"][-1]["logs"][0]["stdout"] == f"task-{i}\n"
        elements = [job_of(ended[task_id]) for task_id in ids]
        job = elements[0].split("_")[0]
        assert sorted(elements) == sorted(f"{job}_{i}" for i in range(7)), elements
        assert job_of(canceled) == elements[3]
        assert job_of(ended[alone]).isdigit()  # a group of one: one plain job
        assert ended[alone]["logs"][-1]["logs"][0]["stdout"] == "alone\n"
        assert set(elements) <= set(squeue_elements(job))  # JOBID_IDX in squeue
        def element_state() -> str | None:
            state = subprocess.run(["squeue", "-h", "-t", "all", "-j", elements[3], "-O",
                                    "State"], capture_output=True, text=True).stdout.strip()
            return None if state in ("RUNNING", "COMPLETING") else state or "gone"

        # that element only was canceled (or it aged out of squeue already)
        assert wait_for(element_state, 120, "the canceled element's end") in ("CANCELLED",
                                                                                 "gone")
        assert len(array_list_names(work)) == 1
        for task_id in ids:
            assert (work / task_id / "slurm.err").exists()  # each element its own files
    finally:
        server.stop()


def test_restart_with_an_array_half_done_submits_nothing_again(databases, tmp_path,
                                                               monkeypatch):
    work, db_url = tmp_path / "srv", databases.new("sqlite")
    server = arrays_server(work, db_url, site={"extra_directives": ["--hold"]})
    server.write_config()
    config = config_mod.load(server.config_path, environ={})
    service = make_service(config)
    first = Reconciler(service, SlurmBackend(config.backend.slurm, Path(config.work_dir)),
                       config)
    # the gateway dies after sbatch, before it records the element ids
    monkeypatch.setattr(service.reconciler_queries, "record_submissions", lambda jobs: None)
    scripts = ["echo quick", "echo slow; sleep 20; echo done", "echo late"]
    ids = [service.create({"executors": [{"image": "busybox", "command": ["sh", "-c", s]}]},
                          owner=ARRAY_USER[0]) for s in scripts]
    first.tick()
    names = array_list_names(work)
    assert len(names) == 1
    listed = arrays.read(work, names[0])
    assert listed is not None
    jobs = array_jobs_named(listed.job_name)
    assert len(jobs) == 1, jobs
    job = jobs[0]
    element = {task_id: f"{job}_{listed.task_ids.index(task_id)}" for task_id in ids}
    try:
        subprocess.run(["scontrol", "release", element[ids[0]]], check=True)
        wait_for(lambda: worker_ended(work, ids[0]), QUEUE_WAIT, "the quick task's end")
        subprocess.run(["scontrol", "release", element[ids[1]]], check=True)
        wait_for(lambda: executor_started(server, ids[1]), QUEUE_WAIT, "the slow task running")
        assert all(service.get_row(task_id).job_id == "" for task_id in ids)  # claimed only
        server.start()
        def all_bound() -> bool:
            return all(service.get_row(t).job_id == element[t] for t in ids)

        # adopted: element ids recorded, nothing submitted again
        wait_for(all_bound, 120, f"the tasks bound to {element}",
                 detail=lambda: server.log()[-3000:])
        subprocess.run(["scontrol", "release", element[ids[2]]], check=True)
        for task_id, script in zip(ids, scripts, strict=True):
            task = wait_end(server, task_id)
            assert task["state"] == "COMPLETE", task
            assert len(task["logs"]) == 1 and job_of(task) == element[task_id]
            assert task["logs"][0]["logs"][0]["stdout"].startswith(script.split(";")[0][5:])
            starts = [e for e in iter_events(work / task_id / "events.jsonl")
                      if e["type"] == "task_start"]
            assert len(starts) == 1
        assert array_list_names(work) == names  # no second array
        assert array_jobs_named(listed.job_name) == [job]
        for task_id in ids:
            assert array_jobs_named(f"funnel-{task_id}") == []  # and no job of one
    finally:
        subprocess.run(["scancel", job])
        server.stop()
