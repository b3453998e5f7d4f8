"""PBS backend (OpenPBS / PBS Professional) tests, against a scheduler double.

No PBS server can be installed on these machines (Debian 12 has no OpenPBS or PBS Pro
package, and OpenPBS's own packages are not reachable), so no test here talks to a real
PBS server. They run the backend, through its real command runner, against fake
``qsub``/``qstat``/``qdel``/``qselect`` executables first on PATH
(``tests/pbs_helpers.py``) that answer from recorded ``qstat -f -F json`` documents
(``tests/data/pbs/``, written by hand in the shape OpenPBS 20-23 prints: see its README)
and record every argv and every script qsub was given, which the tests check line by line.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from funnel_hpc.backends.base import BackendError, JobState
from funnel_hpc.backends.commands import Result
from funnel_hpc.backends.pbs import PbsBackend, job_header
from funnel_hpc.backends.pbs_qstat import EXEC_CODES, STATE_MAP
from funnel_hpc.backends.registry import backend_class, load_backend
from funnel_hpc.core import config as config_mod
from tests.backend_helpers import NO_WORK_DIR, FakeRunner, backend_options, make_request
from tests.cli_helpers import funnel
from tests.pbs_helpers import SERVER, FakePbs

WORKER = ["/opt/funnel/bin/python", "-m", "funnel_hpc.worker", "run",
          "--task-file", "/srv/w/t/task.json", "--config", "/srv/w/worker config.json"]
DOWN = "qstat: cannot connect to server pbs-head (errno=111)\n"


def make_backend(**options) -> PbsBackend:
    return PbsBackend(backend_options("pbs", **options), NO_WORK_DIR)


def task(task_id: str = "c0ffee0000000001", name: str = "align", **resources) -> dict:
    return {"id": task_id, "name": name, "resources": resources,
            "executors": [{"image": "busybox", "command": ["true"]}]}


def recorded(seq: int) -> str:
    return f"{seq}.{SERVER}"


# ---- configuration and registry ----

def test_pbs_registry_instance_and_allow_list():
    assert backend_class("pbs") is PbsBackend and PbsBackend.kind == "pbs"
    instance = config_mod.Instance(name="hpc", kind="pbs",
                                   options=backend_options("pbs", queue="long"))
    backend = load_backend(instance, NO_WORK_DIR)
    assert isinstance(backend, PbsBackend) and backend.name == "hpc"
    assert backend.supported_parameters == {"project", "priority", "account"}
    assert backend.job_output_files == ("pbs.out", "pbs.err")


def test_pbs_options_are_checked_at_start():
    for walltime in ("2h", "1:00:00\n", "-5", "1:2:3:4"):
        with pytest.raises(ValueError, match="walltime"):
            make_backend(walltime=walltime)
    for walltime in ("3600", "30:00", "48:00:00"):
        assert make_backend(walltime=walltime).options.walltime == walltime
    with pytest.raises(ValueError, match="max_ids_per_qstat"):
        make_backend(max_ids_per_qstat=0)
    with pytest.raises(config_mod.ConfigError, match="backend.pbs.command_timeout"):
        config_mod.load(environ={}, overrides={"backend": {"pbs": {"command_timeout": "x"}}})


# ---- submit: every qsub argument and script line ----

def test_pbs_submit_script_lines_and_qsub_argv(fake_pbs, tmp_path):
    backend = make_backend(walltime="02:00:00", site={
        "account": "acct1", "extra_directives": ["-m n"], "modules": ["gcc/12"],
        "prologue": ["ulimit -c 0"]})
    request = make_request(tmp_path, task(cpu_cores=2, ram_gb=1.5, zones=["long", "short"]),
                           WORKER, {"project": "bio42", "priority": "10", "nosuch": "x"})
    job_id = backend.submit(request)
    assert job_id == "2025.pbs-head"  # one more than the recorded jobs'
    (call,) = fake_pbs.calls("qsub")
    path = request.task_dir / "pbs.sh"
    assert call["argv"] == ["qsub", str(path)]
    assert call["mode"] == 0o700 and call["script"] == path.read_text()
    directory = str(request.task_dir)
    assert call["script"].splitlines() == [
        "#!/bin/bash",
        "#PBS -N funnel-c0ffee0000000001",
        f"#PBS -o {directory}/pbs.out",
        f"#PBS -e {directory}/pbs.err",
        "#PBS -S /bin/bash",
        "#PBS -r n",
        "#PBS -l select=1:ncpus=2:mem=1536mb",
        "#PBS -l walltime=02:00:00",
        "#PBS -q long",
        "#PBS -A acct1",
        "#PBS -p 10",
        "#PBS -P bio42",
        "#PBS -m n",
        "set -eo pipefail",
        f"cd {directory}",
        "export FUNNEL_TASK_ID=c0ffee0000000001 FUNNEL_TASK_NAME=align",
        "module load gcc/12",
        "ulimit -c 0",
        ("exec /opt/funnel/bin/python -m funnel_hpc.worker run --task-file /srv/w/t/task.json"
         " --config '/srv/w/worker config.json'"),
    ]
    assert job_header(call["script"])[0] == "#PBS -N funnel-c0ffee0000000001"
    assert fake_pbs.jobs()[job_id]["Job_Name"] == "funnel-c0ffee0000000001"
    assert backend.poll([job_id])[job_id].state is JobState.PENDING


def test_pbs_submit_defaults_leave_out_what_is_not_asked(fake_pbs, tmp_path):
    backend = make_backend()
    backend.submit(make_request(tmp_path, task(), WORKER))
    header = job_header(fake_pbs.calls("qsub")[0]["script"])
    assert header[-1] == "#PBS -l select=1:ncpus=1"  # no mem, walltime, queue, account
    assert make_backend(queue="workq").render_script(
        make_request(tmp_path, task(), WORKER)).count("#PBS -q workq") == 1


def hostile_tasks() -> list[tuple[dict, dict]]:
    """(task, backend_parameters) that must be refused before any qsub."""
    injected = "workq\n#PBS -W depend=afterok:1"
    return [(task(zones=[injected]), {}), (task(zones=["a b"]), {}),
            (task(zones=["a;b"]), {}), (task(zones=["$(id)"]), {}),
            (task(zones=["a\rb"]), {}), (task(zones=["q\x00"]), {}),
            (task(), {"project": "x\n#PBS -l select=999:ncpus=64"}),
            (task(), {"project": "a b"}), (task(), {"account": "$(touch /tmp/pwned)"}),
            (task(), {"priority": "1`id`"}), (task(), {"project": "#PBS"})]


def test_pbs_hostile_values_are_refused_before_qsub(fake_pbs, tmp_path):
    backend = make_backend()
    for hostile, params in hostile_tasks():
        with pytest.raises(BackendError, match="cannot render the PBS script") as raised:
            backend.submit(make_request(tmp_path, hostile, WORKER, params))
        assert not raised.value.transient  # the task is wrong: it fails, not retried
    assert fake_pbs.calls() == []


def test_pbs_hostile_names_tags_and_argv_never_make_a_line(fake_pbs, tmp_path):
    backend = make_backend()
    plain = backend.render_script(make_request(tmp_path, task(), WORKER))
    name = "x\n#PBS -l select=64:ncpus=128\n$(touch /tmp/pwned); `id` 'q\" \\"
    hostile = {**task(name=name), "tags": {"k\n#PBS -q vip": "v\n#PBS -W x"},
               "description": "\n#PBS -u root"}
    argv = ["/opt/my funnel/python", "it's", "a\nb", "$(id)", "--", "#PBS -q vip"]
    backend.submit(make_request(tmp_path, hostile, argv))
    script = fake_pbs.calls("qsub")[0]["script"]
    assert job_header(script) == job_header(plain)  # nothing of the task in the header
    assert [line for line in script.splitlines() if "#PBS" in line] == job_header(plain) \
        + [script.splitlines()[-1]]  # and only the exec line quotes "#PBS", as one word
    (named,) = [line for line in script.splitlines() if "FUNNEL_TASK_NAME" in line]
    assert named.endswith("FUNNEL_TASK_NAME=x__PBS_-l_select_64_ncpus_128___touch__tmp_"
                          "pwned____id___q___")
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    # the exec line gives the worker exactly its argv, through a real bash
    exec_line = script.splitlines()[-1]
    assert exec_line.startswith("exec ")
    printed = subprocess.run(["bash", "-c", "printf '%s\\0' " + exec_line[5:]],
                             capture_output=True, check=True).stdout
    assert printed.decode().split("\0")[:-1] == argv


# ---- poll: one qstat, every state of the table ----

EXPECTED = {
    2001: JobState.PENDING, 2002: JobState.PENDING, 2003: JobState.UNRUNNABLE,
    2004: JobState.PENDING, 2005: JobState.PENDING, 2006: JobState.RUNNING,
    2007: JobState.RUNNING, 2008: JobState.RUNNING, 2009: JobState.RUNNING,
    2010: JobState.LOST, 2011: JobState.COMPLETED, 2012: JobState.FAILED,
    2013: JobState.FAILED, 2014: JobState.FAILED, 2015: JobState.NODE_FAILED,
    2016: JobState.CANCELLED, 2017: JobState.CANCELLED, 2018: JobState.FAILED,
    2019: JobState.NODE_FAILED, 2020: JobState.PREEMPTED, 2021: JobState.COMPLETED,
    2022: JobState.FAILED, 2023: JobState.UNKNOWN, 2024: JobState.COMPLETED,
}


def test_pbs_poll_maps_every_recorded_state_with_one_qstat(fake_pbs):
    ids = [recorded(seq) for seq in EXPECTED] + ["9999.pbs-head", "2006.pbs-head.example"]
    statuses = make_backend().poll([*ids, "not-a-job-id", ids[0]])
    (argv,) = fake_pbs.argv("qstat")
    assert argv == ["qstat", "-f", "-F", "json", "-x", *ids]
    assert {job_id: statuses[job_id].state for job_id in ids[:len(EXPECTED)]} == \
        {recorded(seq): state for seq, state in EXPECTED.items()}
    assert statuses["9999.pbs-head"].state is JobState.LOST
    assert "Unknown Job Id" in statuses["9999.pbs-head"].reason
    assert statuses["2006.pbs-head.example"].state is JobState.RUNNING  # same sequence
    assert statuses["not-a-job-id"].state is JobState.LOST
    reasons = {seq: statuses[recorded(seq)].reason for seq in EXPECTED}
    assert reasons[2001].startswith("qstat: Q comment=Not Running: Insufficient amount")
    assert "system hold" in reasons[2003] and "too many failed attempts" in reasons[2003]
    assert reasons[2012].startswith("qstat: F exit=3")
    assert "killed by signal 9" in reasons[2013]
    assert "JOB_EXEC_KILL_WALLTIME" in reasons[2014]
    assert "JOB_EXEC_RERUN_MS_FAIL" in reasons[2015]
    assert "deleted (qdel), exit=271" in reasons[2016]
    assert "no exit status" in reasons[2018]
    assert "a PBS exec failure" in reasons[2022]
    assert reasons[2023].startswith("qstat: Z")


def test_pbs_state_tables_are_data():
    assert set(STATE_MAP) == set("QHWTREBSUM")
    assert set(EXEC_CODES) == set(range(-30, 0)) - {-8, -9}  # -8, -9: Globus, gone
    assert {state for state, _ in EXEC_CODES.values()} == {
        JobState.FAILED, JobState.NODE_FAILED, JobState.PREEMPTED}


def test_pbs_poll_of_many_jobs_is_one_qstat_per_chunk(fake_pbs):
    ids = [f"{seq}.{SERVER}" for seq in range(5001, 5501)]
    statuses = make_backend().poll(ids)
    assert len(fake_pbs.argv("qstat")) == 1
    assert {s.state for s in statuses.values()} == {JobState.LOST} and len(statuses) == 500
    chunked = make_backend(max_ids_per_qstat=200).poll([*ids, recorded(2006)])
    calls = fake_pbs.argv("qstat")[1:]
    assert [len(argv) - 5 for argv in calls] == [200, 200, 101]
    assert chunked[recorded(2006)].state is JobState.RUNNING and len(chunked) == 501


def test_pbs_poll_never_raises_and_says_why(fake_pbs, monkeypatch):
    ids = [recorded(2006), recorded(2011)]
    fake_pbs.fail("qstat", 1, DOWN)
    statuses = make_backend().poll(ids)
    assert {s.state for s in statuses.values()} == {JobState.UNKNOWN}
    assert "cannot connect to server" in statuses[ids[0]].reason
    fake_pbs.fail("qstat", 0, "", stdout='{"Jobs": {"2006.pbs-head": ')
    statuses = make_backend().poll(ids)
    assert {s.state for s in statuses.values()} == {JobState.UNKNOWN}
    assert "unreadable JSON" in statuses[ids[0]].reason
    # every id unknown: PBS prints the document without "Jobs", exit 153
    none = json.loads((Path(__file__).parents[1] / "data/pbs/qstat-none.json").read_text())
    fake_pbs.fail("qstat", 153, "qstat: Unknown Job Id 2006.pbs-head\n"
                                "qstat: Unknown Job Id 2011.pbs-head\n", json.dumps(none))
    assert {s.state for s in make_backend().poll(ids).values()} == {JobState.LOST}
    # a failure that names some ids: those are LOST, the rest UNKNOWN (not a guess)
    fake_pbs.fail("qstat", 153, "qstat: Unknown Job Id 2006.pbs-head\n" + DOWN)
    statuses = make_backend().poll(ids)
    assert statuses[ids[0]].state is JobState.LOST
    assert statuses[ids[1]].state is JobState.UNKNOWN
    monkeypatch.setenv("PATH", "/nonexistent")
    statuses = make_backend().poll(ids)
    assert statuses[ids[0]].state is JobState.UNKNOWN and "(127)" in statuses[ids[0]].reason


def test_pbs_contract_poll_never_raises_on_odd_answers():
    """The contract of backends/base.py (tests/backends/test_contract.py style, a fake
    runner): whatever qstat prints, every id gets a status and nothing is raised."""
    ids = ["1.s", "2.s"]
    for rc, stdout in ((0, "[]"), (0, '{"Jobs": []}'), (0, '{"Jobs": {"1.s": "R"}}'),
                       (0, "[" * 100_000), (0, "\x00\xff"), (153, "{"),
                       (0, '{"Jobs": {"1.s": {"job_state": 5, "Exit_status": "x"}}}'),
                       (0, '{"Jobs": {"1.s": {"job_state": "F", "Exit_status": [1]}}}')):
        backend = make_backend()
        backend.runner = FakeRunner({("qstat",): Result(rc, stdout, "")})
        statuses = backend.poll(ids)
        assert set(statuses) == set(ids), stdout[:40]
        assert backend.runner.calls == 1
    backend.runner = FakeRunner({("qstat",): Result(0, '{"Jobs": {"1.s": {"job_state": 5}}}',
                                                    "")})
    assert backend.poll(ids)["1.s"].state is JobState.UNKNOWN
    assert backend.poll(ids)["2.s"].state is JobState.LOST  # answered, and not listed


# ---- cancel ----

def test_pbs_cancel_is_idempotent(fake_pbs, tmp_path):
    backend = make_backend()
    job_id = backend.submit(make_request(tmp_path, task(), WORKER))
    fake_pbs.set_job(job_id, job_state="R", substate=42)
    backend.cancel(job_id)
    assert fake_pbs.argv("qdel") == [["qdel", job_id]]
    status = backend.poll([job_id])[job_id]
    assert status.state is JobState.CANCELLED and "exit=271" in status.reason
    backend.cancel(job_id)                 # qdel: Job has finished (35)
    backend.cancel("9999.pbs-head")        # qdel: Unknown Job Id (153)
    backend.cancel("1;rm -rf /")           # not a job id: no qdel at all
    assert len(fake_pbs.argv("qdel")) == 3
    fake_pbs.fail("qdel", 1, "qdel: cannot connect to server pbs-head (errno=111)\n")
    with pytest.raises(BackendError, match=r"qdel 2006.pbs-head failed \(1\)") as raised:
        backend.cancel(recorded(2006))
    assert raised.value.transient
    fake_pbs.fail("qdel", 159, "qdel: Unauthorized Request  2006.pbs-head\n")
    with pytest.raises(BackendError) as raised:
        backend.cancel(recorded(2006))
    assert not raised.value.transient


# ---- recover ----

def test_pbs_recover_finds_our_newest_job_by_name(fake_pbs, tmp_path):
    backend = make_backend()
    request = make_request(tmp_path, task("0b0000000000000001"), WORKER)
    first, second = backend.submit(request), backend.submit(request)
    assert backend.recover("0b0000000000000001", request.task_dir) == second != first
    assert fake_pbs.argv("qselect")[-1] == ["qselect", "-x", "-u", getpass.getuser(),
                                            "-N", "funnel-0b0000000000000001"]
    backend.cancel(second)  # finished jobs are found too (-x)
    assert backend.recover("0b0000000000000001", request.task_dir) == second
    assert backend.recover("0b00000000000000ff", request.task_dir) is None
    # the recorded funnel-0a...02 jobs are another user's: never adopted
    assert backend.recover("0a0000000000000002", request.task_dir) is None


def test_pbs_recover_newest_of_recorded_jobs_and_outage(tmp_path, monkeypatch):
    fake = FakePbs(tmp_path / "own", owner=getpass.getuser())
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    backend = make_backend()
    assert backend.recover("0a0000000000000002", tmp_path) == recorded(2024)
    for rc, words in ((1, "qselect: cannot connect to server pbs-head (errno=111)\n"),
                      (2, "qselect: something unexpected\n")):
        fake.fail("qselect", rc, words)
        with pytest.raises(BackendError) as raised:  # could not ask: the job may exist
            backend.recover("0a0000000000000002", tmp_path)
        assert raised.value.transient


# ---- the transient rule (commands.failure) ----

def test_pbs_submit_failures_follow_the_transient_rule(fake_pbs, tmp_path, monkeypatch):
    request = make_request(tmp_path, task(), WORKER)
    for rc, stderr, stdout, transient in (
            (1, "qsub: cannot connect to server pbs-head (errno=111)\n", "", True),
            (15, "Connection refused\nqsub: cannot connect to server\n", "", True),
            (168, "qsub: Unknown queue\n", "", False),
            (188, "qsub: Job violates queue and/or server resource limits\n", "", False),
            (0, "", "garbage\n", False)):
        fake_pbs.fail("qsub", rc, stderr, stdout)
        with pytest.raises(BackendError) as raised:
            make_backend().submit(request)
        assert raised.value.transient is transient, stderr
    fake_pbs.clear()
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BackendError, match=r"qsub failed \(127\)") as raised:
        make_backend().submit(request)
    assert not raised.value.transient and "configuration" in str(raised.value)


def test_pbs_job_output_tails_the_scheduler_files(tmp_path):
    task_dir = tmp_path / "t"
    task_dir.mkdir()
    (task_dir / "pbs.err").write_text("=>> PBS: job killed: walltime 7230 exceeded limit\n")
    assert make_backend().job_output(task_dir) == [
        ("pbs.err", "=>> PBS: job killed: walltime 7230 exceeded limit\n")]


# ---- funnel render ----

def test_funnel_render_for_a_pbs_instance(tmp_path):
    task_file = tmp_path / "t.json"
    task_file.write_text(json.dumps(task(cpu_cores=2)))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"work_dir": str(tmp_path / "work"),
                                      "backends": {"hpc": {"kind": "pbs", "queue": "long"}}}))
    shown = funnel(None, "render", str(task_file), "--config", str(config),
                   "--task-id", "abc123")
    assert shown.returncode == 0, shown.stderr
    assert "#PBS -N funnel-abc123" in shown.stdout and "#PBS -q long" in shown.stdout
    assert "#PBS -l select=1:ncpus=2" in shown.stdout
