"""Live logs' shared pieces (tests/test_live_logs_e2e.py on the local backend,
tests/test_live_logs_slurm.py on Slurm): a server whose workers send live logs every
UPDATE_SECONDS, tasks that wait for the test's go file, and the five-line follow check."""

from __future__ import annotations

import subprocess
from pathlib import Path

import requests

from tests.server_helpers import ServerProcess, clean_env, funnel_argv
from tests.waiting import wait_for, wait_for_state

UPDATE_SECONDS = 1
TERMINAL = {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED"}
WAIT_FOR_GO = "while [ ! -e /data/go ]; do sleep 0.1; done"


def live_logs_server(work: Path, db_url: str, backend: dict, tick: float) -> ServerProcess:
    """A server with its reconciler whose workers send live logs every UPDATE_SECONDS."""
    return ServerProcess(work, db_url, overrides={
        "backend": backend, "reconciler": {"interval_seconds": tick},
        "worker": {"container_driver": "bwrap", "poll_server_seconds": 1,
                   "log_update_seconds": UPDATE_SECONDS}}, reconcile=True).start()


def create(server: ServerProcess, script: str) -> str:
    resp = requests.post(server.api + "/tasks", timeout=10, json={
        "volumes": ["/data"],
        "executors": [{"image": "busybox", "command": ["sh", "-c", script]}]})
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def release(server: ServerProcess, task_id: str) -> None:
    """Let the task's executor go on past WAIT_FOR_GO (a no-op once the task ended and
    keep_workdir removed its files)."""
    data = Path(server.work_dir) / task_id / "files" / "data"
    if data.is_dir():
        (data / "go").write_text("")


def running_stdout(server: ServerProcess, task_id: str) -> str:
    task = requests.get(f"{server.api}/tasks/{task_id}", params={"view": "FULL"},
                        timeout=10).json()
    logs = task.get("logs") or [{}]
    executors = logs[-1].get("logs") or [{}]
    return executors[0].get("stdout") or ""


def grpc_stdout(server: ServerProcess, task_id: str) -> str:
    import grpc

    from funnel_hpc.proto import tes_pb2, tes_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        task = tes_pb2_grpc.TaskServiceStub(channel).GetTask(
            tes_pb2.GetTaskRequest(id=task_id, view="FULL"), timeout=10)
    return str(task.logs[-1].logs[0].stdout)


def follow_five_lines(server: ServerProcess, first_wait: float, end_wait: float) -> str:
    """A task prints lines 1-3 (and one to stderr), waits for the test, then prints 4 and
    5: `funnel task logs --follow` prints each line once and exits with the task, which
    ends COMPLETE. The task's id."""
    script = ("for i in 1 2 3; do echo line $i; done; echo oops >&2; "
              f"{WAIT_FOR_GO}; for i in 4 5; do echo line $i; done")
    task_id = create(server, script)
    follow = subprocess.Popen(funnel_argv("task", "logs", task_id, "--follow",
                                          "--interval", "0.2", "--server", server.url),
                              env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        wait_for(lambda: "line 3" in running_stdout(server, task_id), first_wait,
                 "the first lines while running", detail=lambda: server.log()[-2000:])
        release(server, task_id)
        out, err = follow.communicate(timeout=end_wait)
    finally:
        release(server, task_id)
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
    assert follow.returncode == 0, err
    assert out == "".join(f"line {i}\n" for i in range(1, 6))
    assert wait_for_state(server.api, task_id, TERMINAL, end_wait)["state"] == "COMPLETE"
    return task_id
