"""One active reconciler per backend (gateway/store/leases.py) and submission claims that stay
safe when two reconcilers run at once, on the real PostgreSQL; SQLite's one-server lock."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, update

from funnel_hpc.core import config as config_mod
from funnel_hpc.gateway.reconcile.reconciler import SUBMITTING, Reconciler
from funnel_hpc.gateway.store import db
from funnel_hpc.gateway.store.leases import DatabaseLease, Lease
from funnel_hpc.gateway.web.app import make_service
from tests.components import POSTGRES, POSTGRES_REASON, needs
from tests.replica_helpers import (
    CountingBackend,
    ReplicaProcess,
    Unelected,
    holder_pid,
    lease_row,
)
from tests.server_helpers import ServerProcess, _postgres_reachable, clean_env, funnel_argv
from tests.waiting import wait_for

TRIVIAL = {"executors": [{"image": "busybox", "command": ["true"]}]}
postgres = needs(POSTGRES, _postgres_reachable(), POSTGRES_REASON)


def make(tmp_path: Path, url: str, **reconciler: object):
    config = config_mod.load(environ={}, overrides={
        "work_dir": str(tmp_path), "database": {"url": url}, "backend": {"name": "counting"},
        "reconciler": {"submit_threads": 4, **reconciler}})
    return config, make_service(config)


@pytest.mark.postgres
@postgres
def test_one_holder_takeover_after_expiry_and_release(databases, tmp_path):
    _, service = make(tmp_path, databases.new("postgres"))
    first = DatabaseLease(service.engine, "counting", lease_seconds=1.0, retry_seconds=0.2)
    second = DatabaseLease(service.engine, "counting", lease_seconds=1.0, retry_seconds=0.2)
    assert first.try_renew() and first.held()
    assert not second.try_renew() and not second.held()
    assert first.try_renew()  # renewing keeps it
    # first stops renewing (as a killed or cut-off process): it stops acting on its own
    # clock, and second may take over only after the expiry, by the database's clock
    wait_for(lambda: not first.held(), 30, "the silent holder to stop acting")
    wait_for(second.try_renew, 30, "the second to take the expired lease")
    row = lease_row(service.engine, "counting")
    assert row.holder == second.holder and row.acquired_at >= row.expires_at - 1.0
    assert not first.try_renew()  # the old holder cannot steal it back
    second.release()
    assert not second.held()
    assert first.try_renew()  # a released lease is free at once


@pytest.mark.postgres
@postgres
def test_two_reconcilers_at_once_submit_every_task_once(databases, tmp_path):
    """No lease: two reconcilers with their own engines tick as fast as they can over
    300 tasks, 40 claims per tick each; every task is submitted exactly once."""
    url = databases.new("postgres")
    backend = CountingBackend()
    reconcilers = []
    for _ in range(2):
        config, service = make(tmp_path, url, submit_per_tick=40, interval_seconds=0.05)
        reconciler = Reconciler(service, backend, config,
                                lease=Unelected(service.engine, "counting", 15.0, 0.05))
        reconcilers.append(reconciler)
    ids = [reconcilers[0].service.create({**TRIVIAL, "name": f"t{i}"}) for i in range(300)]
    threads = [threading.Thread(target=r.run_forever, daemon=True) for r in reconcilers]
    for thread in threads:
        thread.start()
    service = reconcilers[0].service
    try:
        queries = service.reconciler_queries
        wait_for(lambda: all(row.job_id for row in queries.active_rows()), 120,
                 "every task to have a job", detail=lambda: len(backend.calls))
    finally:
        for reconciler in reconcilers:
            reconciler.stop()
        for thread in threads:
            thread.join(30)
    assert sorted(backend.calls) == sorted(ids)  # each task once, none twice
    rows = {row.id: row for row in service.reconciler_queries.active_rows()}
    assert {rows[i].attempt for i in ids} == {1}
    assert len({rows[i].job_id for i in ids}) == 300


@pytest.mark.postgres
@postgres
def test_a_stale_read_claims_nothing(databases, tmp_path):
    """Reconciler B read the task before A claimed, submitted and lost it (back to
    QUEUED for attempt 2): B's claim for attempt 1 is refused."""
    _, service = make(tmp_path, databases.new("postgres"))
    task_id = service.create(TRIVIAL)
    queries = service.reconciler_queries
    assert queries.claim_with_tasks([(task_id, 1)]).keys() == {task_id}
    assert queries.claim_with_tasks([(task_id, 1)]).keys() == set()  # claimed: nobody else
    queries.release_claims([(task_id, 1, 0)])  # A's job was lost: QUEUED, attempt 1 done
    assert queries.claim_with_tasks([(task_id, 1)]).keys() == set()  # B's old read
    assert queries.claim_with_tasks([(task_id, 2)]).keys() == {task_id}


@pytest.mark.postgres
@postgres
def test_a_young_claim_is_left_to_its_claimer(databases, tmp_path):
    """On PostgreSQL another reconciler may still be submitting a claim younger than a
    lease: it is not recovered (which could submit it twice); an older one is."""
    config, service = make(tmp_path, databases.new("postgres"))
    backend = CountingBackend()
    reconciler = Reconciler(service, backend, config,
                            lease=Unelected(service.engine, "counting", 15.0, 1.0))
    task_id = service.create(TRIVIAL)
    assert service.reconciler_queries.claim_with_tasks([(task_id, 1)]).keys() == {task_id}
    reconciler.tick()
    assert service.get_row(task_id).job_id == SUBMITTING and backend.calls == []
    with db.writing(service.engine) as conn:  # the claimer died 20 s ago
        conn.execute(update(db.tasks).where(db.tasks.c.id == task_id)
                     .values(updated_at="2000-01-01T00:00:00.000000Z"))
    reconciler.tick()  # no job for it: the claim is given back
    reconciler.tick()
    assert backend.calls == [task_id]
    assert Lease().may_recover("2099-01-01T00:00:00Z")  # one reconciler (SQLite): always


@pytest.mark.postgres
@postgres
def test_a_stopped_holder_hands_over_at_once(databases, tmp_path):
    """SIGTERM (systemd's stop) releases the lease: with a 120 s lease the other replica
    takes over well within it."""
    url = databases.new("postgres")
    overrides = {"reconciler": {"interval_seconds": 0.5, "lease_seconds": 120}}
    servers = [ReplicaProcess(tmp_path / "work", url, overrides=overrides, reconcile=True,
                              name=f"replica{i}").start() for i in range(2)]
    engine = create_engine(url)
    try:
        first = wait_for(lambda: lease_row(engine, "local"), 60, "a lease holder")
        holder = next(s for s in servers if s.proc and s.proc.pid == holder_pid(first))
        holder.stop()
        assert holder.proc is not None and holder.proc.returncode == 0
        row = wait_for(lambda: (lambda r: r if r.holder != first.holder else None)(
            lease_row(engine, "local")), 60, "the other replica to take over")
        assert row.acquired_at - first.renewed_at < 100  # released, not expired
    finally:
        for server in servers:
            server.stop()
        engine.dispose()


def _refused(config: Path, *args: str) -> str:
    """Run a funnel command expected to refuse at once; its error line."""
    result = subprocess.run(funnel_argv(*args, "--config", str(config)), env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result
    return result.stderr


def test_sqlite_refuses_a_second_server_or_reconciler(databases, tmp_path):
    url = databases.new("sqlite")
    server = ServerProcess(tmp_path / "a", url, reconcile=True).start()
    try:
        message = _refused(server.config_path, "server", "run", "--port", "1")
        assert "another funnel server (pid " in message
        assert "SQLite allows one server and one reconciler per file" in message
        assert len(message.strip().splitlines()) == 1
        assert "another funnel reconciler" in _refused(server.config_path, "reconcile")
    finally:
        server.stop()


def test_sqlite_allows_an_api_server_and_one_reconciler(databases, tmp_path):
    url = databases.new("sqlite")
    server = ServerProcess(tmp_path / "a", url, reconcile=False).start()
    reconciler = subprocess.Popen(funnel_argv("reconcile", "--config", str(server.config_path)),
                                  env=clean_env(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    try:
        lock = Path(url.split("///", 1)[1] + ".reconciler.lock")
        wait_for(lambda: lock.exists() and lock.read_text().strip() == str(reconciler.pid),
                 60, "the reconciler to hold its lock")
        assert "another funnel reconciler" in _refused(server.config_path, "reconcile")
        assert reconciler.poll() is None  # the first one runs on
    finally:
        reconciler.terminate()
        reconciler.wait(10)
        server.stop()
