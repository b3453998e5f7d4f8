"""The event outbox (gateway/store/outbox.py): recorded with the change, in order, gaps held;
on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import insert

from funnel_hpc.gateway.store import db, outbox
from tests.events_helpers import outbox_engine, record_events


@pytest.fixture
def engine(db_kind, databases):
    return outbox_engine(databases.new(db_kind))


def test_record_is_part_of_the_callers_transaction(engine):
    record_events(engine, [("t1", "alice", "state", {"state": "RUNNING"})])
    try:
        with db.writing(engine) as conn:
            outbox.record(conn, "t1", "alice", "state", {"state": "COMPLETE"})
            raise RuntimeError("the task change failed")
    except RuntimeError:
        pass
    with db.reading(engine) as conn:
        events = outbox.read(conn, 0, outbox.last_id(conn))
    assert [event.payload for event in events] == [{"state": "RUNNING"}]


def test_ids_grow_and_reads_filter_by_owner_and_task(engine):
    ids = record_events(engine, [("t1", "alice", "state", 1), ("t2", "bob", "state", 2),
                                 ("t1", "alice", "task_end", 3)])
    assert ids == sorted(ids) and len(set(ids)) == 3
    with db.reading(engine) as conn:
        assert [e.payload for e in outbox.read(conn, 0, ids[-1], owner="alice")] == [1, 3]
        assert [e.payload for e in outbox.read(conn, 0, ids[-1], task_id="t2")] == [2]
        assert [e.payload for e in outbox.read(conn, ids[0], ids[-1])] == [2, 3]


def test_ids_are_never_reused_after_pruning(engine):
    first = record_events(engine, [("t1", None, "state", 1), ("t1", None, "state", 2)])
    with db.writing(engine) as conn:
        assert outbox.prune(conn, None, "9999") == 2  # everything, the newest row too
    (later,) = record_events(engine, [("t1", None, "state", 3)])
    assert later > first[-1]


def test_readers_stop_at_a_gap_until_it_fills_or_its_grace_ends(engine):
    row: dict[str, object] = {"task_id": "t1", "owner": None, "kind": "state", "payload": {},
                              "time": "x"}
    with db.writing(engine) as conn:  # ids 1 and 3 committed, 2 not (yet)
        conn.execute(insert(outbox.event_outbox), [{"id": 1, **row}, {"id": 3, **row}])
    patient = outbox.GapGuard(grace_seconds=3600)
    with db.reading(engine) as conn:
        assert patient.settled(conn, 0, 100) == 1
        assert patient.settled(conn, 1, 100) == 1
    with db.writing(engine) as conn:
        conn.execute(insert(outbox.event_outbox), [{"id": 2, **row}])
    with db.reading(engine) as conn:
        assert patient.settled(conn, 1, 100) == 3
    with db.writing(engine) as conn:  # a gap at 4 that never fills (a rollback)
        conn.execute(insert(outbox.event_outbox), [{"id": 5, **row}])
    with db.reading(engine) as conn:
        assert outbox.GapGuard(grace_seconds=0).settled(conn, 3, 100) == 5


def test_cursors_start_where_asked_and_persist(engine):
    with db.writing(engine) as conn:
        assert outbox.load_cursor(conn, "webhook:a", 7) == 7
        outbox.save_cursor(conn, "webhook:a", 9)
    with db.writing(engine) as conn:
        assert outbox.load_cursor(conn, "webhook:a", 0) == 9


def test_record_task_takes_the_owner_from_the_task_row(engine):
    from sqlalchemy import insert as sql_insert

    now = "2026-01-01T00:00:00.000000Z"
    with db.writing(engine) as conn:
        conn.execute(sql_insert(db.tasks), {
            "id": "t1", "state": "QUEUED", "owner": "alice", "creation_time": now,
            "spec": {}, "logs": [], "attempt": 0, "event_seq": 0, "updated_at": now})
        outbox.record_task(conn, "t1", "state", {"state": "RUNNING", "previous": "QUEUED"})
        outbox.record_task(conn, "unknown", "state", {})
    with db.reading(engine) as conn:
        (event,) = outbox.read(conn, 0, outbox.last_id(conn))
    assert (event.task_id, event.owner, event.kind) == ("t1", "alice", "state")
    assert event.payload == {"state": "RUNNING", "previous": "QUEUED"}
