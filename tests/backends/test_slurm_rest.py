"""Slurm REST mode against the real slurmrestd 22.05 and the real single-node Slurm: the
client gives the facts squeue gives for the same jobs (states, exit codes, reasons, array
elements), cancels and withdraws as scancel does, and says "transient" exactly when
slurmrestd or slurmctld cannot be reached."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from funnel_hpc.backends.base import BackendError, JobState
from funnel_hpc.backends.slurm import map_state
from funnel_hpc.backends.slurm_rest import SlurmRestClient
from funnel_hpc.backends.slurm_rest_jobs import JobRow
from funnel_hpc.backends.slurm_rest_script import header_lines
from tests.slurm_rest_helpers import (
    Patient,
    PrivateRestd,
    client,
    dead_controller_conf,
    held_ids,
    patient,
    rendered,
    rest_rows,
    scontrol_token,
    squeue_rows,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.slurm

WAIT = 240  # seconds a job may take to start or end on a shared, busy 2-core cluster


def row_of(rest: Patient, job_id: str) -> JobRow:
    row = rest.job(job_id)
    assert row is not None, f"slurmctld does not know {job_id}"
    return row


def states(rest: Patient, wanted: dict[str, set[str]]) -> dict[str, str] | None:
    """The jobs' states once each is in one of its wanted states, else None."""
    rows = {row.job_id: row.state for row in rest.jobs() if row.job_id in wanted}
    if all(rows.get(job_id) in allowed for job_id, allowed in wanted.items()):
        return rows
    return None


def wait_states(rest: Patient, wanted: dict[str, set[str]]) -> dict[str, str]:
    return wait_for(lambda: states(rest, wanted), WAIT, f"jobs to reach {wanted}",
                    interval=1, detail=lambda: rest_rows(rest, set(wanted)))


def job_record(rest: Patient, job_id: str) -> dict:
    return rest.answer("GET", f"job/{job_id}").body["jobs"][0]


def test_discovers_the_newest_version_it_speaks(slurmrestd, tmp_path):
    rest = client()
    assert rest.version == "v0.0.38"  # the daemon serves v0.0.36-v0.0.38
    with PrivateRestd(tmp_path / "v36", plugins="openapi/v0.0.36") as old:
        with pytest.raises(BackendError, match="serves OpenAPI v0.0.36; this client speaks "
                                               "v0.0.38, v0.0.37") as info:
            client(old.socket).discover()
        assert info.value.transient is False
    with PrivateRestd(tmp_path / "v37", plugins="openapi/v0.0.37") as v37:
        older = patient(v37.socket)
        assert older.version == "v0.0.37"
        job = older.submit(rendered(tmp_path, "r37", ["/bin/true"], ("--hold",)))
        try:
            row = next(row for row in older.jobs() if row.job_id == job)
            assert (row.state, row.reason, row.name) == ("PENDING", "JobHeldUser", "funnel-r37")
        finally:
            older.cancel(job)


def test_one_connection_is_kept_across_requests(slurmrestd):
    rest = client()
    for _ in range(10):
        rest.discover()  # /openapi/v3 needs no slurmctld: nothing here may fail
    assert (rest.calls, rest.transport.connects) == (10, 1)
    rest.close()
    rest.discover()
    assert rest.transport.connects == 2


def test_jobs_give_what_squeue_gives_in_one_request(slurmrestd, tmp_path):
    rest = patient()
    echo = ["/bin/sh", "-c", f"echo hi > {tmp_path}/rok1/out"]
    ok = rest.submit(rendered(tmp_path, "rok1", echo))
    bad = rest.submit(rendered(tmp_path, "rbad1", ["/bin/sh", "-c", "exit 3"]))
    running = rest.submit(rendered(tmp_path, "rrun1", ["/bin/sleep", "600"]))
    held = rest.submit(rendered(tmp_path, "rheld1", ["/bin/true"], ("--hold",)))
    later = rest.submit(rendered(tmp_path, "rbeg1", ["/bin/true"], params={"begin": "now+1hour"}))
    ids = {ok, bad, running, held, later}
    try:
        wait_states(rest, {running: {"RUNNING"}})
        rest.cancel(running)
        wait_states(rest, {ok: {"COMPLETED"}, bad: {"FAILED"}, running: {"CANCELLED"}})
        before = rest.calls
        rows = rest_rows(rest, ids)
        assert rest.calls == before + rest.tries  # one GET of the jobs list per try
        assert rows == squeue_rows(ids)
        assert rows[ok] == ("COMPLETED", "0:0", "None")
        assert rows[bad] == ("FAILED", "3:0", "NonZeroExitCode")
        assert rows[running][0] == "CANCELLED"
        assert rows[held] == ("PENDING", "0:0", "JobHeldUser")
        assert rows[later][0] == "PENDING" and rows[later][2] == "BeginTime"
        assert {job: map_state(state, reason) for job, (state, _, reason) in rows.items()} == {
            ok: JobState.COMPLETED, bad: JobState.FAILED, running: JobState.CANCELLED,
            held: JobState.PENDING, later: JobState.PENDING}
        # the header reached slurmctld: the output files and the job's name
        assert (tmp_path / "rok1" / "out").read_text() == "hi\n"
        assert (tmp_path / "rok1" / "slurm.out").exists()
        names = {row.job_id: row.name for row in rest.jobs() if row.job_id in ids}
        assert names[ok] == "funnel-rok1" and names[held] == "funnel-rheld1"
        for job in (ok, running, running, "99999999"):  # ended, twice, unknown: no error
            rest.cancel(job)
    finally:
        for job in ids:
            rest.cancel(job)


def test_an_array_of_seven_is_seven_rows_and_one_element_cancels_alone(slurmrestd, tmp_path):
    rest = patient()
    array = rest.submit(rendered(tmp_path, "rarr7", ["/bin/true"], ("--array=0-6", "--hold")))
    ids = held_ids(array, 7)
    try:
        rows = rest_rows(rest, ids)
        assert set(rows) == ids  # the pending range 0-6 expanded, as squeue -r
        assert set(rows.values()) == {("PENDING", "0:0", "JobHeldUser")}
        assert rows == squeue_rows(ids)
        rest.cancel(f"{array}_3")
        rows = rest_rows(rest, ids)
        assert set(rows) == ids - {f"{array}_3"}  # a pending element leaves no record
        assert rows == squeue_rows(ids)
    finally:
        rest.cancel(array)
    wait_for(lambda: all(state == "CANCELLED" for state, _, _ in rest_rows(rest, ids).values()),
             WAIT, "the array to be cancelled")


def test_array_elements_that_ran_report_their_own_exit(slurmrestd, tmp_path):
    rest = patient()
    array = rest.submit(rendered(tmp_path, "rarr3", ["/bin/sh", "-c", "exit $SLURM_ARRAY_TASK_ID"],
                                 ("--array=0-2",)))
    ids = held_ids(array, 3)
    try:
        wait_states(rest, {f"{array}_0": {"COMPLETED"}, f"{array}_1": {"FAILED"},
                           f"{array}_2": {"FAILED"}})
        rows = rest_rows(rest, ids)
        assert rows == squeue_rows(ids)
        assert rows[f"{array}_2"] == ("FAILED", "2:0", "NonZeroExitCode")
    finally:
        rest.cancel(array)


def test_withdraw_cancels_only_a_job_that_has_not_started(slurmrestd, tmp_path):
    rest = patient()
    waiting = rest.submit(rendered(tmp_path, "rw1", ["/bin/true"], params={"begin": "now+1hour"}))
    running = rest.submit(rendered(tmp_path, "rw2", ["/bin/sleep", "600"]))
    array = rest.submit(rendered(tmp_path, "rw3", ["/bin/true"], ("--array=0-2", "--hold")))
    try:
        assert rest.withdraw(waiting) is True
        assert row_of(rest, waiting).state == "CANCELLED"
        assert rest.withdraw(f"{array}_1") is True  # an element still in the pending range
        assert row_of(rest, f"{array}_0").state == "PENDING"
        wait_states(rest, {running: {"RUNNING"}})
        assert rest.withdraw(running) is False
        row = row_of(rest, running)
        assert row.state == "RUNNING" and "Held" not in row.reason
        assert job_record(rest, running)["priority"] > 0  # the hold was taken back
        assert rest.withdraw(waiting) is False and rest.withdraw("99999999") is False
    finally:
        for job in (waiting, running, array):
            rest.cancel(job)


def test_a_daemon_that_is_down_is_transient_and_a_restart_is_picked_up(slurmrestd, tmp_path):
    daemon = PrivateRestd(tmp_path / "d").start()
    try:
        rest = client(daemon.socket)
        assert rest.jobs() is not None and rest.transport.connects == 1
        daemon.stop()
        for call in (rest.jobs, lambda: rest.submit("#!/bin/bash\ntrue\n"),
                     lambda: rest.cancel("1"), lambda: rest.withdraw("1")):
            with pytest.raises(BackendError, match="unreachable") as info:
                call()
            assert info.value.transient is True
        daemon.start()
        assert rest.jobs() is not None  # a new connection, the version remembered
    finally:
        daemon.stop()


def test_a_controller_that_is_down_is_transient(slurmrestd, tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    with PrivateRestd(folder, conf=dead_controller_conf(folder)) as daemon:
        rest = client(daemon.socket, timeout=120)
        for call in (rest.jobs, lambda: rest.submit("#!/bin/bash\ntrue\n"),
                     lambda: rest.cancel("1")):
            with pytest.raises(BackendError) as info:
                call()
            assert info.value.transient is True, info.value


def test_only_slurmrestds_own_uid_is_served(slurmrestd, tmp_path):
    """rest_auth/local reads the peer's uid: another account gets 401, and the shared
    socket's directory keeps it from even connecting."""
    folder = Path(tempfile.mkdtemp(prefix="rest-", dir="/tmp"))
    try:
        os.chmod(folder, 0o755)
        probe = ("import http.client, socket, sys\n"
                 "c = http.client.HTTPConnection('localhost')\n"
                 "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); c.sock = s\n"
                 "c.request('POST', '/slurm/v0.0.38/job/submit', body='{}')\n"
                 "print(c.getresponse().status)\n")
        with PrivateRestd(folder) as daemon:
            os.chmod(daemon.socket, 0o777)
            done = subprocess.run(["runuser", "-u", "funneltest", "--", "/usr/bin/python3",
                                   "-c", probe, daemon.socket],
                                  capture_output=True, text=True, timeout=120)
            assert done.stdout.strip() == "401", done
        shared = subprocess.run(["runuser", "-u", "funneltest", "--", "/usr/bin/python3", "-c",
                                 probe, slurmrestd], capture_output=True, text=True, timeout=120)
        assert "PermissionError" in shared.stderr, shared
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def job_user(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%u"], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_jwt_over_http_submits_polls_and_cancels_as_the_tokens_user(slurmrestd, tmp_path):
    """rest_auth/jwt end to end (slurmctld with AuthAltTypes=auth/jwt, from
    scripts/setup/30-slurm.sh): with a token of another account, written as `scontrol
    token` prints it, slurmrestd over TCP submits, lists and cancels that account's jobs;
    the file is read again when it changes: a forged token is refused by slurmctld
    (transient: the gateway's credentials, not the task's fault, and said so), and a
    renewed one works again."""
    from funnel_hpc.backends.slurm_rest_http import RestTransport
    from tests.slurm_rest_helpers import jwt_restd

    daemon, settings = jwt_restd(tmp_path / "jwt", "funneltest")
    token = Path(settings["token_file"])
    with daemon:
        rest = Patient(SlurmRestClient(RestTransport(**settings, timeout=60), "funneltest"))
        assert rest.version == "v0.0.38"
        job = rest.submit(rendered(tmp_path, "rjwt1", ["/bin/true"], ("--hold",)))
        try:
            row = row_of(rest, job)
            assert (row.state, row.reason, row.name) == ("PENDING", "JobHeldUser",
                                                         "funnel-rjwt1")
            assert job_user(job) == "funneltest"
            token.write_text("eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl\n")  # not slurmctld's key
            os.utime(token, (1, 1))  # another mtime, however fast the rewrite was
            # slurmrestd passes the token on; slurmctld closes the connection (5005)
            with pytest.raises(BackendError, match=r"\(500\): Zero Bytes were transmitted "
                                                   r"or received \(slurmctld closed") as info:
                rest.rest.submit(rendered(tmp_path, "rjwt2", ["/bin/true"], ("--hold",)))
            assert info.value.transient is True  # the task waits for a good token
            assert "a token it does not accept" in str(info.value)
            with pytest.raises(BackendError, match=r"\(500\)") as info:
                rest.rest.jobs()
            assert info.value.transient is True
            token.write_text(scontrol_token("funneltest") + "\n")  # renewed, as by cron
            assert row_of(rest, job).state == "PENDING"
            rest.cancel(job)
            wait_states(rest, {job: {"CANCELLED"}})
        finally:
            subprocess.run(["scancel", job], check=False)  # whatever the token file holds


def test_hostile_task_values_add_no_job_property(slurmrestd, tmp_path):
    """The hostile task of the CLI test, through REST: it runs with its arguments
    verbatim, and the header the translation reads holds nothing of the task's but
    filtered values."""
    from tests.templating_helpers import HOSTILE, HOSTILE_ARGS, task

    rest = patient()
    out = tmp_path / "abc123" / "argv.json"
    printer = f"import json, sys; open({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))"
    args = [arg.replace("\x00", "") for arg in HOSTILE_ARGS]
    hostile = {**task(HOSTILE, HOSTILE), "resources": {"cpu_cores": 1}}
    script = rendered(tmp_path, "abc123", [sys.executable, "-c", printer, *args], task=hostile)
    assert [line.split("=")[0] for line in header_lines(script)] == [
        "--job-name", "--output", "--error", "--chdir", "--cpus-per-task", "--ntasks"]
    job = rest.submit(script)
    try:
        record = job_record(rest, job)
        assert record["name"] == "funnel-abc123" and record["partition"] == "debug"
        assert record["comment"] in ("", None)
        wait_states(rest, {job: {"COMPLETED", "FAILED"}})
        assert rest_rows(rest, {job})[job][0] == "COMPLETED", (
            tmp_path / "abc123" / "slurm.err").read_text()
        assert json.loads(out.read_text()) == args
        assert not Path("/tmp/pwned").exists()
    finally:
        rest.cancel(job)


def test_every_option_this_cluster_accepts_lands_in_the_job(slurmrestd, tmp_path):
    """The table's entries, given in one header, as slurmctld records them (GPU options,
    --constraint, --reservation and --licenses are refused here by sbatch too: this
    cluster has none)."""
    host = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
    work = tmp_path / "opts"
    work.mkdir()
    header = ["--job-name=rest-opts", f"--output={work}/o", f"--error={work}/e",
              "--input=/dev/null", f"--chdir={work}", "--cpus-per-task=1", "--ntasks=1",
              "--ntasks-per-node=1", "--nodes=1", "--mem=100M", "--partition=debug",
              "--account=acct", "--qos=normal", "--time=10", "--time-min=5",
              "--begin=now+1hour", "--deadline=now+2days", f"--nodelist={host}",
              "--exclusive=user", "--dependency=singleton", "--comment=hello",
              "--mail-type=NONE", "--mail-user=root", "--nice=10", "--wckey=w",
              "--signal=USR1@60", "--requeue", "--hold"]
    script = "#!/bin/bash\n" + "".join(f"#SBATCH {line}\n" for line in header) + "true\n"
    rest = patient()
    job = rest.submit(script)
    try:
        record = job_record(rest, job)
        assert record["name"] == "rest-opts" and record["standard_output"] == f"{work}/o"
        assert record["current_working_directory"] == str(work)
        assert record["memory_per_node"] == 100 and record["time_limit"] == 10
        assert record["time_minimum"] == 5 and record["nice"] == 10
        assert record["comment"] == "hello" and record["required_nodes"] == host
        assert record["shared"] == "user" and record["requeue"] is True
        assert record["account"] == "acct" and record["dependency"].startswith("singleton")
        assert record["priority"] == 0  # held
    finally:
        rest.cancel(job)
