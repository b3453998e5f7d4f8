"""The local backend directly: real processes, concurrency limit, cancel, restart."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backends.base import JobState, SubmitRequest
from backends.local import LocalBackend


def make(tmp_path: Path, **options) -> LocalBackend:
    return LocalBackend({"max_concurrent": 2, **options}, {"work_dir": str(tmp_path)})


def request(tmp_path: Path, task_id: str, script: str) -> SubmitRequest:
    directory = tmp_path / task_id
    directory.mkdir(parents=True, exist_ok=True)
    return SubmitRequest(task_id=task_id, task={"id": task_id}, task_dir=directory,
                         worker_argv=["/bin/sh", "-c", script])


def wait_for(backend, job_id, states, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = backend.poll([job_id])[job_id]
        if status.state in states:
            return status
        time.sleep(0.1)
    raise AssertionError(f"{job_id} stayed {status}")


def test_exit_codes(tmp_path):
    backend = make(tmp_path)
    ok = backend.submit(request(tmp_path, "ok", "exit 0"))
    bad = backend.submit(request(tmp_path, "bad", "exit 3"))
    assert wait_for(backend, ok, {JobState.COMPLETED}).state == JobState.COMPLETED
    status = wait_for(backend, bad, {JobState.FAILED})
    assert "3" in status.reason
    assert backend.poll(["nosuchjob"])["nosuchjob"].state == JobState.LOST


def test_concurrency_limit_and_fifo(tmp_path):
    backend = make(tmp_path, max_concurrent=1)
    first = backend.submit(request(tmp_path, "first", "sleep 2"))
    second = backend.submit(request(tmp_path, "second", "exit 0"))
    states = backend.poll([first, second])
    assert states[first].state == JobState.RUNNING
    assert states[second].state == JobState.PENDING
    wait_for(backend, second, {JobState.COMPLETED}, timeout=20)
    assert backend.poll([first])[first].state == JobState.COMPLETED


def test_cancel_pending_and_running_kills_the_process_group(tmp_path):
    backend = make(tmp_path, max_concurrent=1, cancel_grace_seconds=1)
    marker = tmp_path / "grandchild.pid"
    running = backend.submit(request(tmp_path, "running", f"sh -c 'echo $$ > {marker}; sleep 60' & wait"))
    pending = backend.submit(request(tmp_path, "pending", "touch ran"))
    wait_for(backend, running, {JobState.RUNNING})
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(marker.read_text())
    backend.cancel(pending)
    assert backend.poll([pending])[pending].state == JobState.CANCELLED
    backend.cancel(running)
    assert wait_for(backend, running, {JobState.CANCELLED}).state == JobState.CANCELLED
    time.sleep(0.5)
    assert not Path(f"/proc/{grandchild}").exists() or \
        Path(f"/proc/{grandchild}/stat").read_text().split(")")[1].split()[0] == "Z"
    assert not (tmp_path / "pending" / "ran").exists()


def test_restart_readopts_running_and_launches_queued_once(tmp_path):
    log = tmp_path / "runs.log"
    # backend A in its own process: submits 3 jobs with one slot, then is killed -9
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from pathlib import Path
        from backends.local import LocalBackend
        from backends.base import SubmitRequest
        work = Path({str(tmp_path)!r})
        b = LocalBackend({{"max_concurrent": 1}}, {{"work_dir": str(work)}})
        for i, code in enumerate([0, 4, 0]):
            d = work / f"job{{i}}"; d.mkdir()
            b.submit(SubmitRequest(f"job{{i}}", {{}}, d, ["/bin/sh", "-c",
                     f"echo job{{i}} >> {log}; sleep 1; exit {{code}}"]))
        print("submitted", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "submitted"
    proc.kill()
    proc.wait()
    backend = make(tmp_path, max_concurrent=1)
    ids = ["job0", "job1", "job2"]
    first = backend.poll(ids)
    assert first["job0"].state == JobState.RUNNING  # re-adopted, still running
    assert first["job2"].state == JobState.PENDING
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = backend.poll(ids)
        if all(s.state.finished for s in states.values()):
            break
        time.sleep(0.2)
    assert [states[i].state for i in ids] == [JobState.COMPLETED, JobState.FAILED,
                                              JobState.COMPLETED]
    assert "4" in states["job1"].reason
    assert sorted(log.read_text().split()) == ["job0", "job1", "job2"]  # each ran once
