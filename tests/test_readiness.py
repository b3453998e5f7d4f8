"""/readyz means "this replica can serve": real servers whose database is made
unreadable (SQLite file replaced), write-locked, or stopped (a private PostgreSQL);
every 503 carries Retry-After, the dashboard shows an outage page, an outage is logged
once per interval, and a `funnel task create` started during a 30 s database restart
succeeds once it is back, creating exactly one task."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time

import pytest
import requests

from tests.components import need
from tests.ops_helpers import ReconcileProcess
from tests.postgres_helpers import PrivatePostgres, available
from tests.server_helpers import ServerProcess, clean_env, free_port, funnel_argv
from tests.waiting import wait_for

TASK = {"name": "ready", "executors": [{"image": "busybox", "command": ["true"]}]}
ALONE = {"server": {"readyz_needs_reconciler": False}}  # these servers run no reconciler


def readyz(server: ServerProcess) -> requests.Response:
    return requests.get(server.url + "/readyz", timeout=30)


def readyz_becomes(server: ServerProcess, status: int) -> requests.Response:
    """/readyz once it answers status (it checks at most once a second)."""
    # a list: a Response is falsy when its status is an error
    found: list[requests.Response] = wait_for(
        lambda: [resp] if (resp := readyz(server)).status_code == status else None, 30,
        f"/readyz {status}", detail=server.log)
    return found[0]


def test_readyz_503_when_the_sqlite_file_is_gone_or_unreadable_then_200(tmp_path):
    """The pool's open connections go on reading a file moved away (or made unreadable:
    root, as here, reads any file, so the test moves it): /readyz opens it afresh."""
    server = ServerProcess(tmp_path / "srv", "", overrides=ALONE).start()
    database = server.work_dir / "funnel.db"
    kept = server.work_dir / "funnel.db.kept"
    try:
        assert readyz(server).status_code == 200
        os.rename(database, kept)
        down = readyz_becomes(server, 503)
        assert down.headers["Retry-After"] == "5"
        assert down.json()["checks"]["database"] == "unavailable"
        os.replace(kept, database)
        readyz_becomes(server, 200)
    finally:
        server.stop()


def test_readyz_503_while_another_process_holds_the_write_lock(tmp_path):
    server = ServerProcess(tmp_path / "srv", "", overrides=ALONE).start()
    try:
        holder = sqlite3.connect(server.work_dir / "funnel.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            down = readyz_becomes(server, 503)
            assert down.headers["Retry-After"] == "5"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        readyz_becomes(server, 200)
    finally:
        server.stop()


def test_readyz_reports_the_in_process_reconciler(tmp_path):
    server = ServerProcess(tmp_path / "srv", "", reconcile=True).start()
    try:
        ready = readyz_becomes(server, 200)
        assert ready.json()["checks"] == {"database": "ok", "backend": "ok",
                                          "reconciler": "ok"}
    finally:
        server.stop()


@pytest.fixture
def postgres():
    need("PostgreSQL binaries", available(), "scripts/setup/20-postgres.sh installs them")
    server = PrivatePostgres.create()
    yield server
    server.destroy()


@pytest.mark.postgres
def test_postgres_outage_503s_dashboard_page_and_one_log_line(postgres, tmp_path):
    server = ServerProcess(tmp_path / "srv", postgres.url, overrides=ALONE).start()
    try:
        assert requests.post(server.api + "/tasks", json=TASK, timeout=10).status_code == 200
        postgres.stop()
        for _ in range(10):
            api = requests.get(server.api + "/tasks", timeout=30)
            assert api.status_code == 503, api.text
            assert api.headers["Retry-After"] == "5"
        page = requests.get(server.url + "/", timeout=30)
        assert page.status_code == 503, page.text[:300]
        assert "Database unavailable, retrying" in page.text
        assert page.headers["Retry-After"] == "5"
        outage = [line for line in server.log().splitlines() if "database unavailable" in line]
        assert 1 <= len(outage) <= 3, outage  # once per interval (+ /readyz's, /metrics')
        assert "Traceback" not in server.log()
        postgres.start()
        readyz_becomes(server, 200)
    finally:
        server.stop()


@pytest.mark.postgres
def test_task_create_outlasts_a_30s_database_restart(postgres, tmp_path):
    """One replica with its reconciler: the restart costs the user nothing and the log a
    few lines (the issue measured about 1,000 with 7 tracebacks in 30 s)."""
    server = ServerProcess(tmp_path / "srv", postgres.url, reconcile=True,
                           overrides={"reconciler": {"interval_seconds": 1}}).start()
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(TASK))
    try:
        readyz_becomes(server, 200)
        before = len(server.log().splitlines())
        postgres.stop()
        stopped = time.monotonic()
        create = subprocess.Popen(funnel_argv("task", "create", str(task_file)),
                                  env=clean_env(FUNNEL_SERVER=server.url),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # the outage lasts 30 s (the scenario, not a wait for something)
            wait_for(lambda: time.monotonic() - stopped >= 30, 40, "a 30 s outage",
                     interval=1)
            assert create.poll() is None, create.communicate()
            outage = server.log().splitlines()[before:]
            postgres.start()
            out, err = create.communicate(timeout=120)
        finally:
            if create.poll() is None:
                create.kill()
        assert create.returncode == 0, err
        assert "retrying for up to 120 s" in err
        records = [line for line in outage if re.match(r"\d{4}-\d\d-\d\dT", line)]
        assert len(records) <= 10, "\n".join(outage)
        assert not any("Traceback" in line for line in outage), "\n".join(outage)
        task_id = out.strip()
        listed = requests.get(server.api + "/tasks", timeout=30).json()["tasks"]
        assert [task["id"] for task in listed] == [task_id]
    finally:
        server.stop()


def test_a_reconciler_that_holds_its_lock_but_hangs_is_not_ready(databases, tmp_path):
    """SQLite's reconciler lock is held while its process lives: a stopped (SIGSTOP)
    reconciler keeps it, and only its missing ticks tell (server.readyz_tick_intervals)."""
    listen = free_port()
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite"), overrides={
        "reconciler": {"interval_seconds": 0.5, "listen": f"127.0.0.1:{listen}"},
        "server": {"readyz_tick_intervals": 2}}).start()
    reconcile = ReconcileProcess(server, port=listen)
    try:
        assert readyz(server).json()["checks"]["reconciler"] == "none"
        reconcile.start()
        readyz_becomes(server, 200)
        assert reconcile.proc is not None
        os.kill(reconcile.proc.pid, signal.SIGSTOP)
        try:
            # no tick for 15 s (the floor over 2 x 0.5 s): stalled, though the lock is held
            found: list[requests.Response] = wait_for(
                lambda: [resp] if (resp := readyz(server)).status_code == 503 else None, 60,
                "/readyz 503 for a hung reconciler", detail=server.log)
            assert found[0].json()["checks"]["reconciler"] == "stalled"
            assert found[0].headers["Retry-After"] == "5"
        finally:
            os.kill(reconcile.proc.pid, signal.SIGCONT)
        assert readyz_becomes(server, 200).json()["checks"]["reconciler"] == "ok"
    finally:
        reconcile.stop()
        server.stop()
