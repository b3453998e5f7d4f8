"""Issue 16, finding 4: what the gateway and the worker keep (the database, the work dir,
task files, event logs) is private whatever the umask: directories 700, files 600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import requests

from tests.server_helpers import ServerProcess
from tests.waiting import wait_for_state


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_state_is_private_under_umask_022(tmp_path):
    old = os.umask(0o022)  # the server inherits it, as from a login shell
    try:
        server = ServerProcess(tmp_path / "work", "", reconcile=True, overrides={
            "reconciler": {"interval_seconds": 0.2}}).start()
    finally:
        os.umask(old)
    try:
        task = {"executors": [{"image": "busybox", "command": ["sh", "-c", "echo $SECRET"],
                               "env": {"SECRET": "bobs-secret"}}]}
        task_id = requests.post(server.api + "/tasks", json=task, timeout=10).json()["id"]
        wait_for_state(server.api, task_id, "COMPLETE", timeout=120, detail=server.log)
    finally:
        server.stop()
    work = server.work_dir
    assert mode(work) == 0o700
    db_files = [work / name for name in ("funnel.db", "funnel.db-wal", "funnel.db-shm")]
    assert db_files[0].exists()
    for path in db_files:
        if path.exists():
            assert mode(path) == 0o600, path
    task_dir = work / task_id
    assert mode(task_dir) == 0o700
    for name in ("task.json", "events.jsonl"):
        assert mode(task_dir / name) == 0o600, name
