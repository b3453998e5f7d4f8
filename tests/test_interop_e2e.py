"""Issue 30 end to end: a real server with auth on (a real local user), its reconciler,
the local backend and a real worker in bwrap over the test registry's busybox. A CWL-like
task with a later-TES field: a missing command reads 127 through the API, the empty
directories of its DIRECTORY output arrive in the user's own directory (made as that
user), and the ignored field is in the Warning header and the system logs."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests
from werkzeug.security import generate_password_hash

from tests.server_helpers import ServerProcess
from tests.waiting import wait_for_state
from tests.worker.conftest import need

pytestmark = [pytest.mark.registry,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a user")]
TERMINAL = ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED")
MAKE_TREE = "mkdir -p /work/out/a/b /work/out/c && echo x > /work/out/c/f"


@pytest.fixture
def user_dir():
    """A real local user and a 700 directory of theirs under a 755 one in /tmp."""
    name = f"fhi{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", name], check=True)
    shared = Path(tempfile.mkdtemp(prefix="interop-", dir="/tmp"))
    shared.chmod(0o755)
    (shared / name).mkdir(mode=0o700)
    shutil.chown(shared / name, name, name)
    yield name, shared
    shutil.rmtree(shared)
    subprocess.run(["userdel", name], check=True)


def test_a_cwl_like_task_through_server_and_worker(databases, tmp_path, user_dir):
    need("bwrap")
    user, shared = user_dir
    auth = (user, "pw")
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite"), reconcile=True, overrides={
        "auth": {"mode": "basic", "users": {user: generate_password_hash("pw")}},
        "reconciler": {"interval_seconds": 0.3},
        "worker": {"container_driver": "bwrap", "allowed_dirs": [str(shared) + "/{user}"]}
    }).start()
    out = shared / user / "out"
    try:
        resp = requests.post(server.api + "/tasks", auth=auth, timeout=30, json={
            "name": "cwl-like", "x_cwl_step": "mkdirs",
            "outputs": [{"path": "/work/out", "url": f"file://{out}", "type": "DIRECTORY"}],
            "executors": [{"image": "busybox", "command": ["no-such-tool"],
                           "ignore_error": True},
                          {"image": "busybox", "command": ["sh", "-c", MAKE_TREE]}]})
        assert resp.status_code == 200, resp.text
        assert resp.headers["Warning"] == '299 - "unknown fields ignored: x_cwl_step"'
        task = wait_for_state(server.api, resp.json()["id"], TERMINAL, 180, auth=auth,
                              detail=lambda: server.log()[-3000:])
    finally:
        server.stop()
    assert task["state"] == "COMPLETE", task.get("logs")
    first, second = task["logs"][-1]["logs"]
    assert first["exit_code"] == 127 and "no-such-tool" in first["stderr"]
    assert second["exit_code"] == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["a", "a/b", "c", "c/f"]
    assert (out / "a" / "b").stat().st_uid == int(subprocess.run(
        ["id", "-u", user], capture_output=True, text=True, check=True).stdout)
    system_logs = [line for attempt in task["logs"] for line in attempt["system_logs"]]
    assert "unknown fields ignored: x_cwl_step" in system_logs
