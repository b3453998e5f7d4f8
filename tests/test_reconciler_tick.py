"""A reconciler tick costs what changed, not what is in flight (gateway/reconcile/index.py):
after the first tick only changed rows are read, only tasks whose row, job state or HTTP
intake changed (plus a bounded round-robin sweep) have their event logs read, and a
tick's live-log updates are stored in one transaction. In process, one tick at a time."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import event, select, update

from funnel_hpc.backends.base import JobState
from funnel_hpc.gateway.reconcile.event_tail import EventTail
from funnel_hpc.gateway.reconcile.index import InFlightIndex
from funnel_hpc.gateway.store import db, outbox
from funnel_hpc.gateway.store.reconciler_queries import FieldUpdate
from tests.reconciler_helpers import TRIVIAL, ScriptedBackend, job_of, make, write_events


@pytest.fixture
def reads(monkeypatch) -> Counter:
    """task id -> EventTail.read_new calls (each stats and reads the task's event logs)."""
    counts: Counter = Counter()
    original = EventTail.read_new

    def counting(tail: EventTail) -> bool:
        counts[Path(tail.directory).name] += 1
        return original(tail)

    monkeypatch.setattr(EventTail, "read_new", counting)
    return counts


def running_tasks(tmp_path: Path, count: int, sweep: int):
    """`count` RUNNING tasks whose rows last changed a minute ago (nothing new since)."""
    backend = ScriptedBackend()
    service, reconciler = make(tmp_path, backend, sweep_per_tick=sweep)
    ids = [service.create(TRIVIAL) for _ in range(count)]
    reconciler.tick()  # submits
    for task_id in ids:
        write_events(Path(reconciler.config.work_dir) / task_id, "INITIALIZING", "RUNNING")
        backend.end(job_of(service, task_id), JobState.RUNNING)
    reconciler.tick()  # reads them all: every row changed
    assert {service.get(task_id)["state"] for task_id in ids} == {"RUNNING"}
    reconciler.tick()  # reads its own writes back
    with db.writing(service.engine) as conn:
        conn.execute(update(db.tasks).values(updated_at="2000-01-01T00:00:00.000000Z"))
    return backend, service, reconciler, ids


def test_the_tick_after_the_first_reads_only_what_changed(tmp_path, reads):
    backend, service, reconciler, ids = running_tasks(tmp_path, 6, sweep=2)
    reads.clear()
    polls = backend.polls
    swept: list[str] = []
    for _ in range(3):
        stats = reconciler.tick()
        assert stats.rows_read == 0 and stats.poll_calls == 1
        assert sum(reads.values()) == 2  # the sweep only
        swept += list(reads)
        reads.clear()
    assert sorted(swept) == sorted(ids)  # round robin: each once in ceil(6 / 2) ticks
    assert backend.polls == polls + 3

    # a worker reports over HTTP, a user cancels, a job ends: those three, and the sweep
    reported, canceled, ended = ids[:3]
    service.reconciler_queries.note_worker_event(reported)
    service.cancel(canceled)
    backend.end(job_of(service, ended), JobState.FAILED, "exit=1:0")
    stats = reconciler.tick()
    assert stats.rows_read == 2  # the report's row and the cancel's
    assert {reported, canceled, ended} <= set(reads)
    assert sum(reads.values()) <= 3 + 2 + 1  # and one more read of the ended job's logs
    assert backend.canceled == [job_of(service, canceled)]
    assert service.get(ended)["state"] == "SYSTEM_ERROR"


def test_a_worker_that_only_writes_its_file_still_completes(tmp_path, reads):
    """No HTTP intake, the scheduler still says RUNNING (an epilog, say): the sweep reads
    its file within ceil(in flight / sweep) ticks."""
    _, service, reconciler, ids = running_tasks(tmp_path, 5, sweep=2)
    quiet = ids[3]
    write_events(Path(reconciler.config.work_dir) / quiet, "INITIALIZING", "RUNNING",
                 "COMPLETE")
    for _ in range(math.ceil(len(ids) / 2)):
        reconciler.tick()
    assert service.get(quiet)["state"] == "COMPLETE"
    assert {service.get(task_id)["state"] for task_id in ids if task_id != quiet} == {"RUNNING"}


def test_a_job_that_ends_is_read_at_once(tmp_path, reads):
    backend, service, reconciler, ids = running_tasks(tmp_path, 5, sweep=1)
    done = ids[4]
    write_events(Path(reconciler.config.work_dir) / done, "INITIALIZING", "RUNNING",
                 "COMPLETE")
    backend.end(job_of(service, done), JobState.COMPLETED)
    reconciler.tick()
    assert service.get(done)["state"] == "COMPLETE"


def test_a_new_reconciler_reads_everything_once(tmp_path, reads):
    """A restart (or the lease regained) starts from an empty index."""
    backend, service, reconciler, ids = running_tasks(tmp_path, 4, sweep=1)
    for task_id in ids:
        write_events(Path(reconciler.config.work_dir) / task_id, "INITIALIZING", "RUNNING",
                     "COMPLETE")
    restarted = type(reconciler)(service, backend, reconciler.config,
                                 index=InFlightIndex(service.reconciler_queries, 1))
    reads.clear()
    stats = restarted.tick()
    assert stats.rows_read == 4 and set(reads) == set(ids)
    assert {service.get(task_id)["state"] for task_id in ids} == {"COMPLETE"}


def test_live_logs_of_many_tasks_are_one_transaction(tmp_path, reads):
    _, service, reconciler, ids = running_tasks(tmp_path, 5, sweep=10)
    for n, task_id in enumerate(ids):
        with (Path(reconciler.config.work_dir) / task_id / "events.jsonl").open("a") as fh:
            fh.write(json.dumps({"seq": 3, "type": "executor_log", "index": 0, "limit": 100,
                                 "stdout": f"line {n}\n"}) + "\n")
    updates = []

    def count(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("UPDATE tasks"):
            updates.append(len(parameters) if executemany else 1)

    event.listen(service.engine, "before_cursor_execute", count)
    try:
        stats = reconciler.tick()
    finally:
        event.remove(service.engine, "before_cursor_execute", count)
    assert stats.updated == 5
    assert updates == [5]  # one UPDATE executemany for the five tasks
    for n, task_id in enumerate(ids):
        task = service.get(task_id, "FULL")
        assert task["state"] == "RUNNING"
        assert task["logs"][0]["logs"][0]["stdout"] == f"line {n}\n"
        assert service.get_row(task_id).event_seq == 3
    with db.reading(service.engine) as conn:
        kinds = conn.execute(select(outbox.event_outbox.c.task_id)
                             .where(outbox.event_outbox.c.kind == "executor_log")).scalars()
        assert sorted(kinds) == sorted(ids)
    assert reconciler.tick().updated == 0  # nothing new to store


def test_update_many_stores_only_rows_still_in_their_state(tmp_path):
    service, _ = make(tmp_path, ScriptedBackend())
    kept, moved = service.create(TRIVIAL), service.create(TRIVIAL)
    service.cancel(moved)  # CANCELED: no longer QUEUED
    logs = [{"logs": [], "outputs": [], "gateway_logs": ["noted"]}]
    event_ = {"seq": 1, "type": "executor_log", "index": 0, "stdout": "x"}
    updated, _ = service.reconciler_queries.update_many([
        FieldUpdate(kept, "QUEUED", logs, 1, [event_]),
        FieldUpdate(moved, "QUEUED", logs, 1, [event_])])
    assert updated == {kept}
    assert service.get_row(kept).event_seq == 1 and service.get_row(moved).event_seq == 0
    with db.reading(service.engine) as conn:
        logged = conn.execute(select(outbox.event_outbox.c.task_id)
                              .where(outbox.event_outbox.c.kind == "executor_log")).scalars()
        assert list(logged) == [kept]
