"""`funnel admin purge` and `funnel admin du` through the real CLI, on a real server's
database (SQLite and PostgreSQL) and work dir."""

from __future__ import annotations

import json
import time

import pytest
import requests
from sqlalchemy import create_engine, func, select, update

from funnel_hpc.core.events import rfc3339
from funnel_hpc.gateway.store import db
from funnel_hpc.gateway.store.retention import parse_age
from tests.cli_helpers import create, funnel
from tests.server_helpers import ServerProcess

DAY = 86400


@pytest.fixture
def server(db_kind, databases, tmp_path):
    srv = ServerProcess(tmp_path / "srv", databases.new(db_kind)).start()
    yield srv
    srv.stop()


def set_row(url: str, task_id: str, **values) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(update(db.tasks).where(db.tasks.c.id == task_id).values(**values))
    finally:
        engine.dispose()


def tag_rows(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(db.task_tags)).scalar_one()
    finally:
        engine.dispose()


def task_dir(server, task_id: str, size: int):
    directory = server.work_dir / task_id
    directory.mkdir()
    (directory / "task.json").write_text("{}")
    (directory / "stdout").write_bytes(b"x" * size)
    return directory


def test_purge_removes_only_ended_tasks_older_than_the_cutoff(server, tmp_path):
    old = rfc3339(time.time() - 40 * DAY)
    old_canceled, old_complete, new_canceled, old_queued = (
        create(server, tags={"t": str(i)}) for i in range(4))
    funnel(server, "task", "cancel", old_canceled, new_canceled)
    set_row(server.db_url, old_canceled, updated_at=old)
    set_row(server.db_url, old_complete, state="COMPLETE", updated_at=old)
    set_row(server.db_url, old_queued, updated_at=old)  # old, but not ended
    dirs = {task_id: task_dir(server, task_id, 1000) for task_id in
            (old_canceled, old_complete, new_canceled, old_queued)}
    outside = tmp_path / "not-a-task-file"
    outside.write_text("keep me")
    (dirs[old_canceled] / "link").symlink_to(outside)
    orphan = task_dir(server, "deadbeef00", 10)

    du = funnel(None, "admin", "du", "--config", str(server.config_path), "-o", "json")
    assert du.returncode == 0, du.stderr
    usage = json.loads(du.stdout)["usage"]
    assert usage["CANCELED"]["tasks"] == 2 and usage["CANCELED"]["dirs"] == 2
    assert usage["COMPLETE"] == {"tasks": 1, "dirs": 1, "bytes": 1002}
    assert usage["QUEUED"]["tasks"] == 1 and usage["QUEUED"]["dirs"] == 1
    assert usage["orphaned"] == {"tasks": 0, "dirs": 1, "bytes": 12}
    assert usage["other"]["bytes"] > 0  # server.yaml, the SQLite file, the log...
    table = funnel(None, "admin", "du", "--config", str(server.config_path))
    assert table.stdout.splitlines()[0].split() == ["STATE", "TASKS", "DIRS", "BYTES"]
    assert table.stdout.splitlines()[-1].split()[0] == "total"

    dry = funnel(None, "admin", "purge", "--older-than", "30d", "--dry-run",
                 "--config", str(server.config_path))
    assert dry.returncode == 0, dry.stderr
    assert sorted(dry.stdout.split()) == sorted(
        ["would", "delete", old_canceled, "would", "delete", old_complete])
    assert all(d.exists() for d in dirs.values())
    assert requests.get(f"{server.api}/tasks/{old_canceled}", timeout=10).status_code == 200

    done = funnel(None, "admin", "purge", "--older-than", "30d",
                  "--config", str(server.config_path))
    assert done.returncode == 0, done.stderr
    assert sorted(line.split()[-1] for line in done.stdout.splitlines()) == sorted(
        [old_canceled, old_complete])
    assert "deleted 2 task(s)" in done.stderr and "CANCELED=1, COMPLETE=1" in done.stderr
    for task_id, gone in ((old_canceled, True), (old_complete, True), (new_canceled, False),
                          (old_queued, False)):
        status = requests.get(f"{server.api}/tasks/{task_id}", timeout=10).status_code
        assert status == (404 if gone else 200), task_id
        assert dirs[task_id].exists() is not gone
    assert outside.read_text() == "keep me"  # the link was removed, not followed
    assert orphan.exists() and tag_rows(server.db_url) == 2

    again = funnel(None, "admin", "purge", "--older-than", "30d",
                   "--config", str(server.config_path))
    assert again.returncode == 0 and again.stdout == "" and "deleted 0 task(s)" in again.stderr
    # a shorter age reaches the recently canceled task, never the QUEUED one
    now = funnel(None, "admin", "purge", "--older-than", "0s",
                 "--config", str(server.config_path))
    assert now.stdout.split() == ["deleted", new_canceled]
    assert requests.get(f"{server.api}/tasks/{old_queued}", timeout=10).status_code == 200


@pytest.mark.parametrize("age", ["30", "d30", "30 days", "-1d", ""])
def test_purge_refuses_a_bad_age_in_one_line(age, tmp_path):
    done = funnel(None, "admin", "purge", "--older-than", age)
    assert done.returncode == 1 and "--older-than" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_age_units():
    assert [parse_age(a) for a in ("45s", "90m", "12h", "30d", "2w")] == [
        45, 5400, 43200, 30 * DAY, 14 * DAY]
