"""Grid Engine job script and parsing, no scheduler needed: hostile task values stay data."""

from __future__ import annotations

import subprocess

import pytest

from backends.base import BackendError, JobState
from backends.gridengine import (DRMAA_STATE_MAP, GridEngineBackend, finished_status,
                                 map_qstat_state, native_specification, parse_qstat_xml)
from backends.registry import backend_class, backend_options
from backends.templating import TemplateValueError
from gateway import config as config_mod
from tests.backends_ge.conftest import TEST_PARAMETERS, ge_options, make_request

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
    return GridEngineBackend(ge_options(backend_parameters=TEST_PARAMETERS), {})


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
    b = GridEngineBackend(ge_options(), {})  # default allow-list: no hold
    assert "-h" not in native_specification(b.render_script(request)).split()
    assert b.supported_parameters == {"project", "priority", "account"}


def test_single_core_and_no_memory_request(tmp_path):
    request = make_request(tmp_path, {"id": TASK_ID})
    spec = native_specification(backend().render_script(request))
    assert "-pe" not in spec and "h_vmem" not in spec and "-q" not in spec


def test_config_and_registry():
    config = config_mod.load(environ={}, overrides={"backend": {"name": "gridengine"}})
    assert backend_class("gridengine") is GridEngineBackend
    options = backend_options(config)
    assert options["mode"] == "drmaa" and options["template"] == "gridengine.sh.j2"
    with pytest.raises(ValueError):
        GridEngineBackend(ge_options(mode="pbs"), {})


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
