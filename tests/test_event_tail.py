"""gateway/reconcile/event_tail.py on real files: what a task dir's owner may plant is
refused with a note, reads are bounded and never repeated (tests/test_owner_reads.py does the same
through a real server, real users and real Slurm)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import update

from funnel_hpc.gateway.reconcile import event_tail
from funnel_hpc.gateway.reconcile.event_tail import LINE_BYTES, EventTail, archive_events
from funnel_hpc.gateway.store import db, retention
from funnel_hpc.gateway.store.task_dirs import RECEIVED_EVENTS, gateway_dir
from tests.reconciler_helpers import TRIVIAL, ScriptedBackend, make

TASK = "t0123456789abcdef"


def line(seq: int, task_id: str | None = TASK, **fields) -> bytes:
    event = {"seq": seq, "type": "system_log", "message": f"m{seq}", **fields}
    if task_id is not None:
        event["task_id"] = task_id
    return json.dumps(event).encode() + b"\n"


@pytest.fixture
def task_dir(tmp_path) -> Path:
    directory = tmp_path / "work" / TASK
    directory.mkdir(parents=True)
    return directory


def messages(tail: EventTail) -> list[str]:
    return tail.fold.task_log["system_logs"]


def test_whole_lines_only_and_a_torn_tail_waits(task_dir):
    log = task_dir / "events.jsonl"
    log.write_bytes(line(1) + line(2)[:10])
    tail = EventTail(task_dir, 1)
    assert tail.read_new() and messages(tail) == ["m1"]
    with log.open("ab") as fh:
        fh.write(line(2)[10:])
    assert tail.read_new() and messages(tail) == ["m1", "m2"]
    assert not tail.read_new() and not tail.notes


def test_planted_shapes_are_refused_once_each_with_a_note(task_dir, tmp_path):
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(line(1, message="secret"))
    log = task_dir / "events.jsonl"
    os.symlink(secret, log)
    tail = EventTail(task_dir, 1)
    tail.read_new()
    tail.read_new()
    assert tail.notes == ["events.jsonl is a symbolic link: not read"]
    log.unlink()
    os.mkfifo(log)
    tail.read_new()  # a FIFO is never opened: this would block otherwise
    log.unlink()
    log.mkdir()
    tail.read_new()
    assert tail.notes[1:] == ["events.jsonl is a FIFO: not read",
                              "events.jsonl is a directory: not read"]
    assert messages(tail) == []


def test_a_file_of_another_uid_is_refused(task_dir):
    (task_dir / "events.jsonl").write_bytes(line(1))
    tail = EventTail(task_dir, 1, job_uid=os.geteuid() + 1)
    assert not tail.read_new()
    uid = os.geteuid()
    assert tail.notes == [f"events.jsonl is owned by uid {uid}, not {uid + 1}: not read"]
    unknown = EventTail(task_dir, 1, job_uid=None)  # an owner without an account
    assert not unknown.read_new() and "the job's user is unknown" in unknown.notes[0]


def test_events_of_another_task_are_dropped_with_a_note(task_dir):
    (task_dir / "events.jsonl").write_bytes(line(1, "other") + line(2, "other") +
                                            line(3, None) + line(4))
    tail = EventTail(task_dir, 1)
    tail.read_new()
    assert messages(tail) == ["m3", "m4"]
    assert tail.notes == ["events.jsonl: 2 event(s) of another task dropped"]


def test_an_over_long_line_is_skipped_once_and_what_follows_is_read(task_dir):
    log = task_dir / "events.jsonl"
    with log.open("wb") as fh:
        fh.write(line(1))
        fh.truncate(len(line(1)) + (1 << 30))  # a gigabyte hole, no newline
    tail = EventTail(task_dir, 1)
    tail.read_new()
    assert messages(tail) == ["m1"] and tail.behind  # one chunk parsed per call
    tail.read_new()
    assert len(tail.notes) == 1 and "a line longer than" in tail.notes[0]
    offset = tail.logs[0].offset
    assert offset == log.stat().st_size  # the holes were seeked over, not read
    tail.read_new()
    assert tail.logs[0].offset == offset and len(tail.notes) == 1
    with log.open("ab") as fh:
        fh.write(b"x" * 100 + b"\n" + line(2))
    tail.read_new()
    assert messages(tail) == ["m1", "m2"] and len(tail.notes) == 1


def test_a_long_line_of_real_bytes_is_passed_over_in_bounded_steps(task_dir, monkeypatch):
    monkeypatch.setattr(event_tail, "SKIP_BYTES", 2 * LINE_BYTES)
    log = task_dir / "events.jsonl"
    log.write_bytes(b"y" * (5 * LINE_BYTES) + b"\n" + line(1))
    tail = EventTail(task_dir, 1)
    reads = 0
    while not messages(tail):
        tail.read_new()
        reads += 1
        assert reads < 10, "never got past the long line"
    assert reads == 4 and len(tail.notes) == 1  # 6 chunks, 2 a call, then the line


def test_a_big_backlog_is_read_over_several_calls(task_dir):
    count = LINE_BYTES // len(line(1)) * 2
    (task_dir / "events.jsonl").write_bytes(b"".join(line(seq) for seq in range(1, count)))
    tail = EventTail(task_dir, 1)
    tail.read_new()
    assert tail.behind and 0 < tail.fold.last_seq < count - 1
    while tail.behind:
        tail.read_new()
    assert tail.fold.last_seq == count - 1


def test_received_events_come_from_the_gateways_dir_and_an_old_task_dir(task_dir):
    own = gateway_dir(task_dir.parent, TASK)
    own.mkdir(parents=True)
    (own / RECEIVED_EVENTS).write_bytes(line(2))
    (task_dir / RECEIVED_EVENTS).write_bytes(line(1))  # an older gateway's, in flight
    tail = EventTail(task_dir, 1)
    tail.read_new()
    assert messages(tail) == ["m1", "m2"]
    archive_events(task_dir, 1)
    assert (own / f"{RECEIVED_EVENTS}.attempt1").exists()
    assert (task_dir / f"{RECEIVED_EVENTS}.attempt1").exists()
    assert not (own / RECEIVED_EVENTS).exists()


def test_a_new_attempts_tail_reads_only_once_a_log_is_there(task_dir, monkeypatch):
    """A tail of a job just submitted opens no directory until a log appears (the lstat
    hint), and adopts no older gateway's file: this gateway wrote none for it."""
    (task_dir / RECEIVED_EVENTS).write_bytes(line(1))  # as an older gateway's would be
    tail = EventTail(task_dir, 1)
    tail.new_attempt()
    opened: list[str] = []
    real_open = event_tail.files.open_work_dir

    def counted(path: str) -> int:
        opened.append(path)
        return real_open(path)

    monkeypatch.setattr(event_tail.files, "open_work_dir", counted)
    assert not tail.read_new() and opened == []
    (task_dir / "events.jsonl").write_bytes(line(1))
    assert tail.read_new() and messages(tail) == ["m1"]
    assert len(opened) == 1


def test_purge_removes_the_gateways_directory_of_a_task(tmp_path):
    service, reconciler = make(tmp_path, ScriptedBackend())
    ended, running = service.create(TRIVIAL), service.create(TRIVIAL)
    with db.writing(service.engine) as conn:
        conn.execute(update(db.tasks).where(db.tasks.c.id == ended)
                     .values(state="COMPLETE", updated_at="2000-01-01T00:00:00.000000Z"))
    work = reconciler.config.work_dir
    for task_id in (ended, running):
        gateway_dir(work, task_id).mkdir(parents=True)
        (gateway_dir(work, task_id) / RECEIVED_EVENTS).write_bytes(line(1, task_id))
    assert retention.purge(service.engine, work, 86400).tasks == [ended]
    assert not gateway_dir(work, ended).exists() and gateway_dir(work, running).exists()
