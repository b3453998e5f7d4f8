"""PBS job arrays (qsub -J) against the PBS double of tests/pbs_helpers.py (NOT a real PBS:
none can be installed here; see that module and tests/data/pbs/README.md): the exact qsub
arguments and script lines, subjob ids, one qstat (-t) for pending, running and finished
subjobs from a recorded document, cancel of one subjob, recover through the task list,
and an executing double end to end through a real server and worker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from funnel_hpc.backends import arrays
from funnel_hpc.backends.base import BackendError, JobState, SubmitRequest
from funnel_hpc.backends.pbs import PbsBackend
from tests.backend_helpers import backend_options, set_environ
from tests.components import BWRAP, BWRAP_REASON, bwrap_ready, need
from tests.e2e_helpers import TERMINAL, E2EBackend, fixed, job_id, make_server
from tests.pbs_helpers import SERVER, FakePbs
from tests.server_helpers import ServerProcess
from tests.templating_helpers import HOSTILE
from tests.templating_helpers import task as hostile_task
from tests.waiting import wait_for, wait_for_state


def make_backend(work: Path, **options: object) -> PbsBackend:
    return PbsBackend(backend_options("pbs", **options), work)


def request(work: Path, task_id: str, **resources: object) -> SubmitRequest:
    """A request as the gateway makes it: task dir <work>/<id>, the worker's paths in it."""
    task_dir = work / task_id
    task_dir.mkdir(parents=True, exist_ok=True)
    return SubmitRequest(task_id=task_id, task={"id": task_id, "name": "n",
                                                "resources": resources},
                         task_dir=task_dir,
                         worker_argv=["/opt/funnel/bin/funnel-worker", "--task-file",
                                      str(task_dir / "task.json"), "--config",
                                      str(work / "worker-config.json")])


def test_pbs_array_qsub_argv_script_and_subjob_ids(fake_pbs, tmp_path):
    backend = make_backend(tmp_path, walltime="01:00:00")
    requests_ = [request(tmp_path, f"Zq9t{i}", cpu_cores=2) for i in range(3)]
    assert len({backend.array_key(r) for r in requests_}) == 1
    ids = backend.submit_array(requests_)
    (call,) = fake_pbs.calls("qsub")
    assert call["argv"][:3] == ["qsub", "-J", "0-2"] and len(call["argv"]) == 4
    script_path = Path(call["argv"][3])
    assert script_path.parent == tmp_path / "arrays" and not script_path.exists()
    assert call["mode"] == 0o700
    (array,) = [k for k in fake_pbs.jobs() if k.endswith(f"[].{SERVER}")]
    number = array.split("[")[0]
    assert ids == [f"{number}[{i}].{SERVER}" for i in range(3)]
    listed = arrays.find(tmp_path, "Zq9t1")
    assert listed is not None and listed[1] == 1
    assert listed[0].path.read_text() == "Zq9t0\nZq9t1\nZq9t2\n"
    lines = call["script"].splitlines()
    assert [line for line in lines if line.startswith("#PBS")] == [
        f"#PBS -N funnel-array-{listed[0].name}", "#PBS -o /dev/null", "#PBS -e /dev/null",
        "#PBS -S /bin/bash", "#PBS -r n", "#PBS -l select=1:ncpus=2",
        "#PBS -l walltime=01:00:00"]
    assert "FUNNEL_ARRAY_INDEX=$(( PBS_ARRAY_INDEX ))" in lines
    assert f"FUNNEL_TASK_DIR={tmp_path}/\"$FUNNEL_TASK_ID\"" in lines
    assert lines[-1] == ('exec /opt/funnel/bin/funnel-worker --task-file '
                         f'"$FUNNEL_TASK_DIR"/task.json --config {tmp_path}/worker-config.json')
    assert "Zq9t" not in call["script"]


def test_pbs_array_key_groups_equal_headers_only(fake_pbs, tmp_path):
    backend = make_backend(tmp_path)
    base = backend.array_key(request(tmp_path, "a1"))
    assert base is not None and backend.array_key(request(tmp_path, "a2")) == base
    assert backend.array_key(request(tmp_path, "a3", cpu_cores=4)) != base
    assert backend.array_key(request(tmp_path, "a4", ram_gb=2)) != base
    assert backend.array_key(request(tmp_path, "a5", zones=["long"])) != base
    hostile = request(tmp_path, "a6", zones=[HOSTILE])
    assert backend.array_key(hostile) is None  # alone through submit, which refuses it
    with pytest.raises(BackendError, match="cannot render"):
        backend.submit(hostile)
    assert make_backend(tmp_path, array_max=1).array_key(request(tmp_path, "a7")) is None
    with pytest.raises(ValueError, match="array_max"):
        make_backend(tmp_path, array_max=0)
    with pytest.raises(BackendError, match="2 subjobs"):
        backend.submit_array([request(tmp_path, "a8")])
    assert fake_pbs.calls("qsub") == []


ARRAY = "3001[].pbs-head"


@pytest.fixture
def recorded_array(tmp_path, monkeypatch) -> FakePbs:
    fake = FakePbs(tmp_path / "pbs", document="qstat-array.json")
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    return fake


def test_pbs_poll_of_subjobs_is_one_qstat_with_their_array(recorded_array, tmp_path):
    ids = [f"3001[{i}].pbs-head" for i in range(7)]
    statuses = make_backend(tmp_path).poll([*ids, "2999.pbs-head"])
    (argv,) = recorded_array.argv("qstat")
    assert argv == ["qstat", "-f", "-F", "json", "-x", "-t", "2999.pbs-head", ARRAY]
    assert [statuses[j].state for j in ids] == [
        JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.RUNNING,
        JobState.RUNNING, JobState.PENDING, JobState.PENDING]
    assert statuses[ids[1]].reason == "qstat: X exit=2"
    assert statuses[ids[5]].reason.startswith("qstat: Q comment=Not Running")
    assert statuses["2999.pbs-head"].state is JobState.LOST
    # an array the server's history let go: its subjobs are LOST
    gone = make_backend(tmp_path).poll(["4444[1].pbs-head", ids[0]])
    assert gone["4444[1].pbs-head"].state is JobState.LOST and "Unknown Job Id" in \
        gone["4444[1].pbs-head"].reason
    assert gone[ids[0]].state is JobState.COMPLETED
    # a subjob whose array's server another name: the sequence decides, as for jobs
    assert make_backend(tmp_path).poll(["3001[3].pbs-head.example"])[
        "3001[3].pbs-head.example"].state is JobState.RUNNING


def test_pbs_cancel_one_subjob_and_recover(fake_pbs, tmp_path):
    backend = make_backend(tmp_path)
    requests_ = [request(tmp_path, f"c{i}") for i in range(4)]
    ids = backend.submit_array(requests_)
    backend.cancel(ids[2])
    assert fake_pbs.argv("qdel") == [["qdel", ids[2]]]
    statuses = backend.poll(ids)
    assert statuses[ids[2]].state is JobState.CANCELLED
    assert {statuses[j].state for j in ids if j != ids[2]} == {JobState.PENDING}
    backend.cancel(ids[2])  # Job has finished: not an error
    assert [backend.recover(r.task_id, r.task_dir) for r in requests_] == ids
    name = arrays.find(tmp_path, "c0")[0].job_name  # type: ignore[index]
    assert ["qselect", "-x", "-u", fake_pbs.jobs()[ids[0]]["Job_Owner"].split("@")[0],
            "-J", "-N", name] in fake_pbs.argv("qselect")
    assert backend.recover("nosuchtask", tmp_path / "nosuchtask") is None
    fake_pbs.fail("qselect", 1, "qselect: cannot connect to server pbs-head (errno=111)\n")
    with pytest.raises(BackendError) as raised:
        backend.recover("c1", requests_[1].task_dir)
    assert raised.value.transient


def test_pbs_array_max_one_is_one_qsub_per_task(fake_pbs, tmp_path):
    backend = make_backend(tmp_path, array_max=1)
    job = backend.submit(request(tmp_path, "s1"))
    assert fake_pbs.argv("qsub") == [["qsub", str(tmp_path / "s1" / "pbs.sh")]]
    assert backend.poll([job])[job].state is JobState.PENDING
    assert fake_pbs.argv("qstat") == [["qstat", "-f", "-F", "json", "-x", job]]


# ---- end to end: a real server and worker over the executing double ----

@pytest.fixture(scope="module")
def executing_pbs(tmp_path_factory) -> Iterator[FakePbs]:
    need(BWRAP, bwrap_ready(), BWRAP_REASON)
    fake = FakePbs(tmp_path_factory.mktemp("pbs-arrays"), document="qstat-none.json",
                   execute=True)
    restore = set_environ({"PATH": f"{fake.bin}{os.pathsep}{os.environ['PATH']}"})
    yield fake
    restore()


def test_pbs_array_end_to_end_five_tasks_one_qsub(executing_pbs, databases, tmp_path):
    backend = E2EBackend("pbs-recorded-contract", "pbs", fixed({}), lambda *_: None)
    server: ServerProcess = make_server(backend, tmp_path / "work", databases.new("sqlite"))
    server.reconcile = False
    server.start()
    try:
        ids = []
        for i in range(5):
            resp = requests.post(server.api + "/tasks", timeout=10, json={"executors": [
                {"image": "busybox", "command": ["sh", "-c", f"echo task-{i}"]}]})
            assert resp.status_code == 200, resp.text
            ids.append(resp.json()["id"])
        server.stop()  # all five QUEUED before the first tick
        server.reconcile = True
        server.start()
        tasks = [wait_for_state(server.api, task_id, TERMINAL, 120,
                                detail=lambda: server.log()[-3000:]) for task_id in ids]
        for i, task in enumerate(tasks):
            assert task["state"] == "COMPLETE", task
            assert task["logs"][0]["logs"][0]["stdout"] == f"task-{i}\n"
        jobs = {job_id(task) for task in tasks}
        assert len({j.split("[")[0] for j in jobs}) == 1 and len(jobs) == 5
        (qsub,) = executing_pbs.argv("qsub")
        assert qsub[:3] == ["qsub", "-J", "0-4"]
        wait_for(lambda: all(executing_pbs.jobs()[j]["job_state"] == "X" for j in jobs),
                 30, "the subjobs to be finished")
    finally:
        server.stop()


def test_pbs_array_script_has_no_hostile_task_value(fake_pbs, tmp_path):
    backend = make_backend(tmp_path)
    reqs = [request(tmp_path, f"h{i}") for i in range(2)]
    for req in reqs:
        req.task = {**hostile_task("n", HOSTILE), "id": req.task_id}
    assert len({backend.array_key(r) for r in reqs}) == 1
    backend.submit_array(reqs)
    (call,) = fake_pbs.calls("qsub")
    assert "pwned" not in call["script"] and "evil" not in call["script"]
    assert "reboot" not in call["script"]
