"""The tes backend (issue #28, item 4) against a real remote TES: a second funnel-hpc server
(its own process, work dir, SQLite database and auth; the local backend running busybox
through bwrap from the test registry) behind a real forwarding gateway (its own process
and database, backend `tes`, a bearer token from a file). Hostile remote answers, which no
real server gives, come from a small HTTP server in this process (tests/tes_helpers.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests

from tests.components import BWRAP, BWRAP_REASON, bwrap_ready, needs
from tests.e2e_helpers import sh
from tests.server_helpers import ServerProcess
from tests.tes_helpers import (
    AUTH,
    REMOTE_AUTH,
    forwarder,
    get,
    remote_id,
    remote_server,
    remote_tasks,
    submit,
    token_file,
    wait_remote_state,
    wait_state,
)
from tests.worker_helpers import need_registry

pytestmark = [needs(BWRAP, bwrap_ready(), BWRAP_REASON), pytest.mark.registry]


@pytest.fixture(scope="module")
def remote(databases, tmp_path_factory):
    need_registry()
    work = tmp_path_factory.mktemp("tes-remote")
    server = remote_server(work, databases.new("sqlite")).start()
    yield server
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def gateway(remote, databases, tmp_path_factory):
    work = tmp_path_factory.mktemp("tes-forwarder")
    token = token_file(tmp_path_factory.mktemp("tes-secrets"))
    server = forwarder(work, databases.new("sqlite"), remote.url, token).start()
    yield server
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


def test_complete_task_with_its_logs_and_outputs(gateway: ServerProcess, remote: ServerProcess):
    task_id = submit(gateway, {"name": "fwd", "tags": {"project": "x"}, "executors": [
        sh("echo hello from the remote; echo warn >&2"), sh("echo second")]})
    task = wait_state(gateway, task_id, {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"},
                      also=remote)
    assert task["state"] == "COMPLETE", task
    attempt = task["logs"][-1]
    assert attempt["logs"][0]["stdout"] == "hello from the remote\n"
    assert attempt["logs"][0]["stderr"] == "warn\n"
    assert attempt["logs"][0]["exit_code"] == 0
    assert attempt["logs"][1]["stdout"] == "second\n"
    assert attempt["start_time"] and attempt["end_time"]
    job = remote_id(task)
    assert attempt["metadata"]["remote_id"] == job
    assert attempt["metadata"]["remote_url"] == remote.url
    there = requests.get(f"{remote.api}/tasks/{job}", params={"view": "FULL"},
                         auth=REMOTE_AUTH, timeout=30).json()
    assert there["state"] == "COMPLETE"
    assert there["tags"]["project"] == "x"
    assert there["tags"]["funnel-hpc-task-id"] == task_id
    assert there["name"] == "fwd"
    assert "id" not in there["tags"]


def test_executor_error_keeps_the_exit_code(gateway: ServerProcess, remote: ServerProcess):
    task_id = submit(gateway, {"executors": [sh("echo failing; exit 3")]})
    task = wait_state(gateway, task_id, {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"},
                      also=remote)
    assert task["state"] == "EXECUTOR_ERROR", task
    assert task["logs"][-1]["logs"][0]["exit_code"] == 3
    assert task["logs"][-1]["logs"][0]["stdout"] == "failing\n"


def test_file_urls_are_refused_at_post(gateway: ServerProcess):
    for task, field in (
            ({"inputs": [{"url": "file:///etc/passwd", "path": "/in/x"}]}, "inputs.0.url"),
            ({"outputs": [{"url": "/tmp/out", "path": "/out/x"}]}, "outputs.0.url")):
        resp = requests.post(gateway.api + "/tasks", auth=AUTH, timeout=30,
                             json={"executors": [sh("true")], **task})
        assert resp.status_code == 400, resp.text
        assert f"{field}: file:// URLs cannot reach the remote TES server" in resp.text
    # an input given by its content reaches the remote with the task
    task_id = submit(gateway, {"inputs": [{"content": "inline\n", "path": "/in/x"}],
                               "executors": [sh("cat /in/x")]})
    task = wait_state(gateway, task_id, {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"})
    assert task["state"] == "COMPLETE", task
    assert task["logs"][-1]["logs"][0]["stdout"] == "inline\n"


def test_remote_tasks_are_tagged_for_this_gateway(gateway: ServerProcess, remote: ServerProcess):
    task_id = submit(gateway, {"executors": [sh("true")]})
    task = wait_state(gateway, task_id, {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"})
    tag = (Path(gateway.work_dir) / "tes-gateway-id").read_text().strip()
    mine = remote_tasks(remote, tag_key="funnel-hpc-gateway", tag_value=tag)
    assert remote_id(task) in {t["id"] for t in mine}
