"""Faults, bounded in time: scheduler daemon down, database locked or cut off, disk full.

(The gateway killed with -9 and a worker killed are in test_e2e.py and test_reconciler.py.)
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, func, select

from funnel_hpc.backends import arrays
from funnel_hpc.backends.slurm import SlurmBackend
from funnel_hpc.core import config as config_mod
from funnel_hpc.core.events import iter_events
from funnel_hpc.gateway.reconcile.reconciler import Reconciler
from funnel_hpc.gateway.store import db
from funnel_hpc.gateway.web.app import make_service
from tests.components import (
    BWRAP,
    BWRAP_REASON,
    GRIDENGINE,
    GRIDENGINE_REASON,
    SLURM,
    SLURM_REASON,
    bwrap_ready,
    gridengine_ready,
    need,
    needs,
    slurm_ready,
)
from tests.e2e_helpers import TERMINAL, create, make_server, sh, wait_state
from tests.instances_helpers import gateway, rule, stored_instance, submit, wait_done, worker_starts
from tests.server_helpers import ServerProcess

TASK = {"executors": [{"image": "busybox", "command": ["true"]}]}


def rows(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(db.tasks)).scalar_one()
    finally:
        engine.dispose()


@pytest.mark.slurm
@needs(SLURM, slurm_ready(), SLURM_REASON)
def test_slurmctld_down_for_60s_fails_nothing(databases, tmp_path):
    server = make_server("slurm", tmp_path / "srv", databases.new("sqlite")).start()
    try:
        running = [create(server, [sh("sleep 20; echo survived")]) for _ in range(2)]
        for task_id in running:
            wait_state(server, task_id, "RUNNING", timeout=180)
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
        survivor = wait_state(server, running[0], TERMINAL)
        assert "survived" in survivor["logs"][0]["logs"][0]["stdout"]
    finally:
        if subprocess.run(["pgrep", "-x", "slurmctld"]).returncode != 0:
            subprocess.run(["slurmctld"])
        server.stop()


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)


def slurmctld_running() -> bool:
    return subprocess.run(["pgrep", "-x", "slurmctld"], stdout=subprocess.DEVNULL).returncode == 0


def stop_slurmctld() -> None:
    """Stop the one slurmctld (by its pid) and wait until it is gone."""
    found = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, text=True)
    for pid in found.stdout.split():
        os.kill(int(pid), signal.SIGTERM)
    wait_until(lambda: not slurmctld_running(), 60, "slurmctld stopped")


def start_slurmctld() -> None:
    """Start slurmctld if it is not running, and wait until it answers."""
    if not slurmctld_running():
        subprocess.run(["slurmctld"], check=True)
    wait_until(slurm_ready, 120, "slurmctld answering sinfo")


def slurm_jobs_named(name: str) -> list[str]:
    """Every job Slurm still lists by that name (finished ones too, for MinJobAge)."""
    listed = subprocess.run(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"],
                            capture_output=True, text=True, check=True)
    return listed.stdout.split()


def jobs_of(work_dir: Path, task_id: str) -> list[str]:
    """The task's jobs Slurm lists: its element of each array named after the gateway's
    task list holding it, and its jobs named funnel-<id>."""
    jobs = slurm_jobs_named(f"funnel-{task_id}")
    listed = arrays.find(work_dir, task_id)
    if listed is not None:
        done = subprocess.run(["squeue", "-h", "-t", "all", "-n", listed[0].job_name, "-o",
                               "%F"], capture_output=True, text=True, check=True)
        jobs += sorted({f"{job}_{listed[1]}" for job in done.stdout.split()})
    return jobs


@pytest.mark.slurm
@needs(SLURM, slurm_ready(), SLURM_REASON)
def test_restart_during_slurmctld_outage_submits_nothing_twice(databases, tmp_path,
                                                                 monkeypatch):
    """A gateway died after sbatch and before recording the job ids; another starts while
    slurmctld is down. Its recover cannot ask squeue: it must keep the claims (not read
    the failure as "no such job" and submit again), and adopt the jobs once Slurm is back."""
    server = make_server("slurm", tmp_path / "srv", databases.new("sqlite"))
    server.write_config()
    config = config_mod.load(server.config_path, environ={})
    service = make_service(config)
    first = Reconciler(service, SlurmBackend(config.backend.slurm, Path(config.work_dir)), config)
    # dies here
    monkeypatch.setattr(service.reconciler_queries, "record_submissions", lambda jobs: None)
    task_ids = [service.create({"executors": [sh("echo once")]}) for _ in range(3)]
    first.tick()
    # one array of three (backend.slurm.array_max): each task's job is its element
    submitted = {task_id: jobs_of(server.work_dir, task_id) for task_id in task_ids}
    assert all(len(jobs) == 1 for jobs in submitted.values()), submitted
    assert all(service.get_row(task_id).job_id == "" for task_id in task_ids)  # claimed
    try:
        stop_slurmctld()
        server.start()
        wait_until(lambda: server.log().count("Unable to contact slurm controller") >= 3, 120,
                   "the restarted gateway asked Slurm about the claims")
        assert all(service.get_row(task_id).job_id == "" for task_id in task_ids)
        start_slurmctld()
        for task_id in task_ids:
            # how the task ended is the worker's business (COMPLETE when its image is
            # at hand); what is tested is that its one job was adopted, not doubled
            task = wait_state(server, task_id, TERMINAL, timeout=180)
            assert task["logs"][-1]["metadata"]["job_id"] == submitted[task_id][0], task
            assert len(task["logs"]) == 1
            assert jobs_of(server.work_dir, task_id) == submitted[task_id]
            starts = [e for e in iter_events(server.work_dir / task_id / "events.jsonl")
                      if e["type"] == "task_start"]
            assert len(starts) == 1
    finally:
        start_slurmctld()
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
            row = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                               "WHERE datname = %s AND pid <> pg_backend_pid()",
                               (name,)).fetchone()
        assert row is not None
        killed = row[0]
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
    from tests.worker_helpers import ROOTFS, WorkerHarness

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


@pytest.mark.slurm
@needs(SLURM, slurm_ready(), SLURM_REASON)
def test_a_stopped_slurmctld_overflows_to_gridengine(databases, tmp_path):
    """Issue #28's overflow with the real daemon stopped: a task routed to Slurm while
    slurmctld is down never gets a Slurm job (sbatch cannot reach it); once the instance
    has failed reconciler.overflow_after_failed_polls ticks, the task moves to Grid Engine
    and completes there, its worker started once, and Slurm, back up, knows no job of it."""
    need(GRIDENGINE, gridengine_ready(), GRIDENGINE_REASON)
    need(BWRAP, bwrap_ready(), BWRAP_REASON)
    backends = {"cpu": {"kind": "slurm", "command_timeout": 15},
                "ge": {"kind": "gridengine", "mode": "cli"}}
    routing = [rule("cpu", "cpu", overflow=["ge"]), {"backend": "ge"}]
    server = gateway(tmp_path / "srv", databases.new("sqlite"), backends, routing).start()
    try:
        stop_slurmctld()
        task_id = submit(server, "cpu", "echo after-slurm-stopped", list(backends), "cpu")
        task = wait_done(server, task_id, timeout=300)
        assert task["state"] == "COMPLETE", task
        assert [entry["metadata"]["backend"] for entry in task["logs"]][-1] == "ge"
        assert task["logs"][-1]["logs"][0]["stdout"] == "after-slurm-stopped\n"
        lines = [line for entry in task["logs"] for line in entry["system_logs"]]
        assert any("withdrawn from cpu after its scheduler failing for 3 ticks; submitted "
                   "to ge" in line for line in lines), lines
        assert stored_instance(server, task_id) == "ge"
        assert worker_starts(server.work_dir, task_id) == 1
        start_slurmctld()
        assert slurm_jobs_named(f"funnel-{task_id}") == []
    finally:
        start_slurmctld()
        server.stop()
