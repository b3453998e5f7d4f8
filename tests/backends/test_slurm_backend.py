"""Slurm backend: output parsing with a fake runner, then the real single-node cluster in
both modes (slurm_mode: cli, and rest through the real slurmrestd); ssh is CLI mode's own."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from funnel_hpc.backends.base import BackendError, JobState, JobStatus
from funnel_hpc.backends.commands import LocalRunner, Result, SSHRunner, make_runner
from funnel_hpc.backends.slurm import STATE_MAP, SlurmBackend, exit_code, map_state, parse_job_id
from tests.backend_helpers import (
    NO_WORK_DIR,
    FakeRunner,
    backend_options,
    make_request,
    ssh_options,
)
from tests.slurm_rest_helpers import scheduler_calls
from tests.waiting import wait_for

NO_ACCOUNTING = Result(1, "", "sacct: error: Slurm accounting storage is disabled\n")
SQUEUE = ("10|RUNNING|0|None\n"
          "11|FAILED|768|NonZeroExitCode\n"
          "12|PENDING|0|BeginTime\n"
          "13|CANCELLED|15|None\n"
          "99|RUNNING|0|None\n")  # someone else's job of this user: ignored


def fake_backend(answers: dict) -> tuple[SlurmBackend, FakeRunner]:
    backend = SlurmBackend(backend_options("slurm"), NO_WORK_DIR)
    backend.runner = FakeRunner(answers)
    return backend, backend.runner


# ---- parsing, no Slurm needed ----

def test_state_map_and_parsing():
    assert map_state("CANCELLED by 0") == JobState.CANCELLED
    assert map_state("OUT_OF_MEMORY") == JobState.FAILED
    assert map_state("COMPLETING") == JobState.RUNNING
    assert map_state("WEIRD") == JobState.UNKNOWN and map_state("") == JobState.UNKNOWN
    # held after its launch failed (seen on 22.05 under load): waits for an admin forever
    assert map_state("PENDING", "launch failed requeued held") == JobState.NODE_FAILED
    assert map_state("PENDING", "Resources") == JobState.PENDING
    assert all(isinstance(v, JobState) for v in STATE_MAP.values())
    assert parse_job_id("123\n") == "123" and parse_job_id("456;cluster") == "456"
    assert exit_code("768") == "3:0" and exit_code("15") == "0:15" and exit_code("N/A") == "N/A"
    for text in ("sbatch: error: nope", "", "abc;x"):
        with pytest.raises(BackendError):
            parse_job_id(text)


def test_poll_parses_one_squeue_and_marks_unknown_jobs_lost():
    backend, runner = fake_backend({("squeue",): Result(0, SQUEUE, ""),
                                    ("sacct",): NO_ACCOUNTING})
    statuses = backend.poll(["10", "11", "12", "13", "14"])
    assert {k: v.state for k, v in statuses.items()} == {
        "10": JobState.RUNNING, "11": JobState.FAILED, "12": JobState.PENDING,
        "13": JobState.CANCELLED, "14": JobState.LOST}
    assert statuses["11"].reason == "squeue: FAILED exit=3:0 reason=NonZeroExitCode"
    assert "no accounting" in statuses["14"].reason
    assert runner.calls == 2  # squeue + the one-time accounting probe
    backend.poll(["10", "14"])
    assert runner.calls == 3
    assert [c[0] for c in runner.commands] == ["squeue", "sacct", "squeue"]
    assert backend.poll([]) == {} and runner.calls == 3


def test_poll_asks_sacct_once_for_jobs_gone_from_squeue():
    sacct = Result(0, "14|COMPLETED|0:0|None\n15|CANCELLED by 0|0:15|None\n", "")
    backend, runner = fake_backend({("squeue",): Result(0, SQUEUE, ""), ("sacct",): sacct})
    statuses = backend.poll(["10", "14", "15", "16"])
    assert statuses["14"].state == JobState.COMPLETED
    assert statuses["15"].state == JobState.CANCELLED
    assert statuses["15"].reason == "sacct: CANCELLED by 0 exit=0:15 reason=None"
    assert statuses["16"].state == JobState.LOST and "not in sacct" in statuses["16"].reason
    assert runner.commands[-1][-2:] == ["-j", "14,15,16"]
    calls = runner.calls
    backend.poll(["10", "14", "15", "16"])
    assert runner.calls - calls == 2  # squeue + sacct, probe cached


def test_scheduler_failures_are_unknown_not_lost():
    down = Result(1, "", "slurm_load_jobs error: Unable to contact slurm controller\n")
    backend, _ = fake_backend({("squeue",): down})
    statuses = backend.poll(["1", "2"])
    assert all(s.state == JobState.UNKNOWN for s in statuses.values())
    assert "Unable to contact" in statuses["1"].reason
    backend, _ = fake_backend({("squeue",): Result(0, "", ""),
                               ("sacct", "-n", "-X", "-P", "-o", "JobID", "-j", "1"):
                                   Result(0, "", ""),
                               ("sacct",): Result(1, "", "sacct: error: slurmdbd down")})
    assert backend.poll(["1"])["1"].state == JobState.UNKNOWN


def test_submit_and_cancel_with_fake_runner(tmp_path):
    backend, runner = fake_backend({("sbatch",): Result(0, "77;lab\n", ""),
                                    ("scancel",): Result(1, "", "scancel: error: Kill job error "
                                                         "on job id 5: Invalid job id specified")})
    request = make_request(tmp_path, {"id": "s1"}, ["/bin/echo", "hi there"])
    assert backend.submit(request) == "77"
    assert runner.commands[0] == ["sbatch", "--parsable"]
    script = (tmp_path / "s1" / "slurm.sh").read_text()
    assert script.startswith("#!/bin/bash\n") and script.endswith("exec /bin/echo 'hi there'\n")
    backend.cancel("5")  # already gone: not an error
    backend.runner = FakeRunner({("sbatch",): Result(1, "", "sbatch: error: invalid partition")})
    with pytest.raises(BackendError, match="invalid partition"):
        backend.submit(request)


def test_rest_mode_poll_and_recover_from_one_jobs_list(tmp_path):
    """REST mode over canned jobs-list rows: one list per poll, element rows as squeue -r,
    a job missing from the list LOST (no sacct), a failed list UNKNOWN; recover by name."""
    from funnel_hpc.backends import arrays
    from funnel_hpc.backends.slurm_link import RestLink
    from funnel_hpc.backends.slurm_rest_jobs import JobRow
    from tests.slurm_rest_helpers import CannedRest

    listed = arrays.write(tmp_path, ["t0", "t1"])
    rows = [JobRow("70_0", "COMPLETED", "0:0", "None", listed.job_name, "root"),
            JobRow("70_1", "FAILED", "3:0", "NonZeroExitCode", listed.job_name, "root"),
            JobRow("71", "PENDING", "0:0", "PartitionConfig", "funnel-solo", "root"),
            JobRow("69", "COMPLETED", "0:0", "None", "funnel-solo", "root")]
    rest = CannedRest(rows)
    backend = SlurmBackend(backend_options("slurm", mode="rest"), tmp_path)
    backend.link = RestLink(rest, backend.runner)  # type: ignore[arg-type]
    statuses = backend.poll(["70_0", "70_1", "71", "72"])
    assert {j: s.state for j, s in statuses.items()} == {
        "70_0": JobState.COMPLETED, "70_1": JobState.FAILED, "71": JobState.UNRUNNABLE,
        "72": JobState.LOST}
    assert statuses["70_1"].reason == "slurmrestd: FAILED exit=3:0 reason=NonZeroExitCode"
    assert "no accounting in REST mode" in statuses["72"].reason
    assert rest.calls == 1 and backend.runner.calls == 0
    assert backend.recover("t1", tmp_path / "t1") == "70_1"
    assert backend.recover("solo", tmp_path / "solo") == "71"  # the newest of the name
    assert backend.recover("none", tmp_path / "none") is None
    backend.cancel("70_1")
    assert rest.canceled == ["70_1"] and backend.runner.calls == 0
    rest.answer = BackendError("slurmrestd jobs failed (500): down", transient=True)
    assert all(s.state == JobState.UNKNOWN and s.reason.startswith("slurmrestd")
               for s in backend.poll(["70_0", "71"]).values())
    with pytest.raises(BackendError) as raised:
        backend.recover("solo", tmp_path / "solo")
    assert raised.value.transient
    # the task lists' sweep asks the same jobs list which array names are still there
    assert backend.link.live_names(["funnel-solo", "funnel-array-gone"]) is None
    rest.answer = rows
    assert backend.link.live_names(["funnel-solo", "funnel-array-gone"]) == {"funnel-solo"}


def test_runners():
    runner = make_runner(ssh_options(host=""), timeout=0.5)
    assert isinstance(runner, LocalRunner)
    rc, out, err = runner.run(["/bin/sh", "-c", "cat; echo \"$1\"", "sh", "$(x) ;"], input="in\n")
    assert (rc, out) == (0, "in\n$(x) ;\n")
    assert runner.run(["no-such-command-here"]).returncode == 127
    assert runner.run(["sleep", "5"]).returncode == 124
    assert runner.calls == 3
    assert isinstance(make_runner(ssh_options(host="login1", user="u", port=2222)), SSHRunner)


# ---- real Slurm ----

def wait(backend: SlurmBackend, job_id: str, states: set[JobState], timeout: float = 60.0):
    last: list[JobStatus] = []

    def reached() -> JobStatus | None:
        status = backend.poll([job_id])[job_id]
        last[:] = [status]
        return status if status.state in states else None

    return wait_for(reached, timeout, f"job {job_id} to reach {states}", interval=0.5,
                    detail=lambda: f"last seen: {last[0] if last else None}")


def real(mode: str, **extra: object) -> SlurmBackend:
    return SlurmBackend(backend_options("slurm", mode=mode, **extra), NO_WORK_DIR)


@pytest.mark.slurm
def test_real_complete_fail_cancel_and_lost(tmp_path, slurm_mode):
    backend = real(slurm_mode)
    done = make_request(tmp_path, {"id": "ok1"}, ["/bin/sh", "-c", f"echo hi > {tmp_path}/ok1/out"])
    job = backend.submit(done)
    status = wait(backend, job, {JobState.COMPLETED, JobState.FAILED})
    assert status.state == JobState.COMPLETED, status
    assert (tmp_path / "ok1" / "out").read_text() == "hi\n"
    assert (tmp_path / "ok1" / "slurm.sh").exists()

    bad = backend.submit(make_request(tmp_path, {"id": "bad1"}, ["/bin/sh", "-c", "exit 3"]))
    status = wait(backend, bad, {JobState.FAILED, JobState.COMPLETED})
    assert status.state == JobState.FAILED
    assert "FAILED" in status.reason and "exit=3:0" in status.reason
    assert status.reason.startswith("squeue: " if slurm_mode == "cli" else "slurmrestd: ")

    pending = backend.submit(make_request(tmp_path, {"id": "pend1"}, ["/bin/true"],
                                          params={"begin": "now+1hour"}))
    status = backend.poll([pending])[pending]
    assert status.state == JobState.PENDING and "BeginTime" in status.reason
    backend.cancel(pending)
    assert wait(backend, pending, {JobState.CANCELLED}).state == JobState.CANCELLED

    running = backend.submit(make_request(tmp_path, {"id": "run1"}, ["/bin/sleep", "60"]))
    wait(backend, running, {JobState.RUNNING})
    backend.cancel(running)
    assert wait(backend, running, {JobState.CANCELLED}).state == JobState.CANCELLED
    backend.cancel(running)  # again: no error

    behind = backend.submit(make_request(tmp_path, {"id": "beh1"}, ["/bin/sleep", "60"]))
    wait(backend, behind, {JobState.RUNNING})
    subprocess.run(["scancel", behind], check=True)  # behind the backend's back
    assert wait(backend, behind, {JobState.CANCELLED}).state == JobState.CANCELLED

    lost = backend.poll(["99999999"])["99999999"]
    assert lost.state == JobState.LOST and "no longer knows" in lost.reason
    assert backend.recover("pend1", tmp_path / "pend1") == pending
    assert backend.recover("never-submitted", tmp_path) is None
    backend.close()


@pytest.mark.slurm
def test_real_refusal_is_a_backend_error(tmp_path, slurm_mode):
    backend = real(slurm_mode)
    request = make_request(tmp_path, {"id": "nopart", "resources": {"zones": ["no-such-part"]}})
    said = "sbatch failed" if slurm_mode == "cli" else "slurmrestd submit failed"
    with pytest.raises(BackendError, match=said) as info:
        backend.submit(request)
    assert getattr(info.value, "transient", False) is False


@pytest.mark.slurm
def test_poll_costs_constant_scheduler_calls(tmp_path, slurm_mode):
    """CLI mode: one squeue per poll. REST mode: one GET per poll, and no process at all
    for submit, poll, cancel and withdraw."""
    backend = real(slurm_mode)
    backend.accounting_enabled()  # probed once, then cached
    forks = backend.runner.calls
    jobs = [backend.submit(make_request(tmp_path, {"id": f"many{i}"}, ["/bin/true"],
                                        params={"begin": "now+1hour"})) for i in range(40)]
    try:
        costs = []
        for n in (1, 10, 40):
            before = scheduler_calls(backend)
            statuses = backend.poll(jobs[:n] + ["99999999"])  # plus one unknown id
            after = scheduler_calls(backend)
            costs.append((after[0] - before[0], after[1] - before[1]))
            assert len(statuses) == n + 1
            assert all(statuses[j].state == JobState.PENDING for j in jobs[:n]), statuses
            assert statuses["99999999"].state == JobState.LOST
        assert costs == ([(1, 0)] * 3 if slurm_mode == "cli" else [(0, 1)] * 3)
        backend.cancel(jobs[0])
        backend.withdraw(jobs[1])
        assert wait(backend, jobs[1], {JobState.CANCELLED}).state == JobState.CANCELLED
        if slurm_mode == "rest":
            assert backend.runner.calls == forks == 0  # submit, poll, cancel, withdraw
    finally:
        subprocess.run(["scancel", *jobs])
        backend.close()


@pytest.mark.slurm
def test_remote_mode_over_ssh(tmp_path, slurm, sshd):
    backend = SlurmBackend(backend_options("slurm", ssh=sshd), NO_WORK_DIR)
    assert isinstance(backend.runner, SSHRunner)
    job = backend.submit(make_request(tmp_path, {"id": "ssh1"},
                                      ["/bin/sh", "-c", f"echo via-ssh > {tmp_path}/ssh1/out"]))
    assert wait(backend, job, {JobState.COMPLETED}).state == JobState.COMPLETED
    assert (tmp_path / "ssh1" / "out").read_text() == "via-ssh\n"
    held = backend.submit(make_request(tmp_path, {"id": "ssh2"}, ["/bin/true"],
                                       params={"begin": "now+1hour"}))
    calls = backend.runner.calls
    assert backend.poll([job, held])[held].state == JobState.PENDING
    assert backend.runner.calls - calls == 1
    backend.cancel(held)
    assert wait(backend, held, {JobState.CANCELLED}).state == JobState.CANCELLED
    # arguments with spaces and shell syntax reach the remote command as single words
    rc, out, _ = backend.runner.run(["printf", "%s|", "a b", "$(id)", "';"])
    assert (rc, out) == (0, "a b|$(id)|';|")
    backend.close()


def test_ssh_refuses_unknown_host_key(tmp_path, sshd):
    (tmp_path / "empty_known_hosts").write_text("")
    runner = SSHRunner(sshd["host"], sshd["user"], sshd["port"], sshd["key_file"],
                       timeout=10, known_hosts=str(tmp_path / "empty_known_hosts"))
    result = runner.run(["true"])
    assert result.returncode == 255 and "ssh" in result.stderr


@pytest.mark.slurm
def test_real_hostile_task_runs_with_arguments_verbatim(tmp_path, slurm_mode):
    """Through sbatch for real: the hostile values neither add directives nor reach a shell."""
    import json
    import sys

    from tests.templating_helpers import HOSTILE, HOSTILE_ARGS, task

    backend = real(slurm_mode)
    out = tmp_path / "abc123" / "argv.json"
    printer = f"import json, sys; open({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))"
    args = [a.replace("\x00", "") for a in HOSTILE_ARGS]
    hostile = {**task(HOSTILE, HOSTILE), "resources": {"cpu_cores": 1}}
    job = backend.submit(make_request(tmp_path, hostile, [sys.executable, "-c", printer, *args]))
    status = wait(backend, job, {JobState.COMPLETED, JobState.FAILED})
    assert status.state == JobState.COMPLETED, (status, (tmp_path / "abc123" / "slurm.err")
                                                 .read_text())
    assert json.loads(out.read_text()) == args
    assert not Path("/tmp/pwned").exists()
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True)
    assert "wrap" not in shown.stdout.lower() and "JobName=funnel-abc123" in shown.stdout
