"""Live logs through the real server on the local backend (issue 18.1): a running task's
stdout shows in the FULL view and the dashboard while the executor still runs, and
`funnel task logs --follow` prints every line once and ends with the task.

Each task prints, then waits for a file the test writes into its volume, so nothing here
depends on how fast the machine is: the test waits for conditions, with generous limits.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module")
def server(databases, tmp_path_factory):
    srv = live_logs_server(tmp_path_factory.mktemp("live-logs"), databases.new("sqlite"),
                           {"name": "local", "local": {"max_concurrent": 2}}, 0.5)
    yield srv
    srv.stop()


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


def test_a_running_task_shows_its_line_before_it_ends(server):
    task_id = create(server, f"echo first line; {WAIT_FOR_GO}; echo done")
    try:
        # log_update_seconds + the reconciler's tick + a busy machine: generous, and
        # the task cannot end before the test releases it
        wait_for(lambda: running_stdout(server, task_id) == "first line\n", 60,
                 "the first line in the FULL view", detail=lambda: server.log()[-2000:])
        task = requests.get(f"{server.api}/tasks/{task_id}", params={"view": "FULL"},
                            timeout=10).json()
        assert task["state"] == "RUNNING"
        # the fragment the dashboard's task page swaps in every 2 s
        page = requests.get(f"{server.url}/tasks/{task_id}", params={"fragment": 1},
                            timeout=10)
        assert page.status_code == 200
        assert "first line" in page.text and 'class="running"' in page.text, page.text
        assert grpc_stdout(server, task_id) == "first line\n"  # the same fold, over gRPC
    finally:
        release(server, task_id)
    done = wait_for_state(server.api, task_id, TERMINAL, 90)
    assert done["state"] == "COMPLETE"
    assert done["logs"][0]["logs"][0]["stdout"] == "first line\ndone\n"


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


def test_task_logs_follow_prints_each_line_once_and_ends_with_the_task(server):
    task_id = follow_five_lines(server, 60, 120)
    stderr = subprocess.run(funnel_argv("task", "logs", task_id, "--stderr", "--server",
                                        server.url), env=clean_env(), capture_output=True,
                            text=True, timeout=60)
    assert stderr.returncode == 0 and stderr.stdout == "oops\n", stderr.stderr


def test_follower_prints_only_what_each_tail_adds(capsys):
    from funnel_hpc.gateway.cli_task import LogFollower

    follower = LogFollower("stdout")
    for tail in ["a\n", "a\nb\n", "a\nb\n", "b\nc\n", "c\nc\n"]:  # a window sliding on
        follower.show({"logs": [{"logs": [{"stdout": tail}]}]})
    # a second attempt runs its executors again: printed, not taken for old text
    follower.show({"logs": [{}, {"logs": [{"stdout": "a\n"}]}]})
    assert capsys.readouterr().out == "a\nb\nc\nc\na\n"
