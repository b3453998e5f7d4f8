"""Grid Engine job arrays: qstat's element ranges and accounting's task numbers on canned
output, then arrays on the real single-host cell (scripts/setup/50-gridengine.sh) through
qsub -t (cli) and DRMAA runBulkJobs: one job, element ids JOB.IDX, each element's output
in its own task dir, one element cancelled, recover by the task list."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from funnel_hpc.backends import arrays
from funnel_hpc.backends.base import BackendError, JobState, SubmitRequest
from funnel_hpc.backends.gridengine import GridEngineBackend
from funnel_hpc.backends.gridengine_accounting import parse_accounting_line
from funnel_hpc.backends.gridengine_qstat import expand_tasks, parse_qstat_xml
from tests.backend_helpers import backend_options
from tests.gridengine_helpers import TEST_PARAMETERS, finished, wait_for
from tests.templating_helpers import HOSTILE, HOSTILE_ARGS

QSTAT = """<?xml version='1.0'?>
<job_info><queue_info>
  <job_list state="running"><JB_job_number>11535</JB_job_number>
    <JB_name>funnel-array-probe</JB_name><state>r</state><tasks>1</tasks></job_list>
  <job_list state="running"><JB_job_number>11535</JB_job_number>
    <JB_name>funnel-array-probe</JB_name><state>t</state><tasks>2</tasks></job_list>
</queue_info><job_info>
  <job_list state="pending"><JB_job_number>11535</JB_job_number>
    <JB_name>funnel-array-probe</JB_name><state>qw</state><tasks>3-7:1</tasks></job_list>
  <job_list state="pending"><JB_job_number>11534</JB_job_number>
    <JB_name>funnel-array-held</JB_name><state>hqw</state><tasks>1,4</tasks></job_list>
  <job_list state="zombie"><JB_job_number>11534</JB_job_number>
    <JB_name>funnel-array-held</JB_name><state>z</state><tasks>2,3</tasks></job_list>
  <job_list state="zombie"><JB_job_number>11533</JB_job_number>
    <JB_name>funnel-one</JB_name><state>z</state></job_list>
</job_info></job_info>"""

# two accounting(5) lines as this cell wrote them: element 3 of array 11535, and a job
# that is not an array (task number 0)
ACCOUNTING = [
    ("all.q:vm:root:root:funnel-array-probe:11535:sge:0:1796562618:1796562625:1796562630:0:"
     "0:5:0.001442:0.008466:4500.000000:0:0:0:0:437:0:0:0.000000:16:0:0:0:4:2:NONE:"
     "defaultdepartment:NONE:1:3:0.009908:0.000000:0.000024:NONE:0.000000:NONE:5021696.0:0:0"),
    ("all.q:vm:root:root:funnel-one:11533:sge:0:1796562618:1796562625:1796562630:0:"
     "2:5:0.001442:0.008466:4500.000000:0:0:0:0:437:0:0:0.000000:16:0:0:0:4:2:NONE:"
     "defaultdepartment:NONE:1:0:0.009908:0.000000:0.000024:NONE:0.000000:NONE:5021696.0:0:0"),
]


def test_qstat_ranges_of_pending_elements_are_expanded():
    jobs = parse_qstat_xml(QSTAT)
    assert jobs["11535.1"] == ("r", "funnel-array-probe")
    assert jobs["11535.2"] == ("t", "funnel-array-probe")
    assert {j for j, (letters, _) in jobs.items() if letters == "qw"} == {
        f"11535.{i}" for i in range(3, 8)}
    assert jobs["11534.1"][0] == jobs["11534.4"][0] == "hqw"
    assert jobs["11534.2"][0] == jobs["11534.3"][0] == "z"
    assert jobs["11533"] == ("z", "funnel-one") and "11535" not in jobs
    assert expand_tasks("2-9:2,11") == [2, 4, 6, 8, 11]
    assert expand_tasks("x,3-;5") == []


def test_accounting_records_carry_the_element():
    element, single = (parse_accounting_line(line) for line in ACCOUNTING)
    assert element is not None and element.job_id == "11535.3"
    assert element.status().state == JobState.COMPLETED
    assert single is not None and single.job_id == "11533"
    assert single.status().state == JobState.FAILED


# the element's worker: sleeps when its task dir holds "sleepy", else says who and where
SLEEPY_OR_ECHO = ('if [ -e sleepy ]; then sleep 300; fi; '
                  'echo "$FUNNEL_TASK_ID in $(pwd)"; echo e >&2')


def request(work: Path, task_id: str, argv: list[str] | None = None,
            **resources: object) -> SubmitRequest:
    """A request as the gateway makes it: task dir <work>/<id>, the worker's paths in it."""
    task_dir = work / task_id
    task_dir.mkdir(parents=True, exist_ok=True)
    return SubmitRequest(task_id=task_id, task={"id": task_id, "resources": resources},
                         task_dir=task_dir, worker_argv=argv or [
                             "/bin/sh", "-c", SLEEPY_OR_ECHO,
                             str(task_dir / "task.json")])


def backend(mode: str, work: Path, **extra: object) -> GridEngineBackend:
    return GridEngineBackend(backend_options("gridengine", mode=mode,
                                             backend_parameters=TEST_PARAMETERS, **extra), work)


def test_array_key_groups_equal_headers_only(tmp_path):
    ge = backend("cli", tmp_path)
    try:
        one, two = request(tmp_path, "k1"), request(tmp_path, "k2")
        assert ge.array_key(one) == ge.array_key(two) is not None
        assert ge.array_key(request(tmp_path, "k3", cpu_cores=2)) != ge.array_key(one)
        assert ge.array_key(request(tmp_path, "k4", zones=["other.q"])) != ge.array_key(one)
        held = request(tmp_path, "k5")
        held.backend_parameters = {"hold": ""}
        assert ge.array_key(held) != ge.array_key(one)
        # a task dir elsewhere, a value the template refuses: not an element (submit says why)
        assert ge.array_key(request(tmp_path / "elsewhere", "k6")) is None
        for value in [HOSTILE, *HOSTILE_ARGS[1:7], " spaced  out "]:
            assert ge.array_key(request(tmp_path, "k7", zones=[value])) is None
        # a worker command that differs beyond the task's own dir is refused
        other = request(tmp_path, "k8", ["/bin/echo", "other"])
        with pytest.raises(BackendError, match="differs"):
            ge.submit_array([one, other])
    finally:
        ge.close()
    off = backend("cli", tmp_path, array_max=1)
    assert off.array_max == 1 and off.array_key(one) is None
    off.close()
    with pytest.raises(ValueError, match="array_max"):
        backend("cli", tmp_path, array_max=0)


def test_array_script_has_no_task_value(tmp_path):
    """Nothing of a task enters the array script but through the list: its name, its
    executors, its dir name are in no line."""
    ge = backend("cli", tmp_path)
    marker = "Zq9marker"
    requests = [request(tmp_path, f"{marker}{i}") for i in range(3)]
    for req in requests:
        req.task["name"] = "x\n#$ -l h_rt=1\n; touch /tmp/pwned"
    script = ge.render_array(requests, tmp_path / "arrays" / "0123456789abcdef")
    assert marker not in script and "pwned" not in script and "h_rt" not in script
    assert '"$FUNNEL_TASK_DIR"' in script
    ge.close()


@pytest.fixture(params=["cli", "drmaa"])
def real(request, gridengine, tmp_path) -> Iterator[GridEngineBackend]:
    ge = backend(request.param, tmp_path)
    yield ge
    ge.close()


@pytest.mark.gridengine
def test_real_array_one_job_elements_cancel_recover(real, tmp_path):
    requests = [request(tmp_path, f"ar{real.mode}{i}") for i in range(4)]
    (requests[2].task_dir / "sleepy").touch()
    ids = real.submit_array(requests)
    number = ids[0].split(".")[0]
    assert ids == [f"{number}.{i}" for i in range(1, 5)]
    shown = subprocess.run(["qstat", "-j", number], capture_output=True, text=True)
    assert "job-array tasks:" in shown.stdout and "1-4:1" in shown.stdout, shown.stdout
    assert [real.recover(r.task_id, r.task_dir) for r in requests] == ids
    real.cancel(ids[2])
    statuses = {j: wait_for(real, j, finished, 90) for j in ids}
    assert statuses[ids[2]].state == JobState.CANCELLED, statuses
    for job_id, req in zip(ids, requests, strict=True):
        if job_id == ids[2]:
            continue
        # cli: LOST until the accounting record is flushed, then COMPLETED
        done = wait_for(real, job_id, lambda s: s.state != JobState.LOST, 60)
        assert done.state == JobState.COMPLETED, done
        assert (req.task_dir / "gridengine.out").read_text() == \
            f"{req.task_id} in {req.task_dir}\n"
        assert (req.task_dir / "gridengine.err").read_text() == "e\n"
    real.cancel(ids[0])  # idempotent for a finished element
    assert real.recover("nosuchtask", tmp_path) is None
    assert arrays.find(tmp_path, requests[3].task_id)[1] == 3  # type: ignore[index]


@pytest.mark.gridengine
def test_real_held_array_of_1000_is_one_submission_and_one_poll(real, tmp_path):
    """A header option holds every element (DRMAA: the native specification only; the
    spooled script carries no #$ line, which made Grid Engine drop the -h, measured), and
    1,000 pending elements, one qstat range, come back from one poll."""
    requests = [request(tmp_path, f"held{real.mode}{i}") for i in range(1000)]
    for req in requests:
        req.backend_parameters = {"hold": ""}
    ids = real.submit_array(requests)
    try:
        calls = real.runner.calls
        statuses = real.poll(ids)
        assert {s.state for s in statuses.values()} == {JobState.PENDING}
        if real.mode == "cli":
            assert real.runner.calls == calls + 1
            assert {s.reason for s in statuses.values()} == {"qstat: hqw"}
        else:
            assert {s.reason for s in statuses.values()} == {"drmaa: user_on_hold"}
    finally:
        subprocess.run(["qdel", ids[0].split(".")[0]], capture_output=True)
