"""The local backend directly: real processes, concurrency limit, cancel, restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from funnel_hpc.backends.base import JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.local import LocalBackend, _group_has_members, _start_time
from tests.backend_helpers import backend_options
from tests.server_helpers import worker_image_config

REPO = Path(__file__).resolve().parents[2]
TEST_SECONDS = 40


@pytest.fixture(autouse=True)
def time_limit(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that runs too long (TEST_SECONDS, or the test function's time_limit),
    then kill every worker group it left behind."""
    seconds = int(getattr(request.function, "time_limit", TEST_SECONDS))

    def too_long(*_: object) -> None:
        raise TimeoutError(f"test ran over {seconds} s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        for pid_file in tmp_path.rglob("local.pid"):
            pid = json.loads(pid_file.read_text())["pid"]
            if _group_has_members(pid):
                os.killpg(pid, signal.SIGKILL)


def make(tmp_path: Path, on_change: Callable[[], None] | None = None,
         **options: object) -> LocalBackend:
    return LocalBackend(backend_options("local", **{"max_concurrent": 2,
                                                    "cancel_grace_seconds": 10, **options}),
                        tmp_path, on_change)


def request(tmp_path: Path, task_id: str, script: str) -> SubmitRequest:
    directory = tmp_path / task_id
    directory.mkdir(parents=True, exist_ok=True)
    return SubmitRequest(task_id=task_id, task={"id": task_id}, task_dir=directory,
                         worker_argv=["/bin/sh", "-c", script])


def wait_for(backend: LocalBackend, job_id: str, states: set[JobState],
             timeout: float = 20.0) -> JobStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = backend.poll([job_id])[job_id]
        if status.state in states:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"{job_id} stayed {status}")
        time.sleep(0.1)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def pid_of(tmp_path: Path, job_id: str) -> int:
    return json.loads((tmp_path / job_id / "local.pid").read_text())["pid"]


def test_exit_codes_and_output(tmp_path):
    backend = make(tmp_path)
    ok_request = request(tmp_path, "ok", "")
    ok_request.worker_argv = [sys.executable, "-c", "print('hello from the worker')"]
    ok = backend.submit(ok_request)
    bad = backend.submit(request(tmp_path, "bad", "echo oops >&2; exit 3"))
    assert ok == "ok" and bad == "bad"  # the job id is the task id
    assert wait_for(backend, ok, {JobState.COMPLETED}).reason == "worker exit code 0"
    status = wait_for(backend, bad, {JobState.FAILED})
    assert "exit code 3" in status.reason
    assert (tmp_path / "ok" / "worker.out").read_text() == "hello from the worker\n"
    assert (tmp_path / "bad" / "worker.err").read_text() == "oops\n"
    assert backend.poll(["nosuchjob"])["nosuchjob"].state == JobState.LOST
    backend.cancel(ok)  # a finished job stays as it ended
    assert backend.poll([ok])[ok].state == JobState.COMPLETED
    assert backend.recover("ok", tmp_path / "ok") == "ok"
    assert backend.recover("nosuchjob", tmp_path / "nosuchjob") is None


def test_worker_that_cannot_start_fails(tmp_path):
    backend = make(tmp_path)
    req = request(tmp_path, "missing", "")
    req.worker_argv = [str(tmp_path / "no-such-program")]
    status = wait_for(backend, backend.submit(req), {JobState.FAILED})
    assert "127" in status.reason
    assert "cannot start the worker" in (tmp_path / "missing" / "worker.err").read_text()


def test_concurrency_limit_and_fifo(tmp_path):
    backend = make(tmp_path, max_concurrent=1)
    order = tmp_path / "order.log"
    ids = [backend.submit(request(tmp_path, f"job{i}", f"echo job{i} >> {order}; sleep 0.5"))
           for i in range(3)]
    states = backend.poll(ids)
    assert [states[i].state for i in ids] == [JobState.RUNNING, JobState.PENDING,
                                              JobState.PENDING]
    while not all(s.state.finished for s in states.values()):
        running = [i for i in ids if states[i].state == JobState.RUNNING]
        assert len(running) <= 1
        time.sleep(0.05)
        states = backend.poll(ids)
    assert all(states[i].state == JobState.COMPLETED for i in ids)
    assert order.read_text().split() == ["job0", "job1", "job2"]


def test_cancel_pending_and_running_kills_the_whole_group(tmp_path):
    backend = make(tmp_path, max_concurrent=1, cancel_grace_seconds=1)
    marker = tmp_path / "grandchild.pid"
    # the worker's child ignores SIGTERM: only the SIGKILL after the grace period ends it
    running = backend.submit(request(
        tmp_path, "running", f"sh -c \"trap '' TERM; echo \\$\\$ > {marker}; sleep 60\" & wait"))
    pending = backend.submit(request(tmp_path, "pending", "touch ran"))
    wait_for(backend, running, {JobState.RUNNING})
    wait_until(lambda: marker.exists() and marker.read_text().strip() != "")
    grandchild = int(marker.read_text())
    group = pid_of(tmp_path, running)

    backend.cancel(pending)
    assert backend.poll([pending])[pending].state == JobState.CANCELLED
    started = time.monotonic()
    backend.cancel(running)
    assert time.monotonic() - started < 0.5  # the grace period is not waited for here
    assert wait_for(backend, running, {JobState.CANCELLED}).state == JobState.CANCELLED
    wait_until(lambda: not _group_has_members(group))
    assert _start_time(grandchild) is None
    # a job submitted now runs in the freed slot; the queue is first in, first out, so
    # had the canceled pending job been going to start, it would have started before it
    later = backend.submit(request(tmp_path, "later", "true"))
    assert wait_for(backend, later, {JobState.COMPLETED}).state == JobState.COMPLETED
    assert backend.poll([pending])[pending].state == JobState.CANCELLED
    assert not (tmp_path / "pending" / "ran").exists()  # the pending job never started


def test_cancel_right_after_submit_reaches_the_worker(tmp_path):
    """The launcher answers a wrapper's pid only once the wrapper leads its process
    group: before, on a busy machine, a job could be RUNNING (its pid alive) before
    its group existed, and a cancel's killpg found no group and was lost."""
    # five slots: each job starts at its submit, whether or not the last one ended yet
    backend = make(tmp_path, max_concurrent=5, cancel_grace_seconds=1)
    for i in range(5):
        job = backend.submit(request(tmp_path, f"quick{i}", "sleep 3; touch ran"))
        os.killpg(pid_of(tmp_path, job), 0)  # the group exists as soon as the pid is known
        backend.cancel(job)
    for i in range(5):
        assert wait_for(backend, f"quick{i}", {JobState.CANCELLED}).state == JobState.CANCELLED
        assert not (tmp_path / f"quick{i}" / "ran").exists()


def test_killed_worker_is_lost_and_reused_pid_is_not_adopted(tmp_path):
    backend = make(tmp_path)
    job = backend.submit(request(tmp_path, "victim", "sleep 30"))
    wait_for(backend, job, {JobState.RUNNING})
    os.killpg(pid_of(tmp_path, job), signal.SIGKILL)
    status = wait_for(backend, job, {JobState.LOST})
    assert "no exit status" in status.reason

    # a pid record whose pid now belongs to another process (here: this test's process)
    fake = tmp_path / "reused"
    fake.mkdir()
    (fake / "local.job").write_text(json.dumps({"argv": ["true"], "submitted": 0}))
    (fake / "local.launch").touch()
    (fake / "local.pid").write_text(json.dumps({"pid": os.getpid(), "start_time": "1"}))
    assert backend.poll(["reused"])["reused"].state == JobState.LOST
    # ... and one that really matches is adopted as RUNNING
    (fake / "local.pid").write_text(json.dumps({"pid": os.getpid(),
                                                "start_time": _start_time(os.getpid())}))
    assert backend.poll(["reused"])["reused"].state == JobState.RUNNING


def run_backend_a(tmp_path: Path, jobs: dict[str, str], max_concurrent: int) -> None:
    """Backend A in its own process submits jobs (task id -> shell script), then is killed -9."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from funnel_hpc.backends.local import LocalBackend
        from funnel_hpc.backends.base import SubmitRequest
        work = Path({str(tmp_path)!r})
        from funnel_hpc.core import config
        options = config.replace(config.load(environ={{}}).backend.local, "backend.local",
                                 max_concurrent={max_concurrent})
        b = LocalBackend(options, work)
        for job_id, script in {jobs!r}.items():
            b.submit(SubmitRequest(job_id, {{}}, work / job_id, ["/bin/sh", "-c", script]))
        print("submitted", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "submitted"
    finally:
        proc.kill()  # SIGKILL: no clean-up of any kind
        proc.wait()


def test_restart_readopts_running_and_launches_queued_once(tmp_path):
    log = tmp_path / "runs.log"
    scripts = {"job0": "sleep 0.3; exit 5",  # ends while no gateway is alive
               "job1": "sleep 3; exit 0",    # still running when B starts
               "job2": "sleep 0.5; exit 4",  # queued in A, never launched by it
               "job3": "exit 0"}             # queued in A, never launched by it
    run_backend_a(tmp_path, {job_id: f"echo {job_id} >> {log}; {script}"
                             for job_id, script in scripts.items()}, max_concurrent=2)
    assert not (tmp_path / "job2").exists()  # queued: no task dir until it starts
    wait_until(lambda: (tmp_path / "job0" / "local.exit").exists())

    backend = make(tmp_path, max_concurrent=2)
    ids = list(scripts)
    first = backend.poll(ids)
    assert first["job0"].state == JobState.FAILED and "exit code 5" in first["job0"].reason
    assert first["job1"].state == JobState.RUNNING  # re-adopted, still running
    assert first["job2"].state == JobState.RUNNING  # launched in the free slot
    assert first["job3"].state == JobState.PENDING  # the adopted job counts against the limit
    states = first
    while not all(s.state.finished for s in states.values()):
        time.sleep(0.1)
        states = backend.poll(ids)
        assert sum(s.state == JobState.RUNNING for s in states.values()) <= 2
    assert {i: states[i].state for i in ids} == {
        "job0": JobState.FAILED, "job1": JobState.COMPLETED,
        "job2": JobState.FAILED, "job3": JobState.COMPLETED}
    assert "exit code 4" in states["job2"].reason
    assert sorted(log.read_text().split()) == ids  # each job ran exactly once


def test_cancel_after_restart(tmp_path):
    started = tmp_path / "started"
    run_backend_a(tmp_path, {"running": f"trap '' TERM; touch {started}; sleep 30",
                             "queued": "touch ran"}, max_concurrent=1)
    backend = make(tmp_path, max_concurrent=1, cancel_grace_seconds=1)
    assert backend.poll(["running"])["running"].state == JobState.RUNNING
    wait_until(started.exists)  # the worker itself runs (not only its wrapper)
    group = pid_of(tmp_path, "running")
    backend.cancel("queued")  # never launched: dropped, and not launched by a later poll
    canceled_at = time.monotonic()
    backend.cancel("running")  # ignores SIGTERM: killed after the grace period
    assert backend.poll(["running"])["running"].state == JobState.RUNNING  # still in grace
    assert wait_for(backend, "running", {JobState.CANCELLED}).state == JobState.CANCELLED
    assert time.monotonic() - canceled_at >= 1  # it outlived the SIGTERM: the grace period
    assert backend.poll(["queued"])["queued"].state == JobState.CANCELLED
    wait_until(lambda: not _group_has_members(group))
    assert not (tmp_path / "queued" / "ran").exists()

    # a third gateway still reports both as canceled
    again = make(tmp_path, max_concurrent=1)
    states = again.poll(["running", "queued"])
    assert states["running"].state == states["queued"].state == JobState.CANCELLED


def test_sigkill_overdue_after_a_restart_during_the_grace_period(tmp_path):
    started = tmp_path / "started"
    run_backend_a(tmp_path, {"stubborn": f"trap '' TERM; touch {started}; sleep 30"},
                  max_concurrent=1)
    wait_until(started.exists)
    group = pid_of(tmp_path, "stubborn")
    # what a gateway killed 60 s into the grace period of a cancel leaves behind
    os.killpg(group, signal.SIGTERM)
    cancel_record = tmp_path / "stubborn" / "local.cancel"
    cancel_record.write_text(str(time.time() - 60))
    os.utime(cancel_record, (time.time() - 60, time.time() - 60))
    # SIGTERM was ignored: a signal its receiver ignores is discarded when sent, so the
    # script's shell and its sleep are alive once killpg returned
    assert _group_has_members(group)

    backend = make(tmp_path, cancel_grace_seconds=10)
    status = wait_for(backend, "stubborn", {JobState.CANCELLED}, timeout=5)
    assert "canceled" in status.reason
    wait_until(lambda: not _group_has_members(group))


# ---- the launcher (backends/local_runner.py --serve) ----

def worker_task(tmp_path: Path, task_id: str, script: str) -> SubmitRequest:
    """A request whose argv is the default worker command (run inside the launcher's fork)."""
    req = request(tmp_path, task_id, "")
    task = {"id": task_id, "executors": [{"image": "busybox", "command": ["sh", "-c", script]}]}
    (req.task_dir / "task.json").write_text(json.dumps(task))
    config = tmp_path / "worker-config.yaml"
    # JSON is YAML: the image registries of the test set-up (tests/conftest.py)
    config.write_text(json.dumps({"worker": {"container_driver": "bwrap",
                                             **worker_image_config()}}))
    req.worker_argv = [sys.executable, "-m", "funnel_hpc.worker", "run", "--task-file",
                       str(req.task_dir / "task.json"), "--workdir", str(tmp_path),
                       "--config", str(config)]
    return req


def test_default_worker_runs_in_a_fork_of_the_launcher_and_reports_its_end(tmp_path):
    ended: list[float] = []
    backend = make(tmp_path, on_change=lambda: ended.append(time.monotonic()))
    ok = backend.submit(worker_task(tmp_path, "inproc", "echo from-the-fork"))
    bad = backend.submit(worker_task(tmp_path, "inprocbad", "exit 3"))
    wait_for(backend, ok, {JobState.COMPLETED})
    status = wait_for(backend, bad, {JobState.FAILED})
    assert "worker exit code 1" in status.reason  # the worker's EXECUTOR_ERROR exit code
    events = [json.loads(line) for line in (tmp_path / ok / "events.jsonl").open()]
    assert events[-1] == {**events[-1], "type": "state", "state": "COMPLETE"}
    ends = [e for e in events if e["type"] == "executor_end"]
    assert ends[0]["stdout"] == "from-the-fork\n"
    assert (tmp_path / ok / "worker.out").read_text() == "COMPLETE\n"
    # no new interpreter: the worker's pid is a child of the wrapper, the wrapper a fork of
    # the launcher, and none of them exec'd anything but the container
    assert backend.launcher.proc is not None
    launcher = backend.launcher.proc.pid
    wrapper = pid_of(tmp_path, ok)
    assert wrapper != launcher
    meta = [e for e in events if e["type"] == "metadata" and "pid" in e["metadata"]][0]
    assert int(meta["metadata"]["pid"]) not in (wrapper, launcher)
    wait_until(lambda: len(ended) >= 2)  # each wrapper's end woke the reconciler
    backend.close()


def test_wrappers_outlive_the_launcher_and_a_new_one_starts(tmp_path):
    backend = make(tmp_path)
    flag = tmp_path / "go"
    slow = backend.submit(request(tmp_path, "slow", f"while [ ! -e {flag} ]; do sleep 0.1; done"))
    wait_for(backend, slow, {JobState.RUNNING})
    first = backend.launcher.proc
    assert first is not None
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    flag.touch()
    wait_for(backend, slow, {JobState.COMPLETED})  # its wrapper still recorded the exit
    again = backend.submit(request(tmp_path, "again", "exit 0"))
    wait_for(backend, again, {JobState.COMPLETED})
    assert backend.launcher.proc is not None and backend.launcher.proc.pid != first.pid
    backend.close()


# ---- the queue journal (backends/local_queue.py): the task dir is made at start ----

def queued_request(tmp_path: Path, task_id: str, script: str) -> SubmitRequest:
    """As the reconciler asks for a backend that makes_task_dir: no dir yet, the gateway's
    files handed over with the request."""
    return SubmitRequest(task_id=task_id, task={"id": task_id}, task_dir=tmp_path / task_id,
                         worker_argv=["/bin/sh", "-c", script], gateway_files=("task.json",),
                         files={"task.json": json.dumps({"id": task_id})})


def test_task_dir_is_made_when_the_job_starts(tmp_path):
    backend = make(tmp_path, max_concurrent=1)
    flag = tmp_path / "go"
    first = backend.submit(queued_request(tmp_path, "first", f"while [ ! -e {flag} ]; do "
                                                             "sleep 0.1; done"))
    second = backend.submit(queued_request(tmp_path, "second", "cat task.json"))
    assert backend.poll([first, second])[second].state == JobState.PENDING
    assert (tmp_path / "first" / "task.json").exists()
    assert not (tmp_path / "second").exists()  # queued: one journal line, no directory
    journal = tmp_path / "local-queue.jsonl"
    assert journal.stat().st_mode & 0o777 == 0o600
    assert '"second"' in journal.read_text()
    flag.touch()
    wait_for(backend, second, {JobState.COMPLETED})
    directory = tmp_path / "second"
    assert directory.stat().st_mode & 0o777 == 0o700
    assert (directory / "task.json").stat().st_mode & 0o777 == 0o600
    assert (directory / "worker.out").read_text() == '{"id": "second"}'  # written before it ran
    backend.close()


def test_cancel_of_a_queued_job_never_starts_it_even_after_a_restart(tmp_path):
    backend = make(tmp_path, max_concurrent=1)
    flag = tmp_path / "go"
    blocker = backend.submit(queued_request(tmp_path, "blocker", f"while [ ! -e {flag} ]; "
                                                                 "do sleep 0.1; done"))
    victim = backend.submit(queued_request(tmp_path, "victim", f"touch {tmp_path}/ran"))
    backend.cancel(victim)
    assert backend.poll([victim])[victim].state == JobState.CANCELLED
    flag.touch()
    wait_for(backend, blocker, {JobState.COMPLETED})
    backend.close()
    again = make(tmp_path, max_concurrent=1)  # a restarted gateway replays the journal
    assert again.poll([victim])[victim] == JobStatus(JobState.CANCELLED,
                                                     "canceled before it started")
    assert again.recover(victim, tmp_path / victim) == victim  # known: never submitted twice
    later = again.submit(queued_request(tmp_path, "later", "exit 0"))
    wait_for(again, later, {JobState.COMPLETED})
    assert not (tmp_path / "ran").exists() and not (tmp_path / victim).exists()
    again.close()


def test_restart_with_queued_and_running_jobs_runs_each_once(tmp_path):
    """A gateway killed -9 with 2 jobs running and 18 queued (no dir yet): the next one
    runs every job exactly once, in submission order, never more than 2 at a time."""
    log = tmp_path / "runs.log"
    jobs = {f"job{i:02d}": f"echo job{i:02d} >> {log}; sleep 0.2" for i in range(20)}
    run_backend_a(tmp_path, jobs, max_concurrent=2)
    assert sum((tmp_path / job_id).exists() for job_id in jobs) == 2  # only the started
    backend = make(tmp_path, max_concurrent=2)
    ids = list(jobs)
    assert backend.recover("job19", tmp_path / "job19") == "job19"
    states = backend.poll(ids)
    while not all(status.state.finished for status in states.values()):
        assert sum(s.state == JobState.RUNNING for s in states.values()) <= 2
        time.sleep(0.1)
        states = backend.poll(ids)
    assert {states[i].state for i in ids} == {JobState.COMPLETED}
    assert log.read_text().split() == ids  # each once, in order
    backend.close()
    # a third gateway knows them all as ended and starts nothing; the journal is empty
    third = make(tmp_path, max_concurrent=2)
    assert {s.state for s in third.poll(ids).values()} == {JobState.COMPLETED}
    assert (tmp_path / "local-queue.jsonl").read_text() == ""
    assert log.read_text().split() == ids
    third.close()


def test_a_link_planted_as_a_task_dir_is_never_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "work").mkdir()
    backend = make(tmp_path / "work", max_concurrent=1)
    (tmp_path / "work" / "planted").symlink_to(elsewhere)
    job = backend.submit(queued_request(tmp_path / "work", "planted", "touch ran"))
    status = wait_for(backend, job, {JobState.FAILED})
    assert "cannot make its task dir" in status.reason
    assert list(elsewhere.iterdir()) == []  # nothing written through the link
    backend.close()


def test_a_planted_journal_link_is_refused(tmp_path):
    target = tmp_path / "target"
    target.write_text("")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "local-queue.jsonl").symlink_to(target)
    with pytest.raises(OSError):
        make(tmp_path / "work")
    assert target.read_text() == ""


# ---- through the real server (auth on): the reconciler hands the task dir's files over ----

def test_server_restart_with_queued_tasks_dirs_at_start_none_lost_or_run_twice(
        databases, tmp_path):
    """Auth on, max_concurrent 1: a blocker runs, two tasks wait (no task dir), one of them
    is canceled; the gateway is killed -9 and started again; the blocker is canceled, the
    other waiting task then runs once, with its task.json and worker token written at its
    start; the canceled one never gets a dir."""
    from werkzeug.security import generate_password_hash

    from tests.server_helpers import ServerProcess
    from tests.waiting import wait_for_state

    auth = ("alice", "pw")
    overrides = {"auth": {"mode": "basic", "users": {"alice": generate_password_hash("pw")}},
                 "backend": {"name": "local", "local": {"max_concurrent": 1,
                                                        "cancel_grace_seconds": 2}},
                 "reconciler": {"interval_seconds": 0.3},
                 "worker": {"container_driver": "bwrap", "poll_server_seconds": 0.5}}
    work = tmp_path / "w"
    server = ServerProcess(work, databases.new("sqlite"), overrides=overrides,
                           reconcile=True).start()

    def create(command: list[str]) -> str:
        resp = requests.post(server.api + "/tasks", auth=auth, timeout=10, json={
            "executors": [{"image": "busybox", "command": command}]})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["id"])

    def job_id(task_id: str) -> str:
        task = requests.get(f"{server.api}/tasks/{task_id}", params={"view": "FULL"},
                            auth=auth, timeout=10).json()
        return str(((task.get("logs") or [{}])[-1].get("metadata") or {}).get("job_id", ""))

    try:
        blocker = create(["sleep", "600"])
        wait_for_state(server.api, blocker, "RUNNING", timeout=60, auth=auth,
                       detail=lambda: server.log()[-2000:])
        waiting = create(["echo", "ran"])
        canceled = create(["echo", "never"])
        deadline = time.monotonic() + 30
        while not (job_id(waiting) and job_id(canceled)):  # handed over to the backend
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.1)
        assert not (work / waiting).exists() and not (work / canceled).exists()
        assert requests.post(f"{server.api}/tasks/{canceled}:cancel", auth=auth,
                             timeout=10).status_code == 200
        wait_for_state(server.api, canceled, "CANCELED", timeout=30, auth=auth)
        server.kill()
        server.start()
        assert requests.post(f"{server.api}/tasks/{blocker}:cancel", auth=auth,
                             timeout=10).status_code == 200
        wait_for_state(server.api, blocker, "CANCELED", timeout=60, auth=auth)
        done = wait_for_state(server.api, waiting, "COMPLETE", timeout=90, auth=auth,
                              detail=lambda: server.log()[-2000:])
        assert done["logs"][-1]["logs"][0]["stdout"] == "ran\n"
        assert len(done["logs"]) == 1  # one attempt
        for name in ("task.json", "worker.token"):
            assert (work / waiting / name).stat().st_mode & 0o777 == 0o600
        starts = [line for line in (work / waiting / "events.jsonl").open()
                  if '"task_start"' in line]
        assert len(starts) == 1  # its worker ran once
        assert not (work / canceled).exists()
    finally:
        server.stop()


test_server_restart_with_queued_tasks_dirs_at_start_none_lost_or_run_twice.time_limit = 240  # type: ignore[attr-defined]


def test_two_processes_on_one_journal_never_act_on_a_stale_queue(tmp_path):
    """A replica made before another one queued jobs sees them at its next call; a job
    one of them started is not started again by the other; a rewrite loses no line."""
    from funnel_hpc.backends.local_queue import JobQueue

    first, second = JobQueue(tmp_path), JobQueue(tmp_path)
    for n in range(3):
        first.add(f"job{n}", ["true"], {"task.json": "{}"})
    second.refresh()
    assert list(second.queued) == ["job0", "job1", "job2"]
    assert second.take("job0") is not None
    assert first.take("job0") is None  # started by the other: never twice
    assert first.cancel("job1") and not second.cancel("job1")
    third = JobQueue(tmp_path)  # rewrites the file at load (another inode)
    second.add("job3", ["true"], {})
    first.refresh()
    assert list(first.queued) == ["job2", "job3"] and "job1" in first.canceled
    fourth = JobQueue(tmp_path)  # a restart replays the same
    assert list(fourth.queued) == ["job2", "job3"]
    for queue in (first, second, third, fourth):
        queue.close()


def test_a_job_queued_before_the_journal_runs_once_after_the_upgrade(tmp_path):
    """An older gateway queued a job as a task dir with local.job (no journal): the new
    one queues it again in submission order, runs it once, and leaves started ones be."""
    log = tmp_path / "runs.log"
    for n, job_id in enumerate(("old1", "old0")):
        directory = tmp_path / job_id
        directory.mkdir()
        (directory / "local.job").write_text(json.dumps(
            {"argv": ["/bin/sh", "-c", f"echo {job_id} >> {log}"], "submitted": 100 - n}))
    gone = tmp_path / "gone"
    gone.mkdir()  # launched by the older gateway, which died before its wrapper recorded
    (gone / "local.job").write_text(json.dumps({"argv": ["true"], "submitted": 1}))
    (gone / "local.launch").touch()
    os.utime(gone / "local.job", (1, 1))
    backend = make(tmp_path, max_concurrent=1)
    states = backend.poll(["old1", "old0", "gone"])
    assert states["gone"].state == JobState.LOST
    wait_for(backend, "old1", {JobState.COMPLETED})
    wait_for(backend, "old0", {JobState.COMPLETED})
    assert log.read_text().split() == ["old0", "old1"]
    backend.poll(["old1", "old0"])
    assert log.read_text().split() == ["old0", "old1"]
    backend.close()
