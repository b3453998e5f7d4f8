"""Through the real server on the local backend: worker.keep_workdir (issue 18.3), types
filled in for untyped inputs and outputs (17.5), and paths directly under / (17.2)."""

from __future__ import annotations

import pytest
import requests

from tests.server_helpers import ServerProcess
from tests.waiting import wait_for_state

TERMINAL = {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def start(work, db_url: str, data, keep: str) -> ServerProcess:
    return ServerProcess(work, db_url, reconcile=True, overrides={
        "backend": {"name": "local", "local": {"max_concurrent": 2}},
        "reconciler": {"interval_seconds": 0.5},
        "worker": {"container_driver": "bwrap", "poll_server_seconds": 1,
                   "allowed_dirs": [str(data)], "keep_workdir": keep}}).start()


@pytest.fixture(scope="module")
def never(databases, tmp_path_factory, data):
    srv = start(tmp_path_factory.mktemp("never"), databases.new("sqlite"), data, "never")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def on_failure(databases, tmp_path_factory, data):
    srv = start(tmp_path_factory.mktemp("on-failure"), databases.new("sqlite"), data,
                "on_failure")
    yield srv
    srv.stop()


def run(server: ServerProcess, **task) -> dict:
    resp = requests.post(server.api + "/tasks", json=task, timeout=10)
    assert resp.status_code == 200, resp.text
    return wait_for_state(server.api, resp.json()["id"], TERMINAL, 120,
                          detail=lambda: server.log()[-2000:])


def sh(script: str) -> dict:
    return {"image": "busybox", "command": ["sh", "-c", script]}


def test_never_leaves_no_data_dir_after_complete(never, data):
    task = run(never, inputs=[{"path": "/in/a.txt", "content": "a"}],
               outputs=[{"path": "/out/d", "url": f"file://{data}/never-d"}],
               executors=[sh("mkdir /out/d; cp /in/a.txt /out/d/")])
    assert task["state"] == "COMPLETE", task
    task_dir = never.work_dir / task["id"]
    assert not (task_dir / "files").exists()
    assert (task_dir / "events.jsonl").is_file()  # what the gateway reads stays
    assert (data / "never-d" / "a.txt").read_text() == "a"
    # 17.5: the untyped output was a directory, and GET says so
    assert task["outputs"][0]["type"] == "DIRECTORY"
    assert task["inputs"][0]["type"] == "FILE"


def test_on_failure_keeps_the_dir_after_executor_error(on_failure):
    task = run(on_failure, volumes=["/work"], executors=[sh("echo kept > /work/f; exit 2")])
    assert task["state"] == "EXECUTOR_ERROR"
    assert (on_failure.work_dir / task["id"] / "files" / "work" / "f").read_text() == "kept\n"


def test_files_directly_under_root_work(never, data):
    task = run(never, inputs=[{"path": "/in.txt", "content": "top\n"}],
               outputs=[{"path": "/out.txt", "url": f"file://{data}/top-out.txt"}],
               executors=[sh("cat /in.txt > /out.txt")])
    assert task["state"] == "COMPLETE", task["logs"][-1]["system_logs"]
    assert (data / "top-out.txt").read_text() == "top\n"


@pytest.mark.parametrize("field", [
    {"volumes": ["/"]},
    {"volumes": ["//"]},
    {"inputs": [{"path": "/", "content": "x"}]},
    {"outputs": [{"path": "/*.txt", "path_prefix": "/", "url": "file:///tmp/x"}]},
])
def test_binding_the_root_is_a_400_naming_the_field(never, field):
    resp = requests.post(never.api + "/tasks", timeout=10,
                         json={"executors": [sh("true")], **field})
    assert resp.status_code == 400, resp.text
    assert "root directory" in resp.text
