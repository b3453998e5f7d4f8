"""Grid Engine job script and parsing, no scheduler needed: hostile task values stay data."""

from __future__ import annotations

import subprocess

import pytest

from funnel_hpc.backends.base import BackendError, JobState, JobStatus
from funnel_hpc.backends.commands import LocalRunner, Result
from funnel_hpc.backends.gridengine import GridEngineBackend, native_specification
from funnel_hpc.backends.gridengine_accounting import AccountingFile, parse_accounting_line
from funnel_hpc.backends.gridengine_drmaa import DRMAA_STATE_MAP, finished_status
from funnel_hpc.backends.gridengine_qstat import map_qstat_state, parse_qstat_xml
from funnel_hpc.backends.registry import backend_class
from funnel_hpc.backends.templating import TemplateValueError
from funnel_hpc.core import config as config_mod
from tests.backend_helpers import NO_WORK_DIR, FakeRunner, backend_options, make_request
from tests.gridengine_helpers import TEST_PARAMETERS

TASK_ID = "d1b2c3d4e5f60718"
HOSTILE = [
    "x\n#$ -l h_vmem=1T",
    "\n#$ -q evil.q\n",
    "$(touch /tmp/funnel-ge-pwned)",
    "`touch /tmp/funnel-ge-pwned`",
    "a'b\"c\\d",
    "#$ -N evil",
    "x\r#$ -P evil",
]


def task(name: str, tag: str, env: str) -> dict:
    return {"id": TASK_ID, "name": name, "tags": {"k": tag, tag: "v"},
            "resources": {"cpu_cores": 2, "ram_gb": 1, "zones": ["all.q"]},
            "executors": [{"image": "busybox", "command": ["echo", env], "env": {"E": env}}]}


def backend() -> GridEngineBackend:
    return GridEngineBackend(backend_options("gridengine", backend_parameters=TEST_PARAMETERS),
                             NO_WORK_DIR)


def directives(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#$")]


def test_benign_script_directives(tmp_path):
    request = make_request(tmp_path, task("plain", "t", "e"), ["/bin/true"],
                           {"project": "proj1", "priority": "-5", "hold": ""})
    script = backend().render_script(request)
    assert script.startswith("#!/bin/bash\n")
    task_dir = request.task_dir
    assert directives(script) == [
        f"#$ -N funnel-{TASK_ID}", f"#$ -wd {task_dir}", f"#$ -o {task_dir}/gridengine.out",
        f"#$ -e {task_dir}/gridengine.err", "#$ -S /bin/bash", "#$ -pe smp 2",
        "#$ -l h_vmem=512M", "#$ -q all.q", "#$ -h", "#$ -p -5", "#$ -P proj1"]
    assert native_specification(script) == (
        f"-N funnel-{TASK_ID} -wd {task_dir} -o {task_dir}/gridengine.out "
        f"-e {task_dir}/gridengine.err -S /bin/bash -pe smp 2 -l h_vmem=512M -q all.q "
        "-h -p -5 -P proj1")


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_name_tags_env_and_argv_leave_directives_alone(tmp_path, value):
    benign = make_request(tmp_path / "a", task("plain", "t", "e"), ["/bin/printf", "%s\\n", "x"])
    hostile = make_request(tmp_path / "a", task(value, value, value),
                           ["/bin/printf", "%s\\n", value, f"--flag={value}"])
    b = backend()
    good, bad = b.render_script(benign), b.render_script(hostile)
    assert directives(bad) == directives(good)
    assert native_specification(bad) == native_specification(good)
    path = hostile.task_dir / "gridengine.sh"
    path.write_text(bad)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    # the script really passes the values to the worker verbatim
    done = subprocess.run(["bash", str(path)], capture_output=True, timeout=10)  # bytes: keep \r
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == f"{value}\n--flag={value}\n"


@pytest.mark.parametrize("value", HOSTILE + ["a b", "x;y"])
def test_hostile_backend_parameters_are_refused(tmp_path, value):
    request = make_request(tmp_path, task("plain", "t", "e"), params={"project": value})
    with pytest.raises(TemplateValueError):
        backend().render_script(request)
    with pytest.raises(BackendError, match="cannot render"):
        backend().submit(request)
    assert not (request.task_dir / "gridengine.sh").exists()


def test_hostile_zone_is_refused(tmp_path):
    t = task("plain", "t", "e")
    t["resources"]["zones"] = ["all.q\n#$ -l h_vmem=1T"]
    with pytest.raises(TemplateValueError):
        backend().render_script(make_request(tmp_path, t))


def test_unlisted_parameters_and_options_are_dropped(tmp_path):
    request = make_request(tmp_path, task("plain", "t", "e"), params={"hold": "", "evil": "-x"})
    b = GridEngineBackend(backend_options("gridengine"), NO_WORK_DIR)  # default allow-list: no hold
    assert "-h" not in native_specification(b.render_script(request)).split()
    assert b.supported_parameters == {"project", "priority", "account"}


def test_single_core_and_no_memory_request(tmp_path):
    request = make_request(tmp_path, {"id": TASK_ID})
    spec = native_specification(backend().render_script(request))
    assert "-pe" not in spec and "h_vmem" not in spec and "-q" not in spec


def test_config_and_registry():
    config = config_mod.load(environ={}, overrides={"backend": {"name": "gridengine"}})
    assert backend_class("gridengine") is GridEngineBackend
    options = config.backend.gridengine
    assert options.mode == "drmaa" and options.template == "gridengine.sh.j2"
    with pytest.raises(ValueError):
        GridEngineBackend(backend_options("gridengine", mode="pbs"), NO_WORK_DIR)


QSTAT_XML = """<?xml version='1.0'?>
<job_info  xmlns:xsd="http://arc.liv.ac.uk/repos/darcs/sge/source/dist/util/resources/schemas/qstat/qstat.xsd">
  <queue_info>
    <job_list state="running">
      <JB_job_number>14</JB_job_number>
      <JAT_prio>0.55500</JAT_prio>
      <JB_name>funnel-abc</JB_name>
      <JB_owner>root</JB_owner>
      <state>r</state>
      <queue_name>all.q@vm</queue_name>
      <slots>1</slots>
    </job_list>
  </queue_info>
  <job_info>
    <job_list state="pending">
      <JB_job_number>16</JB_job_number>
      <JB_name>funnel-def</JB_name>
      <state>hqw</state>
    </job_list>
    <job_list state="pending">
      <JB_job_number>17</JB_job_number>
      <JB_name>other</JB_name>
      <state>Eqw</state>
    </job_list>
  </job_info>
</job_info>
"""


def test_state_maps_and_qstat_parsing():
    assert all(isinstance(v, JobState) for v in DRMAA_STATE_MAP.values())
    assert parse_qstat_xml(QSTAT_XML) == {"14": ("r", "funnel-abc"), "16": ("hqw", "funnel-def"),
                                          "17": ("Eqw", "other")}
    expected = {"qw": JobState.PENDING, "hqw": JobState.PENDING, "r": JobState.RUNNING,
                "t": JobState.RUNNING, "Rr": JobState.RUNNING, "dr": JobState.RUNNING,
                "Eqw": JobState.FAILED, "s": JobState.RUNNING, "": JobState.UNKNOWN}
    assert {k: map_qstat_state(k) for k in expected} == expected


def test_finished_status_from_drmaa_job_info():
    ok = {"hasExited": True, "exitStatus": 0, "hasSignal": False, "wasAborted": False}
    assert finished_status("done", ok, False).state == JobState.COMPLETED
    failed = finished_status("done", {**ok, "exitStatus": 3}, False)
    assert failed.state == JobState.FAILED and "exit=3" in failed.reason
    killed = finished_status("failed", {**ok, "hasExited": False, "hasSignal": True,
                                        "terminatedSignal": "SIGKILL"}, False)
    assert killed.state == JobState.FAILED and "SIGKILL" in killed.reason
    assert finished_status("failed", {**ok, "wasAborted": True}, False).state == \
        JobState.CANCELLED
    assert finished_status("failed", None, False, "no usage").state == JobState.CANCELLED
    assert finished_status("done", ok, True).state == JobState.CANCELLED


ACCOUNTING_HEAD = "# Version: 8.1.9\n# \n# DO NOT MODIFY THIS FILE MANUALLY!\n"
# two real lines of this machine's accounting file (fields 4 name, 5 number, 11 failed,
# 12 exit_status), and a qdel'ed job (failed 100, killed: 137)
ACCOUNTING_LINES = [
    ("all.q:vm:root:root:funnel-812196ca0e45b5a990ef:217:sge:0:1795395045:1795395066:"
     "1795395068:0:0:2:0.176101:0.044607:30000.000000:0:0:0:0:5276:0:0:0.000000:56:0:0:0:57:"
     "44:NONE:defaultdepartment:NONE:1:0:0.220708:0.002012:0.004189:NONE:0.000000:NONE:"
     "37011456.000000:0:0\n"),
    ("all.q:vm:root:root:funnel-b385cae585e2f12984e6:218:sge:0:1795395045:1795395068:"
     "1795395069:0:7:1:0.165739:0.032826:29896.000000:0:0:0:0:5275:0:0:0.000000:72:0:0:0:78:"
     "11:NONE:defaultdepartment:NONE:1:0:0.198565:0.001863:0.004189:NONE:0.000000:NONE:"
     "37015552.000000:0:0\n"),
    ("all.q:vm:root:root:not-ours:219:sge:0:1:2:3:0:0:1:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:0:"
     "NONE:x:NONE:1:0:0:0:0:NONE:0:NONE:0:0:0\n"),
    ("all.q:vm:root:root:funnel-b385cae585e2f12984e6:220:sge:0:1:2:3:100:137:1:0:0:0:0:0:0:0:"
     "0:0:0:0:0:0:0:0:0:0:NONE:x:NONE:1:0:0:0:0:NONE:0:NONE:0:0:0\n"),
]


def test_accounting_file_is_read_incrementally(tmp_path):
    path = tmp_path / "accounting"
    accounting = AccountingFile(path)
    assert not accounting.refresh()  # no accounting: nothing known
    path.write_text(ACCOUNTING_HEAD + ACCOUNTING_LINES[0] + ACCOUNTING_LINES[1][:40])
    assert accounting.refresh()
    assert set(accounting.by_id) == {"217"}  # the half-written line waits
    assert accounting.by_id["217"].status() == JobStatus(JobState.COMPLETED,
                                                         "accounting: failed=0 exit=0")
    with path.open("a") as fh:
        fh.write(ACCOUNTING_LINES[1][40:] + ACCOUNTING_LINES[2] + ACCOUNTING_LINES[3])
    assert accounting.refresh()
    assert set(accounting.by_id) == {"217", "218", "220"}  # not-ours is not kept
    assert accounting.by_id["218"].status() == JobStatus(JobState.FAILED,
                                                         "accounting: failed=0 exit=7")
    assert accounting.by_id["220"].status().reason == "accounting: failed=100 exit=137"
    newest = accounting.newest_named("funnel-b385cae585e2f12984e6")
    assert newest is not None and newest.job_id == "220"
    assert accounting.newest_named("funnel-none") is None
    path.write_text(ACCOUNTING_HEAD)  # rotated: read from the start again
    assert accounting.refresh() and accounting.offset == len(ACCOUNTING_HEAD)
    assert parse_accounting_line("garbage") is None and parse_accounting_line("# x") is None


def test_cli_poll_reads_accounting_for_jobs_qstat_lists_as_finished(tmp_path):
    """One qstat for all jobs; those qstat shows finished (z) or forgot get their exit from
    the accounting file, others stay LOST; no extra command."""
    path = tmp_path / "accounting"
    path.write_text(ACCOUNTING_HEAD + "".join(ACCOUNTING_LINES))
    zombie = ("<job_list state=\"zombie\"><JB_job_number>217</JB_job_number>"
              "<JB_name>funnel-812196ca0e45b5a990ef</JB_name><state>z</state></job_list>\n")
    qstat = QSTAT_XML.replace("  </job_info>", zombie + "  </job_info>")
    backend = GridEngineBackend(backend_options("gridengine", mode="cli",
                                                accounting_file=str(path)), NO_WORK_DIR)
    backend.runner = FakeRunner({("qstat",): Result(0, qstat, "")})
    statuses = backend.poll(["14", "217", "218", "404"])
    assert backend.runner.commands == [["qstat", "-xml", "-s", "prsz"]]
    assert statuses["14"].state == JobState.RUNNING
    assert statuses["217"].state == JobState.COMPLETED
    assert statuses["218"].state == JobState.FAILED
    assert statuses["404"].state == JobState.LOST


def test_scheduler_commands_get_no_funnel_variables(monkeypatch):
    """qsub/qstat and the DRMAA helper run without the gateway's FUNNEL_ configuration
    (a database password, say), so `-V` in a site template cannot hand it to jobs."""
    monkeypatch.setenv("FUNNEL_DATABASE__URL", "postgresql+psycopg://u:SECRET@db/funnel")
    monkeypatch.setenv("GATEWAY_SITE_VARIABLE", "kept")
    backend = GridEngineBackend(backend_options("gridengine", mode="cli"), NO_WORK_DIR)
    assert not [name for name in backend.env if name.startswith("FUNNEL_")]
    assert isinstance(backend.runner, LocalRunner) and backend.runner.env is backend.env
    assert backend.env["GATEWAY_SITE_VARIABLE"] == "kept" and backend.env["SGE_ROOT"]
