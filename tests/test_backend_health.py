"""Backend health (gateway/store/backend_health.py): record_poll on SQLite and PostgreSQL, the
0005 migration over an existing 0004 database, the lease as the dashboard reads it, and
that the panel shows signed-in users nothing of anyone's tasks."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess

import pytest
import requests
from prometheus_client import CollectorRegistry
from sqlalchemy import inspect, select, text
from werkzeug.security import generate_password_hash

from funnel_hpc.backends.base import JobState, JobStatus
from funnel_hpc.core import config as config_mod
from funnel_hpc.gateway.ops.metrics import ReconcilerCollector
from funnel_hpc.gateway.store import backend_health, db, leases
from funnel_hpc.gateway.store.backend_health import poll_error, record_poll
from funnel_hpc.gateway.store.leases import DatabaseLease
from funnel_hpc.gateway.store.tasks import TaskService
from tests.components import POSTGRES, POSTGRES_REASON, needs
from tests.server_helpers import ServerProcess, _postgres_reachable

TASK = {"executors": [{"image": "busybox", "command": ["true"]}]}
postgres = needs(POSTGRES, _postgres_reachable(), POSTGRES_REASON)
UNREACHABLE = "squeue failed (1): slurm_load_jobs error: Unable to contact slurm controller"


@pytest.fixture(autouse=True)
def fresh_throttle():
    """Each test starts with no write remembered (record_poll skips a repeat outcome)."""
    backend_health._written.clear()
    backend_health._unwritten_errors.clear()
    yield
    backend_health._written.clear()
    backend_health._unwritten_errors.clear()


def row_of(engine, backend: str):
    with db.reading(engine) as conn:
        return conn.execute(select(backend_health.backend_health)
                            .where(backend_health.backend_health.c.backend == backend)).first()


def settings(url: str, backend: str = "local") -> config_mod.Config:
    return config_mod.load(environ={}, overrides={"database": {"url": url},
                                                  "backend": {"name": backend}})


def test_record_poll_success_failure_recovery(db_kind, databases):
    engine = db.make_engine(databases.new(db_kind))
    db.upgrade(engine)
    record_poll(engine, "slurm", None)
    first = row_of(engine, "slurm")
    assert first.last_poll_at == first.last_ok_at and first.failing_since is None
    assert first.last_error is None and first.reporter.endswith(f":{os.getpid()}")

    record_poll(engine, "slurm", UNREACHABLE)  # a change of outcome is written at once
    failing = row_of(engine, "slurm")
    assert failing.last_error == UNREACHABLE and failing.failing_since == failing.last_error_at
    assert failing.last_ok_at == first.last_ok_at and failing.last_poll_at >= first.last_poll_at

    backend_health._written.clear()  # as if RECORD_EVERY had passed
    record_poll(engine, "slurm", "squeue failed (124): squeue: timed out after 60s")
    still = row_of(engine, "slurm")
    assert still.failing_since == failing.failing_since  # since the first failure
    assert still.last_error.startswith("squeue failed (124)")

    record_poll(engine, "slurm", None)
    recovered = row_of(engine, "slurm")
    assert recovered.failing_since is None and recovered.last_ok_at >= still.last_error_at
    assert recovered.last_error == still.last_error  # the last error stays on show

    record_poll(engine, "slurm", None)  # the same outcome within RECORD_EVERY: no write
    assert row_of(engine, "slurm").last_poll_at == recovered.last_poll_at
    record_poll(engine, "slurm", "x" * 5000)
    assert len(row_of(engine, "slurm").last_error) == backend_health.ERROR_CHARS
    assert row_of(engine, "other") is None
    engine.dispose()


def test_every_failed_poll_is_counted_even_between_writes(db_kind, databases):
    engine = db.make_engine(databases.new(db_kind))
    db.upgrade(engine)
    record_poll(engine, "slurm", None)
    assert row_of(engine, "slurm").poll_errors == 0
    for _ in range(3):  # the first is written at once, the next two wait for a write
        record_poll(engine, "slurm", UNREACHABLE)
    assert row_of(engine, "slurm").poll_errors == 1
    record_poll(engine, "slurm", None)  # a change of outcome: written, with those two
    assert row_of(engine, "slurm").poll_errors == 3
    backend_health._written.clear()
    record_poll(engine, "slurm", UNREACHABLE)
    assert row_of(engine, "slurm").poll_errors == 4  # a counter: never goes back
    health, _ = backend_health.overview(engine, settings(str(engine.url), "slurm"))
    assert health[0].poll_errors == 4
    # what every replica's /metrics shows of it
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ReconcilerCollector(engine, settings(str(engine.url), "slurm")))
    assert registry.get_sample_value("funnel_backend_poll_errors_total",
                                     {"backend": "slurm"}) == 4
    engine.dispose()


def test_record_poll_never_raises(databases, caplog):
    """No table (or no database): a warning, and the reconciler's poll goes on."""
    engine = db.make_engine(databases.new("sqlite"))  # never upgraded
    with caplog.at_level(logging.WARNING, "funnel_hpc.gateway.store.backend_health"):
        record_poll(engine, "local", UNREACHABLE)
    assert "could not record the health of backend local" in caplog.text
    assert not backend_health._written  # tried again at the next poll
    unreachable = db.make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")
    record_poll(unreachable, "slurm", None)
    engine.dispose()


def test_poll_error_is_the_schedulers_words_without_job_ids():
    ids = ["4711", "4711_2", "d4e5f6a7b8c9"]
    reason = "squeue: error: Invalid job id 4711 (4711_2, d4e5f6a7b8c9.batch); exit 1"
    statuses = {job_id: JobStatus(JobState.UNKNOWN, reason) for job_id in ids}
    assert poll_error(statuses) == \
        "squeue: error: Invalid job id <job> (<job>, <job>.batch); exit 1"
    statuses["9"] = JobStatus(JobState.RUNNING, "squeue: RUNNING")
    assert poll_error(statuses) is None  # the scheduler answered
    assert poll_error({}) is None
    assert poll_error({"1": JobStatus(JobState.UNKNOWN)}) == "every job UNKNOWN"


def test_migration_upgrades_an_existing_0004_database(db_kind, databases):
    engine = db.make_engine(databases.new(db_kind))
    db.upgrade(engine, "0004_reconciler_leases")
    assert "backend_health" not in inspect(engine).get_table_names()
    task_id = "made0by0gateway0004"
    with db.writing(engine) as conn:  # as a 0004 gateway stored it (no later columns)
        conn.execute(text(
            "INSERT INTO tasks (id, state, creation_time, spec, logs, backend, attempt, "
            "event_seq, updated_at) VALUES (:id, 'QUEUED', 't', :spec, '[]', 'local', 0, 0, "
            "'t')"), {"id": task_id, "spec": json.dumps(TASK)})
    db.upgrade(engine)
    assert "backend_health" in inspect(engine).get_table_names()
    service = TaskService(engine, settings(str(engine.url)))
    assert service.get(task_id, "MINIMAL")["state"] == "QUEUED"
    record_poll(engine, "local", UNREACHABLE)
    assert row_of(engine, "local").last_error == UNREACHABLE
    engine.dispose()


@pytest.mark.postgres
@postgres
def test_overview_on_postgresql_shows_every_backend_and_its_lease(databases):
    url = databases.new("postgres")
    engine = db.make_engine(url)
    db.upgrade(engine)
    health, _ = backend_health.overview(engine, settings(url, "slurm"))
    assert [(h.backend, h.configured, h.last_poll_at, h.lease) for h in health] == \
        [("slurm", True, None, None)]  # configured, never polled, no reconciler yet
    lease = DatabaseLease(engine, "slurm", lease_seconds=30, retry_seconds=1)
    assert lease.try_renew()
    record_poll(engine, "slurm", None)
    record_poll(engine, "gridengine", UNREACHABLE)  # another backend's replicas
    health, now = backend_health.overview(engine, settings(url, "slurm"))
    assert [h.backend for h in health] == ["slurm", "gridengine"]
    slurm = health[0]
    assert slurm.lease is not None and slurm.lease.held
    assert slurm.lease.holder == ":".join(lease.holder.split(":")[:2])  # host:pid
    assert slurm.lease.since <= now and slurm.last_poll_at is not None
    assert health[1].lease is None and health[1].failing_since is not None
    lease.release()
    health, _ = backend_health.overview(engine, settings(url, "slurm"))
    assert health[0].lease is not None and not health[0].lease.held
    engine.dispose()


def test_overview_on_sqlite_reads_the_reconciler_lock(databases, tmp_path):
    url = databases.new("sqlite")
    engine = db.make_engine(url)
    db.upgrade(engine)
    path = db.sqlite_path(url)
    assert path is not None
    health, _ = backend_health.overview(engine, settings(url))
    assert health[0].lease is None  # no reconciler ever ran on this file
    lock = path.with_name(f"{path.name}.{leases.RECONCILER_ROLE}.lock")
    lock.write_text(f"{os.getpid()}\n")  # as lock_sqlite writes it
    health, _ = backend_health.overview(engine, settings(url))
    assert health[0].lease is not None and health[0].lease.held
    assert health[0].lease.holder.endswith(f":{os.getpid()}")
    lock.write_text(f"{dead_pid()}\n")
    health, _ = backend_health.overview(engine, settings(url))
    assert health[0].lease is not None and not health[0].lease.held
    engine.dispose()


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}


def signed_in(server, user: str) -> requests.Session:
    session = requests.Session()
    page = session.get(server.url + "/login", timeout=10).text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token is not None
    resp = session.post(server.url + "/login", timeout=10, allow_redirects=False,
                        data={"csrf_token": token[1], "username": user,
                              "password": PASSWORDS[user]})
    assert resp.status_code == 303
    return session


def test_every_signed_in_user_sees_the_panel_and_no_ones_tasks(databases, tmp_path):
    """Health is backend-level: bob sees the poll error of a poll of alice's job (the
    local backend's job id is her task id) without her task id; anonymous sees nothing."""
    users = {user: generate_password_hash(password) for user, password in PASSWORDS.items()}
    server = ServerProcess(tmp_path / "auth", databases.new("sqlite"), overrides={
        "auth": {"mode": "basic", "users": users, "admins": []},
        "server": {"grpc_port": 0}}).start()
    try:
        resp = requests.post(server.api + "/tasks", json=TASK, auth=("alice", "alice-pw"),
                             timeout=10)
        alice_task = resp.json()["id"]
        statuses = {alice_task: JobStatus(JobState.UNKNOWN,
                                          f"local: cannot read {alice_task}/local.state")}
        engine = db.make_engine(server.db_url)
        record_poll(engine, "local", poll_error(statuses))
        engine.dispose()
        anonymous = requests.get(server.url + "/backends", timeout=10, allow_redirects=False)
        assert anonymous.status_code == 302
        for user in ("bob", "alice"):
            page = signed_in(server, user).get(server.url + "/backends", timeout=10)
            assert page.status_code == 200 and 'id="backend-health"' in page.text
            assert "local: cannot read &lt;job&gt;/local.state" in page.text
            assert alice_task not in page.text
    finally:
        server.stop()
