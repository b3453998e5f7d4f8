"""Faults, bounded in time: scheduler daemon down, database locked or cut off, disk full.

(The gateway killed with -9 and a worker killed are in test_e2e.py and test_reconciler.py.)
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time

import pytest
import requests
from sqlalchemy import create_engine, func, select

from funnel_hpc.gateway import db
from tests.conftest import ServerProcess
from tests.test_e2e import TERMINAL, create, make_server, sh, slurm_ready, wait_state

TASK = {"executors": [{"image": "busybox", "command": ["true"]}]}


def rows(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(db.tasks)).scalar_one()
    finally:
        engine.dispose()


@pytest.mark.slurm
@pytest.mark.skipif(not slurm_ready() and not os.environ.get("CI"), reason="Slurm not running")
def test_slurmctld_down_for_60s_fails_nothing(databases, tmp_path):
    server = make_server("slurm", tmp_path / "srv", databases.new("sqlite")).start()
    try:
        running = [create(server, [sh("sleep 20; echo survived")]) for _ in range(2)]
        for task_id in running:
            wait_state(server, task_id, "RUNNING", timeout=60)
        subprocess.run(["pkill", "-x", "slurmctld"], check=True)
        time.sleep(1)
        during = create(server, [sh("echo submitted-during-outage")])
        time.sleep(60)
        states = {t: requests.get(f"{server.api}/tasks/{t}", timeout=10).json()["state"]
                  for t in running + [during]}
        assert "SYSTEM_ERROR" not in states.values(), states
        assert states[during] == "QUEUED"  # sbatch could not reach slurmctld: kept, not failed
        subprocess.run(["slurmctld"], check=True)
        for task_id in running + [during]:
            task = wait_state(server, task_id, TERMINAL, timeout=120)
            assert task["state"] == "COMPLETE", task
        assert "survived" in wait_state(server, running[0], TERMINAL)["logs"][0]["logs"][0]["stdout"]
    finally:
        if subprocess.run(["pgrep", "-x", "slurmctld"]).returncode != 0:
            subprocess.run(["slurmctld"])
        server.stop()


def test_sqlite_locked_gives_503_and_writes_nothing(databases, tmp_path):
    url = databases.new("sqlite")
    server = ServerProcess(tmp_path / "srv", url,
                           overrides={"database": {"sqlite_busy_timeout": 1}}).start()
    try:
        assert requests.post(server.api + "/tasks", json=TASK, timeout=10).ok
        before = rows(url)
        holder = sqlite3.connect(url.split("///", 1)[1], isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            resp = requests.post(server.api + "/tasks", json=TASK, timeout=30)
            assert resp.status_code == 503, resp.text
            assert "retry" in resp.json()["message"]
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert rows(url) == before
        assert requests.post(server.api + "/tasks", json=TASK, timeout=10).ok
        assert rows(url) == before + 1
    finally:
        server.stop()


def test_postgres_connections_dropped(db_kind, databases, tmp_path):
    if db_kind != "postgres":
        pytest.skip("PostgreSQL only")
    url = databases.new("postgres")
    server = ServerProcess(tmp_path / "srv", url).start()
    try:
        for _ in range(3):
            assert requests.post(server.api + "/tasks", json=TASK, timeout=10).ok
        before = rows(url)
        import psycopg

        name = url.rsplit("/", 1)[1]
        admin = url.rsplit("/", 1)[0].replace("+psycopg", "") + "/funnel"
        with psycopg.connect(admin, autocommit=True) as conn:
            killed = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                  "WHERE datname = %s AND pid <> pg_backend_pid()",
                                  (name,)).fetchone()[0]
        assert killed >= 1
        codes = [requests.post(server.api + "/tasks", json=TASK, timeout=30).status_code
                 for _ in range(5)]
        assert set(codes) <= {200, 503}, codes   # never a 500, never a hang
        assert codes[-1] == 200
        assert rows(url) == before + codes.count(200)  # each 200 stored once, each 503 nothing
        listed = requests.get(server.api + "/tasks", params={"page_size": 100}, timeout=10)
        assert listed.ok and len(listed.json()["tasks"]) == rows(url)
    finally:
        server.stop()


def test_disk_full_in_the_work_dir_is_system_error(tmp_path):
    from tests.worker.conftest import ROOTFS, WorkerHarness

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        harness = WorkerHarness(tmp_path)
        harness.workdir = mount  # task dirs on the 1 MiB file system
        assert (ROOTFS / "busybox").exists()
        run = harness.run(harness.task(
            inputs=[{"path": "/in/big.txt", "content": "x" * (2 * 1024 * 1024)}],
            executors=[sh("echo never")]))
        assert run.state == "SYSTEM_ERROR", run.stderr
        assert "No space left on device" in run.system_logs
        assert run.fold.task_log["logs"] == []
    finally:
        subprocess.run(["umount", "-l", str(mount)])
