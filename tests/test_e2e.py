"""End to end over HTTP: server + reconciler + backend + worker, on each backend here.

The same suite runs on the local backend and on the real single-node Slurm
cluster (scripts/setup/30-slurm.sh).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ServerProcess
from worker.events import iter_events

TICK = 0.5
TERMINAL = {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED", "PREEMPTED"}


def slurm_ready() -> bool:
    if not shutil.which("sinfo"):
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


BACKENDS = {
    "local": {"backend": {"name": "local", "local": {"max_concurrent": 2}}},
    "slurm": {"backend": {"name": "slurm"}},
}


@pytest.fixture(params=sorted(BACKENDS), scope="module")
def backend(request) -> str:
    if request.param == "slurm" and not slurm_ready():
        if os.environ.get("CI"):
            pytest.fail("Slurm is not running; scripts/setup/30-slurm.sh should start it")
        pytest.skip("Slurm not running (scripts/setup/30-slurm.sh)")
    return request.param


def make_server(backend: str, work: Path, db_url: str) -> ServerProcess:
    overrides = {**BACKENDS[backend],
                 "reconciler": {"interval_seconds": TICK},
                 "worker": {"container_driver": "bwrap", "poll_server_seconds": 1}}
    return ServerProcess(work, db_url, overrides=overrides, reconcile=True)


@pytest.fixture(scope="module")
def server(backend, databases, tmp_path_factory):
    srv = make_server(backend, tmp_path_factory.mktemp(f"e2e-{backend}"),
                      databases.new("sqlite")).start()
    yield srv
    srv.stop()


def create(server, executors, **fields) -> str:
    resp = requests.post(server.api + "/tasks", json={"executors": executors, **fields},
                         timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def get(server, task_id, view="FULL") -> dict:
    return requests.get(f"{server.api}/tasks/{task_id}", params={"view": view}, timeout=10).json()


def wait_state(server, task_id, states, timeout=90.0) -> dict:
    states = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    task = {}
    while time.monotonic() < deadline:
        task = get(server, task_id)
        if task["state"] in states:
            return task
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} is {task.get('state')}, not {states}:\n"
                         f"{task}\n{server.log()[-3000:]}")


def sh(script: str, **fields) -> dict:
    return {"image": "busybox", "command": ["sh", "-c", script], **fields}


def test_hello_world_completes_with_stdout(server, backend):
    task_id = create(server, [sh("echo hello world")], name="hello")
    task = wait_state(server, task_id, TERMINAL)
    assert task["state"] == "COMPLETE", task
    log = task["logs"][0]
    assert log["logs"][0]["stdout"] == "hello world\n"
    assert log["logs"][0]["exit_code"] == 0
    assert log["metadata"]["backend"] == backend and log["metadata"]["job_id"]
    basic = get(server, task_id, "BASIC")
    assert "stdout" not in basic["logs"][0]["logs"][0]


def test_executor_error(server):
    task_id = create(server, [sh("echo bad >&2; exit 7")])
    task = wait_state(server, task_id, TERMINAL)
    assert task["state"] == "EXECUTOR_ERROR"
    assert task["logs"][0]["logs"][0]["exit_code"] == 7
    assert task["logs"][0]["logs"][0]["stderr"] == "bad\n"


def test_cancel_running_task(server):
    task_id = create(server, [sh("echo up; sleep 120")])
    wait_state(server, task_id, "RUNNING")
    time.sleep(1)
    assert requests.post(f"{server.api}/tasks/{task_id}:cancel", timeout=10).ok
    task = wait_state(server, task_id, TERMINAL, timeout=60)
    assert task["state"] == "CANCELED"


def test_cancel_pending_task(server, backend):
    # fill the slots (local: max_concurrent=2; Slurm: 2 CPUs) so the next task waits
    blockers = [create(server, [sh("sleep 60")], resources={"cpu_cores": 1}) for _ in range(2)]
    for blocker in blockers:
        wait_state(server, blocker, "RUNNING")
    waiting = create(server, [sh("echo should-not-run")], resources={"cpu_cores": 1})
    time.sleep(3 * TICK)
    assert get(server, waiting, "MINIMAL")["state"] == "QUEUED"
    requests.post(f"{server.api}/tasks/{waiting}:cancel", timeout=10)
    task = wait_state(server, waiting, TERMINAL, timeout=60)
    assert task["state"] == "CANCELED"
    assert not any(e.get("stdout") for log in task.get("logs", []) for e in log.get("logs", []))
    for blocker in blockers:
        requests.post(f"{server.api}/tasks/{blocker}:cancel", timeout=10)
    for blocker in blockers:
        wait_state(server, blocker, TERMINAL, timeout=60)


def kill_job_behind_the_gateways_back(backend: str, task: dict, work_dir: Path) -> None:
    job_id = task["logs"][0]["metadata"]["job_id"]
    if backend == "slurm":
        subprocess.run(["scancel", job_id], check=True)
        return
    import json
    pid = json.loads((work_dir / task["id"] / "local.pid").read_text())["pid"]
    os.killpg(pid, signal.SIGKILL)


def test_job_killed_outside_is_system_error(server, backend):
    task_id = create(server, [sh("sleep 120")])
    task = wait_state(server, task_id, "RUNNING")
    time.sleep(0.5)
    killed_at = time.monotonic()
    kill_job_behind_the_gateways_back(backend, task, server.work_dir)
    task = wait_state(server, task_id, TERMINAL, timeout=30)
    assert task["state"] == "SYSTEM_ERROR"
    assert time.monotonic() - killed_at < 2 * TICK + 5  # within two ticks, plus scheduler lag
    assert any("did not record an end" in line or "stopped outside the gateway" in line
               for line in task["logs"][0]["system_logs"]), task["logs"][0]["system_logs"]


def test_server_kill9_restart_loses_nothing_submits_nothing_twice(backend, databases, tmp_path):
    work = tmp_path / "restart"
    db_url = databases.new("sqlite")
    srv = make_server(backend, work, db_url).start()
    expected = {}
    try:
        for i in range(50):
            if i % 10 == 9:
                expected[create(srv, [sh(f"exit {i % 5 + 1}")])] = "EXECUTOR_ERROR"
            else:
                expected[create(srv, [sh(f"sleep 1; echo task-{i}")])] = "COMPLETE"
        time.sleep(2)  # some submitted, some running, some done
        srv.kill()
        time.sleep(1)
        srv = make_server(backend, work, db_url)
        srv.start()
        deadline = time.monotonic() + 240
        states = {}
        while time.monotonic() < deadline:
            states = {t["id"]: t["state"] for t in requests.get(
                srv.api + "/tasks", params={"page_size": 100}, timeout=10).json()["tasks"]}
            if all(s in TERMINAL for s in states.values()) and len(states) == 50:
                break
            time.sleep(1)
        assert states == expected, {k: (states.get(k), v) for k, v in expected.items()
                                     if states.get(k) != v}
        for task_id in expected:
            starts = [e for e in iter_events(work / task_id / "events.jsonl")
                      if e["type"] == "task_start"]
            assert len(starts) == 1, f"task {task_id} ran {len(starts)} times"
            assert not list((work / task_id).glob("events.jsonl.attempt*"))
    finally:
        srv.stop()
