"""Live logs: the tails' incremental updates (worker/livelogs.py), their fold
(core/events.py executor_log), and a real worker sending them while an executor runs."""

from __future__ import annotations

from funnel_hpc.core.events import EventFold, check_event, iter_events
from funnel_hpc.worker.livelogs import LiveLogs, Tail, _complete_utf8
from tests.waiting import wait_for

WAIT_THEN_SECOND = "echo first; while [ ! -e /data/go ]; do sleep 0.1; done; echo second"


class RecordingEvents:
    """Stands in for EventLog: keeps what was emitted."""

    def __init__(self) -> None:
        self.emitted: list[dict] = []

    def emit(self, kind: str, **fields) -> dict:
        event = {"seq": len(self.emitted) + 1, "type": kind, **fields}
        self.emitted.append(event)
        return event


def live(limit: int = 16) -> tuple[LiveLogs, Tail, Tail, RecordingEvents]:
    out, err, events = Tail(limit), Tail(limit), RecordingEvents()
    return LiveLogs(events, 0, {"stdout": out, "stderr": err}, 0), out, err, events  # type: ignore[arg-type]


def test_only_what_changed_travels_and_nothing_when_idle():
    updates, out, err, events = live()
    out.write(b"one\n")
    updates.update()
    out.write(b"two\n")
    err.write(b"e\n")
    updates.update()
    updates.update()  # nothing new: no event
    assert [{k: e.get(k) for k in ("stdout", "stderr")} for e in events.emitted] == \
        [{"stdout": "one\n", "stderr": None}, {"stdout": "two\n", "stderr": "e\n"}]
    assert all(check_event(e) is None for e in events.emitted)


def test_more_than_a_tail_between_updates_resets_to_the_tails():
    updates, out, err, events = live(limit=8)
    err.write(b"err\n")
    updates.update()
    out.write(b"0123456789abcdef\n")
    updates.update()
    last = events.emitted[-1]
    assert last["reset"] is True
    assert last["stdout"] == "9abcdef\n" and last["stderr"] == "err\n"


def test_a_character_cut_in_two_waits_for_its_end():
    updates, out, _err, events = live()
    euro = "€".encode()
    out.write(b"x" + euro[:1])
    updates.update()
    out.write(euro[1:] + b"\n")
    updates.update()
    assert "".join(e["stdout"] for e in events.emitted) == "x€\n"
    assert _complete_utf8(b"ab") == 2 and _complete_utf8(euro[:2]) == 0


def test_fold_appends_bounds_and_executor_end_replaces():
    fold = EventFold(executors=1)
    base = {"type": "executor_log", "index": 0, "limit": 6}
    fold.apply({"seq": 1, **base, "stdout": "abc\n"})
    fold.apply({"seq": 2, **base, "stdout": "def\n", "stderr": "x"})
    entry = fold.task_log["logs"][0]
    assert entry["stdout"] == "c\ndef\n" and entry["stderr"] == "x"
    fold.apply({"seq": 3, **base, "stdout": "NEW", "reset": True})
    assert entry["stdout"] == "NEW"
    fold.apply({"seq": 4, "type": "executor_end", "index": 0, "exit_code": 0,
                "stdout": "final\n", "stderr": ""})
    assert entry["stdout"] == "final\n" and entry["exit_code"] == 0
    # a bad one (index past the task's executors, missing limit) is skipped, not raised
    assert not fold.apply({"seq": 5, **base, "index": 3, "stdout": "no"})
    assert not fold.apply({"seq": 6, "type": "executor_log", "index": 0, "stdout": "no"})
    assert fold.skipped == 2


def test_worker_sends_a_line_while_the_executor_still_runs(harness):
    task = harness.task(executors=[{
        "image": "busybox", "command": ["sh", "-c", WAIT_THEN_SECOND]}],
        volumes=["/data"])
    proc = harness.start(task, harness.config(log_update_seconds=1))
    log_path = harness.workdir / task["id"] / "events.jsonl"
    try:
        update = wait_for(lambda: next((e for e in iter_events(log_path)
                                        if e["type"] == "executor_log"), None),
                          60, "an executor_log event", detail=lambda: proc.poll())
        assert update["stdout"] == "first\n" and update["limit"] == 10240
        go = harness.workdir / task["id"] / "files" / "data" / "go"
        go.write_text("")
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    events = list(iter_events(log_path))
    end = next(e for e in events if e["type"] == "executor_end")
    assert end["stdout"] == "first\nsecond\n"
    assert all(e["seq"] < end["seq"] for e in events if e["type"] == "executor_log")


def test_log_update_seconds_zero_sends_no_updates(harness):
    task = harness.task(executors=[{"image": "busybox", "command": ["echo", "hi"]}])
    run = harness.run(task, harness.config(log_update_seconds=0))
    assert run.state == "COMPLETE", run.stderr
    types = {e["type"] for e in iter_events(run.task_dir / "events.jsonl")}
    assert "executor_log" not in types and run.executor(0)["stdout"] == "hi\n"
