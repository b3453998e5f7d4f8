"""Slurm REST mode without a daemon: the jobs list as squeue -r rows, the #SBATCH header as
job properties, slurmrestd's errors as BackendErrors, backend.slurm.mode/rest at load.
Records are trimmed from real slurmrestd 22.05 answers (v0.0.38; v0.0.37's array_task_id
is a string)."""

from __future__ import annotations

import os

import pytest

from funnel_hpc.backends.base import BackendError
from funnel_hpc.backends.slurm_rest import failure
from funnel_hpc.backends.slurm_rest_http import Answer, RestTransport
from funnel_hpc.backends.slurm_rest_jobs import JobRow, array_indexes, parse_jobs, wait_status
from funnel_hpc.backends.slurm_rest_script import (
    FLAG_PROPERTIES,
    OPTION_PROPERTIES,
    header_lines,
    job_properties,
)
from funnel_hpc.core import config


def record(job_id: int, **fields: object) -> dict:
    base = {"job_id": job_id, "array_job_id": 0, "array_task_id": None,
            "array_task_string": "", "job_state": "PENDING", "state_reason": "None",
            "exit_code": 0, "name": "funnel-t", "user_name": "root"}
    return {**base, **fields}


def test_plain_jobs_split_elements_and_pending_ranges_become_squeue_rows():
    body = {"jobs": [
        record(45645, job_state="FAILED", state_reason="NonZeroExitCode", exit_code=768),
        record(45715, array_job_id=45715, array_task_string="0-2,5-6",
               state_reason="JobHeldUser"),
        record(45716, array_job_id=45715, array_task_id=4, job_state="CANCELLED",
               exit_code=15),
        record(45800, array_job_id=45800, array_task_id="3", job_state="RUNNING"),  # v0.0.37
        record(45900, array_job_id=45900, array_task_string="0-999%10"),
        record(46000, user_name="someone-else"),
        "not a record", {"job_id": "x"},
    ]}
    rows = parse_jobs(body, "root")
    ids = [row.job_id for row in rows]
    assert ids[:8] == ["45645", "45715_0", "45715_1", "45715_2", "45715_5", "45715_6",
                       "45715_4", "45800_3"]
    assert len(ids) == 8 + 1000 and ids[-1] == "45900_999" and "46000" not in ids
    assert rows[0] == JobRow("45645", "FAILED", "3:0", "NonZeroExitCode", "funnel-t", "root")
    assert rows[6].state == "CANCELLED" and rows[6].exit_code == "0:15"
    assert rows[1].reason == "JobHeldUser"
    assert "46000" in {row.job_id for row in parse_jobs(body)}  # no user: every job


def test_array_expressions():
    assert array_indexes("0-6") == list(range(7))
    assert array_indexes("1,3,5-7") == [1, 3, 5, 6, 7]
    assert array_indexes("0-10:5%2") == [0, 5, 10]
    for bad in ("", "a", "5-1", "0-4000001", "1;2", "0-3:0"):
        with pytest.raises(ValueError):
            array_indexes(bad)


def test_wait_status_is_code_colon_signal():
    assert wait_status(768) == "3:0" and wait_status(9) == "0:9" and wait_status(0) == "0:0"
    assert wait_status(None) == "" and wait_status("N/A") == "N/A" and wait_status(True) == "True"


def test_an_answer_without_a_jobs_list_is_an_error():
    bodies: list[object] = [None, {}, {"jobs": "x"}, []]
    for body in bodies:
        with pytest.raises(BackendError, match="no jobs list"):
            parse_jobs(body)


SCRIPT = """#!/bin/bash
# a comment
#SBATCH --job-name=funnel-abc
#SBATCH --output=/w/abc/slurm.out
#SBATCH -e /w/abc/slurm.err
#SBATCH --chdir=/w/abc
#SBATCH --cpus-per-task=2 --ntasks=1
#SBATCH --mem=1536M
#SBATCH --array=0-6
#SBATCH --hold
#SBATCH --exclusive
#SBATCH --comment="two words"
#SBATCH -H

set -eo pipefail
#SBATCH --partition=after-the-first-command
exec worker
"""


def test_the_header_becomes_job_properties_through_the_table():
    assert job_properties(SCRIPT) == {
        "name": "funnel-abc", "standard_output": "/w/abc/slurm.out",
        "standard_error": "/w/abc/slurm.err", "current_working_directory": "/w/abc",
        "cpus_per_task": "2", "tasks": "1", "memory_per_node": "1536M", "array": "0-6",
        "hold": True, "exclusive": "exclusive", "comment": "two words"}
    assert len(header_lines(SCRIPT)) == 11  # sbatch stops at the first command, so do we
    assert set(FLAG_PROPERTIES) & {"hold", "exclusive"} and "environment" not in {
        *OPTION_PROPERTIES.values(), *(key for key, _ in FLAG_PROPERTIES.values())}


@pytest.mark.parametrize("line, words", [
    ("--tmp=1024M", "--tmp: not supported in REST mode: slurmrestd 22.05 has no property"),
    ("--export=ALL,LD_PRELOAD=/x", "--export: not supported in REST mode"),
    ("--environment=X", "--environment: not supported in REST mode (supported: --account"),
    ("--job-name=a --wrap=evil", "--wrap: not supported"),
    ("--uid=0", "--uid: not supported"),
    ("-u 0", "#SBATCH -u: not supported"),
    ("--hold=yes", "--hold: takes no value"),
    ("--no-requeue", "--no-requeue: not supported in REST mode: slurmrestd 22.05 takes"),
    ("--job-name", "--job-name: needs a value"),
    ("--comment='unclosed", "cannot split into words"),
    ("plain", "not an option"),
])
def test_a_header_option_rest_mode_cannot_map_is_refused_by_name(line, words):
    with pytest.raises(BackendError) as info:
        job_properties(f"#!/bin/bash\n#SBATCH {line}\ntrue\n")
    assert words in str(info.value)
    assert info.value.transient is False


def test_errors_are_transient_only_when_slurmctld_cannot_be_reached_or_auth_fails():
    down = Answer(500, {"errors": [{"error_number": 1800, "error": "Unable to contact slurm "
                                    "controller (connect failure)"}]}, "")
    assert failure("submit", down).transient is True
    assert failure("submit", Answer(500, {"errors": [{"error": "Socket timed out on send/recv "
                                                      "operation"}]}, "")).transient is True
    refused = failure("submit", Answer(500, {"errors": [{"error_number": 2015, "error":
                                                         "Requested partition configuration "
                                                         "not available now"}]}, ""))
    assert refused.transient is False and "(500): Requested partition" in str(refused)
    denied = failure("jobs", Answer(401, None, "Authentication failure"))
    # the gateway's credentials, not the task: the submission waits for a good token
    assert denied.transient is True and "only the uid slurmrestd runs as" in str(denied)
    # slurmctld's answer to a JWT it does not accept (measured, 22.05): the hint says so
    closed = failure("submit", Answer(500, {"errors": [{"error_code": 5005, "error":
                                                        "Zero Bytes were transmitted or "
                                                        "received"}]}, ""))
    assert closed.transient is True and "a token it does not accept" in str(closed)


def test_a_socket_nobody_listens_on_is_transient(tmp_path):
    transport = RestTransport(socket_path=str(tmp_path / "none.sock"), timeout=5)
    with pytest.raises(BackendError, match="unreachable") as info:
        transport.request("GET", "/openapi/v3")
    assert info.value.transient is True
    with pytest.raises(ValueError):
        RestTransport(socket_path="/a", url="http://b")


def test_a_token_file_that_is_missing_or_empty_is_named_and_transient(tmp_path):
    """Transient: a renewal may be rewriting the file, and the tasks are not at fault."""
    transport = RestTransport(url="http://127.0.0.1:9", token_file=str(tmp_path / "t"),
                              user="funnel", timeout=5)
    with pytest.raises(BackendError, match="cannot read the slurmrestd token file") as info:
        transport.request("GET", "/openapi/v3")
    assert info.value.transient is True
    (tmp_path / "t").write_text("\n")
    with pytest.raises(BackendError, match="holds no token") as info:
        transport.request("GET", "/openapi/v3")
    assert info.value.transient is True
    (tmp_path / "t").write_text("SLURM_JWT=\n")  # scontrol's line with no token in it
    os.utime(tmp_path / "t", (1, 1))
    with pytest.raises(BackendError, match="holds no token"):
        transport.request("GET", "/openapi/v3")


def test_the_token_is_sent_as_scontrol_prints_it_or_alone(tmp_path):
    transport = RestTransport(url="http://127.0.0.1:9", token_file=str(tmp_path / "t"),
                              user="funnel", timeout=5)
    for text, mtime in (("SLURM_JWT=eyJabc.def.ghi\n", 1), ("eyJabc.def.ghi", 2)):
        (tmp_path / "t").write_text(text)
        os.utime(tmp_path / "t", (mtime, mtime))
        assert transport._headers(has_body=False)["X-SLURM-USER-TOKEN"] == "eyJabc.def.ghi"


# ---- configuration ----

def load(slurm: dict, named: bool = False) -> config.Config:
    if named:
        return config.load(environ={}, overrides={"backends": {"hpc": {"kind": "slurm",
                                                                        **slurm}}})
    return config.load(environ={}, overrides={"backend": {"name": "slurm", "slurm": slurm}})


def test_mode_defaults_to_cli_and_rest_to_the_setup_socket():
    slurm = load({}).backend.slurm
    assert slurm.mode == "cli"
    assert slurm.rest.socket == "/run/slurmrestd/slurmrestd.socket" and slurm.rest.timeout == 60
    assert load({"mode": "rest"}).backend.slurm.mode == "rest"


@pytest.mark.parametrize("slurm, message", [
    ({"mode": "REST"}, 'backend.slurm.mode: one of cli, rest, got "REST"'),
    ({"mode": "rest", "rest": {"socket": "run/x.sock"}}, "backend.slurm.rest.socket: an absolute"),
    ({"mode": "rest", "rest": {"url": "http://h:6820"}}, "backend.slurm.rest.token_file: needed"),
    ({"mode": "rest", "rest": {"url": "http://h:6820/slurm", "token_file": "/t"}},
     "backend.slurm.rest.url: http(s)://host[:port]"),
    ({"mode": "rest", "rest": {"url": "unix:/x", "token_file": "/t"}}, "backend.slurm.rest.url"),
    ({"mode": "rest", "rest": {"user": "a b"}}, "backend.slurm.rest.user: a user name"),
    ({"mode": "rest", "rest": {"timeout": 0}}, "backend.slurm.rest.timeout: more than 0"),
    ({"mode": "rest", "rest": {"timeout": "soon"}}, "slurm.rest.timeout: expected a number"),
    ({"mode": "rest", "submit_as_owner": True},
     "backend.slurm.submit_as_owner: with mode rest, needs rest.url"),
    ({"mode": "rest", "ssh": {"host": "login"}}, "backend.slurm.ssh.host: not used with mode rest"),
    ({"rest": {"sock": "/x"}}, "unknown configuration key: backend.slurm.rest.sock"),
])
def test_bad_rest_settings_are_refused_at_load_naming_the_key(slurm, message):
    with pytest.raises(config.ConfigError) as info:
        load(slurm)
    assert message in str(info.value)


def test_named_instances_are_checked_under_their_own_path():
    with pytest.raises(config.ConfigError, match=r"^backends\.hpc\.mode: one of cli, rest"):
        load({"mode": "sbatch"}, named=True)
    rest = load({"mode": "rest", "rest": {"url": "https://[::1]:6820/", "token_file": "/t",
                                          "user": "funnel"}}, named=True)
    options = rest.instance("hpc").options
    assert isinstance(options, config.SlurmOptions) and options.rest.user == "funnel"
    # cli mode does not look at the rest section
    assert load({"mode": "cli", "rest": {"socket": "relative"}}).backend.slurm.mode == "cli"
    # submit_as_owner over rest_auth/jwt: each owner's token minted by scontrol token
    owners = load({"mode": "rest", "submit_as_owner": True,
                   "rest": {"url": "http://h:6820", "token_file": "/t"}})
    assert owners.backend.slurm.submit_as_owner is True


def test_a_job_id_never_enters_a_path_unchecked(tmp_path):
    from funnel_hpc.backends.slurm_rest import SlurmRestClient

    # no daemon, the version given: the check comes before any request
    rest = SlurmRestClient(RestTransport(socket_path=str(tmp_path / "none.sock")), "root",
                           environment={}, version="v0.0.38")
    for bad in ("1/../../openapi", "1?signal=KILL", "12_", "_3", "1 2", "", "1_2_3"):
        for call in (rest.cancel, rest.withdraw, rest.job):
            with pytest.raises(BackendError, match="not a Slurm job id"):
                call(bad)
    assert rest.calls == 0
