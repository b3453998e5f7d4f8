"""Grid Engine job arrays end to end: a real server (auth on), its reconciler and the real
worker over the real single-host cell (scripts/setup/50-gridengine.sh; all.q has 2
slots), through DRMAA runBulkJobs and through qsub -t.

Seven tasks with one header (and one with another) are QUEUED before the reconciler
starts, so its first tick sees them all: ONE array job of 7 elements, the eighth alone
(qstat -j, then the accounting file), one element cancelled through the API while the
others run, the gateway killed (-9) with the array half-done and restarted: nothing is
submitted again, every other task COMPLETE with its own logs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests
from werkzeug.security import generate_password_hash

from funnel_hpc.backends.gridengine_accounting import parse_accounting_line
from funnel_hpc.backends.gridengine_qstat import parse_qstat_xml
from tests.e2e_helpers import TERMINAL, TICK, port_closed
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for, wait_for_state

pytestmark = pytest.mark.gridengine

USER = ("alice", "alice-pw")
TASKS = 7
ACCOUNTING = Path("/var/lib/gridengine/default/common/accounting")


def gateway(work: Path, db_url: str, mode: str) -> ServerProcess:
    return ServerProcess(work, db_url, reconcile=False, overrides={
        "auth": {"mode": "basic", "users": {USER[0]: generate_password_hash(USER[1])},
                 "admins": []},
        "backend": {"name": "gridengine", "gridengine": {"mode": mode}},
        "reconciler": {"interval_seconds": TICK},
        "worker": {"container_driver": "bwrap", "poll_server_seconds": 1}})


def post(server: ServerProcess, script: str, **resources: object) -> str:
    resp = requests.post(server.api + "/tasks", auth=USER, timeout=10, json={
        "name": "array", "resources": {"cpu_cores": 1, **resources},
        "executors": [{"image": "busybox", "command": ["sh", "-c", script]}]})
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def tasks(server: ServerProcess) -> dict[str, dict]:
    resp = requests.get(server.api + "/tasks", auth=USER, timeout=10,
                        params={"view": "FULL", "page_size": "100"})
    assert resp.status_code == 200, resp.text
    return {task["id"]: task for task in resp.json()["tasks"]}


def job_ids(server: ServerProcess) -> dict[str, str]:
    """task id -> job id of each task that has one."""
    return {task_id: task["logs"][0]["metadata"]["job_id"]
            for task_id, task in tasks(server).items()
            if task.get("logs") and "job_id" in task["logs"][0].get("metadata", {})}


def jobs_left(server: ServerProcess, task_ids: list[str]) -> set[str]:
    """The numbers of this test's jobs still in qstat: named after its tasks or its task
    lists (so a failed run leaves no job holding the cell's 2 slots)."""
    lists = Path(server.work_dir) / "arrays"
    names = {f"funnel-{task_id}" for task_id in task_ids} | {
        f"funnel-array-{path.name}" for path in (lists.iterdir() if lists.is_dir() else [])}
    shown = subprocess.run(["qstat", "-xml"], capture_output=True, text=True).stdout
    return {job.split(".")[0] for job, (_, name) in parse_qstat_xml(shown).items()
            if name in names} if shown else set()


def all_submitted(server: ServerProcess) -> dict[str, str] | None:
    found = job_ids(server)
    return found if len(found) == TASKS + 1 else None


def accounted_elements(number: str) -> set[int]:
    """The elements of job `number` in Grid Engine's accounting file."""
    records = (parse_accounting_line(line) for line in
               ACCOUNTING.read_text(errors="replace").splitlines())
    return {int(r.job_id.split(".")[1]) for r in records
            if r is not None and r.job_id.startswith(f"{number}.")}


@pytest.mark.parametrize("mode", ["drmaa", "cli"])
def test_seven_tasks_one_array_cancel_one_restart_half_done(mode, gridengine, databases,
                                                            tmp_path):
    server = gateway(tmp_path / "work", databases.new("sqlite"), mode).start()
    created: list[str] = []
    try:
        victim = post(server, "echo up; sleep 300")
        others = [post(server, f"sleep 2; echo task-{i}") for i in range(TASKS - 1)]
        # another header (-p -10): never in the others' array
        loner = post(server, "echo alone", backend_parameters={"priority": "-10"})
        created += [victim, *others, loner]
        server.stop()  # all seven QUEUED before the first tick
        server.reconcile = True
        server.start()
        ids = wait_for(lambda: all_submitted(server), 120, "eight job ids",
                       detail=lambda: server.log()[-3000:])
        assert ids.pop(loner).isdigit()  # a job of its own
        numbers = {job_id.split(".")[0] for job_id in ids.values()}
        assert len(numbers) == 1, ids  # ONE job ...
        (number,) = numbers
        assert sorted(int(j.split(".")[1]) for j in ids.values()) == list(range(1, 8))
        shown = subprocess.run(["qstat", "-j", number], capture_output=True, text=True)
        assert "1-7:1" in shown.stdout, shown.stdout  # ... of 7 tasks
        assert requests.post(f"{server.api}/tasks/{victim}:cancel", auth=USER,
                             timeout=10).ok

        def half_done() -> bool:
            states = [task["state"] for task in tasks(server).values()]
            return "COMPLETE" in states and any(s not in TERMINAL for s in states)

        wait_for(half_done, 180, "the array half-done", interval=0.1,
                 detail=lambda: server.log()[-3000:])
        server.kill()
        wait_for(lambda: port_closed(server.port), 30, f"port {server.port} to close")
        server.start()
        for task_id in [victim, *others, loner]:
            wait_for_state(server.api, task_id, TERMINAL, 240, auth=USER,
                           detail=lambda: server.log()[-3000:])
        ended = tasks(server)
        assert ended[victim]["state"] == "CANCELED"
        assert ended[loner]["state"] == "COMPLETE", ended[loner]
        for i, task_id in enumerate(others):
            task = ended[task_id]
            assert task["state"] == "COMPLETE", task
            assert len(task["logs"]) == 1, task["logs"]  # one attempt: nothing resubmitted
            assert task["logs"][0]["metadata"]["job_id"] == ids[task_id]
            assert task["logs"][0]["logs"][0]["stdout"] == f"task-{i}\n"
        # every element that ran is a record of that one job (qmaster flushes every 15 s)
        ran = {int(ids[task_id].split(".")[1]) for task_id in others}
        wait_for(lambda: ran <= accounted_elements(number), 60,
                 f"job {number}'s elements in the accounting file")
    finally:
        server.stop()
        numbers = jobs_left(server, created)
        if numbers:
            subprocess.run(["qdel", *numbers], capture_output=True)
