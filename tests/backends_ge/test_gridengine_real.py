"""Grid Engine backend against the real single-host cell (scripts/setup/50-gridengine.sh)."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from funnel_hpc.backends.base import JobState
from funnel_hpc.backends.gridengine import GridEngineBackend
from tests.backend_helpers import NO_WORK_DIR, backend_options, make_request
from tests.gridengine_helpers import finished, running, wait_for

pytestmark = pytest.mark.gridengine

REPO = Path(__file__).resolve().parents[2]


def new_task(task_id: str, **resources) -> dict:
    return {"id": task_id, "name": "ge test", "resources": resources}


def test_drmaa_success_failure_and_unknown_in_one_request_per_poll(drmaa_backend, tmp_path):
    ok = make_request(tmp_path, new_task("ge0ok"))
    ok.worker_argv = ["/bin/sh", "-c", f"echo hi > {ok.task_dir}/out"]
    bad = make_request(tmp_path, new_task("ge0bad"), ["/bin/sh", "-c", "echo oops >&2; exit 3"])
    ok_id, bad_id = drmaa_backend.submit(ok), drmaa_backend.submit(bad)
    assert ok_id.isdigit() and bad_id.isdigit()
    assert (ok.task_dir / "gridengine.sh").stat().st_mode & 0o111
    requests = drmaa_backend.agent.requests
    statuses = drmaa_backend.poll([ok_id, bad_id, "999999"])
    # DRMAA has no batch call: one request to the helper, no external command
    assert drmaa_backend.agent.requests == requests + 1 and drmaa_backend.runner.calls == 0
    assert statuses["999999"].state == JobState.LOST
    assert wait_for(drmaa_backend, ok_id, finished).state == JobState.COMPLETED
    failed = wait_for(drmaa_backend, bad_id, finished)
    assert failed.state == JobState.FAILED and "exit=3" in failed.reason
    assert (ok.task_dir / "out").read_text() == "hi\n"
    assert "oops" in (bad.task_dir / "gridengine.err").read_text()
    # reaped jobs keep their final state
    again = drmaa_backend.poll([ok_id, bad_id])
    assert again[ok_id].state == JobState.COMPLETED and again[bad_id].state == JobState.FAILED


def test_drmaa_cancel_pending_and_running(drmaa_backend, tmp_path):
    held = drmaa_backend.submit(make_request(tmp_path, new_task("ge1held"), ["/bin/true"],
                                             {"hold": ""}))
    busy = drmaa_backend.submit(make_request(tmp_path, new_task("ge1run"), ["/bin/sleep", "120"]))
    assert drmaa_backend.poll([held])[held].state == JobState.PENDING
    wait_for(drmaa_backend, busy, running)
    drmaa_backend.cancel(held)
    drmaa_backend.cancel(busy)
    assert wait_for(drmaa_backend, held, finished).state == JobState.CANCELLED
    assert wait_for(drmaa_backend, busy, finished).state == JobState.CANCELLED
    drmaa_backend.cancel(busy)  # idempotent
    drmaa_backend.cancel("999999")


def test_drmaa_job_deleted_behind_the_backends_back(drmaa_backend, tmp_path):
    held = drmaa_backend.submit(make_request(tmp_path, new_task("ge2held"), ["/bin/true"],
                                             {"hold": ""}))
    busy = drmaa_backend.submit(make_request(tmp_path, new_task("ge2run"), ["/bin/sleep", "120"]))
    wait_for(drmaa_backend, busy, running)
    subprocess.run(["qdel", held, busy], check=True, capture_output=True)
    for job_id in (held, busy):
        status = wait_for(drmaa_backend, job_id, finished)
        assert status.state in (JobState.CANCELLED, JobState.LOST), status


def test_drmaa_new_session_reads_old_finished_jobs_from_accounting(gridengine, drmaa_backend,
                                                                   tmp_path):
    """A session that did not submit the job (a restarted gateway) does not know it once it
    ended: LOST until qmaster flushes its accounting record (flush_time), then the record's
    exit status. A session without an accounting file keeps LOST."""
    ok = drmaa_backend.submit(make_request(tmp_path, new_task("ge3ok")))
    bad = drmaa_backend.submit(make_request(tmp_path, new_task("ge3bad"),
                                            ["/bin/sh", "-c", "exit 5"]))
    fresh = GridEngineBackend(backend_options("gridengine", mode="drmaa"), NO_WORK_DIR)
    blind = GridEngineBackend(backend_options("gridengine", mode="drmaa",
                                              accounting_file=str(tmp_path / "none")), NO_WORK_DIR)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["qstat", "-j", f"{ok},{bad}"], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert blind.poll([ok])[ok].state == JobState.LOST
        assert fresh.poll([ok])[ok].state in (JobState.LOST, JobState.COMPLETED)
        assert wait_for(fresh, ok, lambda s: s.state != JobState.LOST, 40).state \
            == JobState.COMPLETED
        failed = wait_for(fresh, bad, lambda s: s.state != JobState.LOST, 40)
        assert failed.state == JobState.FAILED and "exit=5" in failed.reason, failed
        assert fresh.recover("ge3bad", tmp_path) == bad  # a qstat zombie, or accounting
        assert blind.poll([ok])[ok].state == JobState.LOST
    finally:
        fresh.close()
        blind.close()
    assert wait_for(drmaa_backend, ok, finished).state == JobState.COMPLETED


def test_cli_mode_one_qstat_per_poll(cli_backend, tmp_path):
    ok = make_request(tmp_path, new_task("ge4ok"))
    ok.worker_argv = ["/bin/sh", "-c", f"echo hi > {ok.task_dir}/out"]
    held_request = make_request(tmp_path, new_task("ge4held"), ["/bin/true"], {"hold": ""})
    ok_id, held = cli_backend.submit(ok), cli_backend.submit(held_request)
    assert cli_backend.recover("ge4held", held_request.task_dir) == held
    for ids in ([held], [ok_id, held, "999999"]):
        calls = cli_backend.runner.calls
        statuses = cli_backend.poll(ids)
        assert cli_backend.runner.calls == calls + 1  # ONE qstat, whatever the number of jobs
    assert statuses[held].state == JobState.PENDING and statuses["999999"].state == JobState.LOST
    # qstat gives no exit status: LOST until the accounting record is flushed, then COMPLETED
    assert wait_for(cli_backend, ok_id, finished).state in (JobState.LOST, JobState.COMPLETED)
    assert (ok.task_dir / "out").read_text() == "hi\n"
    calls = cli_backend.runner.calls
    done = wait_for(cli_backend, ok_id, lambda s: s.state != JobState.LOST, 40)
    assert done.state == JobState.COMPLETED and done.reason == "accounting: failed=0 exit=0"
    assert cli_backend.recover("ge4ok", tmp_path) == ok_id  # zombie in qstat, or accounting
    polls = cli_backend.runner.calls - calls
    assert polls >= 1 and cli_backend.poll([ok_id])[ok_id] == done  # remembered: no call
    assert cli_backend.runner.calls - calls == polls
    cli_backend.cancel(held)
    assert cli_backend.poll([held])[held].state == JobState.CANCELLED
    cli_backend.cancel(held)
    cli_backend.cancel("999999")
    assert cli_backend.recover("nosuchtask", tmp_path) is None


def test_cli_mode_cancel_running(cli_backend, tmp_path):
    busy = cli_backend.submit(make_request(tmp_path, new_task("ge5"), ["/bin/sleep", "120"]))
    wait_for(cli_backend, busy, running)
    cli_backend.cancel(busy)
    assert cli_backend.poll([busy])[busy].state == JobState.CANCELLED
    deadline = time.monotonic() + 30
    while subprocess.run(["qstat", "-j", busy], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "qdel did not remove the job"
        time.sleep(0.5)


def test_setup_script_is_idempotent(gridengine):
    done = subprocess.run(["bash", str(REPO / "scripts/setup/50-gridengine.sh")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Grid Engine ready" in done.stdout


IN_FLIGHT = 500


def test_poll_of_500_held_jobs_one_qstat_one_drmaa_request(cli_backend, drmaa_backend,
                                                           tmp_path):
    """Issue #5: one scheduler call per poll per 100 jobs or fewer, at 500 in-flight jobs.
    cli: ONE qstat. drmaa: ONE helper request and no command (DRMAA has no batch status
    call, so the helper makes one in-process jobStatus library call per job)."""
    ids: list[str] = []
    try:
        with ThreadPoolExecutor(4) as pool:  # cli_backend.parallel_submit: qsub at once
            ids = list(pool.map(lambda i: cli_backend.submit(make_request(
                tmp_path, new_task(f"ge500x{i:04d}"), ["/bin/true"], {"hold": ""})),
                range(IN_FLIGHT)))
        calls = cli_backend.runner.calls
        statuses = cli_backend.poll(ids)
        assert cli_backend.runner.calls == calls + 1
        assert {statuses[j].state for j in ids} == {JobState.PENDING}
        requests, commands = drmaa_backend.agent.requests, drmaa_backend.runner.calls
        statuses = drmaa_backend.poll(ids)  # jobs of another session: DRMAA still sees them
        assert drmaa_backend.agent.requests == requests + 1
        assert drmaa_backend.runner.calls == commands
        assert {statuses[j].state for j in ids} == {JobState.PENDING}
        assert all(statuses[j].reason == "drmaa: user_on_hold" for j in ids)
    finally:
        if ids:
            subprocess.run(["qdel", ",".join(ids)], capture_output=True)
