"""HTCondor job arrays (one cluster of N procs) against the recorded bindings contract of
tests/htcondor_fake.py (NOT a real schedd: none can run here, see test_htcondor.py): the
exact submit description and count, element ids CLUSTER.PROC, pending/running/done procs
in one query (history for the gone), removal of one proc, recover by JobBatchName, and an
executing schedd end to end through a real server and worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

htcondor2 = pytest.importorskip("htcondor2", reason="HTCondor bindings: pip install "
                                                    "'funnel-hpc[htcondor]'")

from funnel_hpc.backends import arrays  # noqa: E402
from funnel_hpc.backends.base import BackendError, JobState, SubmitRequest  # noqa: E402
from funnel_hpc.backends.htcondor import CANCEL_REASON, HTCondorBackend  # noqa: E402
from tests.backend_helpers import backend_options, set_environ  # noqa: E402
from tests.components import BWRAP, BWRAP_REASON, bwrap_ready, need  # noqa: E402
from tests.e2e_helpers import TERMINAL, E2EBackend, fixed, job_id, make_server  # noqa: E402
from tests.htcondor_fake import ExecutingSchedd, FakeSchedd, serve  # noqa: E402
from tests.templating_helpers import HOSTILE  # noqa: E402
from tests.templating_helpers import task as hostile_task  # noqa: E402
from tests.waiting import wait_for_state  # noqa: E402


def make_backend(work: Path, schedd: FakeSchedd, **extra: object) -> HTCondorBackend:
    return HTCondorBackend(backend_options("htcondor", **extra), work, schedd=schedd)


def request(work: Path, task_id: str, **resources: object) -> SubmitRequest:
    task_dir = work / task_id
    task_dir.mkdir(parents=True, exist_ok=True)
    return SubmitRequest(task_id=task_id, task={"id": task_id, "name": "t",
                                                "resources": resources},
                         task_dir=task_dir,
                         worker_argv=["/opt/funnel/bin/funnel", "worker", "run", "--task-file",
                                      str(task_dir / "task.json")])


def test_htcondor_array_is_one_submit_of_count_n(tmp_path):
    schedd = FakeSchedd()
    backend = make_backend(tmp_path, schedd)
    reqs = [request(tmp_path, f"Zq9h{i}", cpu_cores=2) for i in range(3)]
    assert len({backend.array_key(r) for r in reqs}) == 1
    ids = backend.submit_array(reqs)
    (call,) = schedd.named("submit")
    assert call["count"] == 3
    cluster = ids[0].split(".")[0]
    assert ids == [f"{cluster}.{proc}" for proc in range(3)]
    listed = arrays.find(tmp_path, "Zq9h2")
    assert listed is not None and listed[1] == 2
    wrapper = tmp_path / "arrays" / f"{listed[0].name}.sh"
    assert call["description"] == {
        "universe": "vanilla", "executable": str(wrapper), "arguments": "$(Process)",
        "transfer_executable": "false", "initialdir": str(tmp_path),
        "output": "/dev/null", "error": "/dev/null", "batch_name": listed[0].job_name,
        "request_cpus": "2"}
    text = wrapper.read_text()
    assert wrapper.stat().st_mode & 0o777 == 0o700
    assert "FUNNEL_ARRAY_INDEX=$(( $1 ))" in text
    assert text.splitlines()[-1] == ('exec /opt/funnel/bin/funnel worker run --task-file '
                                     '"$FUNNEL_TASK_DIR"/task.json')
    assert "Zq9h" not in text and "Zq9h" not in str(call["description"])


def test_htcondor_array_key_groups_equal_descriptions_only(tmp_path):
    backend = make_backend(tmp_path, FakeSchedd())
    base = backend.array_key(request(tmp_path, "h1"))
    assert base is not None and backend.array_key(request(tmp_path, "h2")) == base
    assert backend.array_key(request(tmp_path, "h3", cpu_cores=4)) != base
    assert backend.array_key(request(tmp_path, "h4", disk_gb=3)) != base
    odd = request(tmp_path, "h5")
    odd.backend_parameters = {"priority": "5"}
    assert backend.array_key(odd) != base
    hostile = request(tmp_path, "h6")
    hostile.backend_parameters = {"priority": HOSTILE}
    assert backend.array_key(hostile) is None  # alone through submit, which refuses it
    with pytest.raises(BackendError):
        backend.submit(hostile)
    assert make_backend(tmp_path, FakeSchedd(), array_max=1).array_key(
        request(tmp_path, "h7")) is None
    with pytest.raises(ValueError, match="array_max"):
        make_backend(tmp_path, FakeSchedd(), array_max=0)


def test_htcondor_poll_cancel_recover_procs(tmp_path):
    schedd = FakeSchedd()
    backend = make_backend(tmp_path, schedd)
    reqs = [request(tmp_path, f"r{i}") for i in range(4)]
    ids = backend.submit_array(reqs)
    cluster = int(ids[0].split(".")[0])
    ads = {int(ad["ProcId"]): ad for ad in schedd.queue if ad["ClusterId"] == cluster}
    ads[1]["JobStatus"] = 2
    ads[3].update({"JobStatus": 4, "ExitCode": 0})
    schedd.queue.remove(ads[3])
    schedd.past.insert(0, ads[3])
    before = len(schedd.calls)
    statuses = backend.poll([*ids, "100"])
    assert [name for name, _ in schedd.calls[before:]] == ["query", "history"]
    assert schedd.calls[before][1]["constraint"] == f"member(ClusterId, {{100, {cluster}}})"
    assert [statuses[j].state for j in ids] == [JobState.PENDING, JobState.RUNNING,
                                                JobState.PENDING, JobState.COMPLETED]
    backend.cancel(ids[2])
    assert schedd.named("act")[-1]["job_spec"] == f"ClusterId == {cluster} && ProcId == 2"
    assert schedd.named("act")[-1]["reason"] == CANCEL_REASON
    after = backend.poll(ids)
    assert after[ids[2]].state is JobState.CANCELLED and after[ids[0]].state is JobState.PENDING
    backend.cancel("1;rm")  # not a job id: nothing removed
    assert len(schedd.named("act")) == 1
    assert [backend.recover(r.task_id, r.task_dir) for r in reqs] == ids  # queue or history
    assert backend.recover("nosuchtask", tmp_path) is None
    name = arrays.find(tmp_path, "r0")[0].job_name  # type: ignore[index]
    assert {"constraint": f'JobBatchName =?= "{name}"', "projection": ["ClusterId"]} in \
        schedd.named("query")


# ---- end to end: a real server and worker over the executing schedd ----

@pytest.fixture(scope="module")
def executing_schedd() -> Iterator[ExecutingSchedd]:
    need(BWRAP, bwrap_ready(), BWRAP_REASON)
    schedd = ExecutingSchedd(slots=2)
    rpc, url = serve(schedd)
    restore = set_environ({"RECORDED_SCHEDD_URL": url})
    yield schedd
    rpc.shutdown()
    schedd.close()
    restore()


def test_htcondor_array_end_to_end_five_tasks_one_cluster(executing_schedd, databases,
                                                          tmp_path):
    backend = E2EBackend("htcondor-recorded-contract", "htcondor",
                         fixed({"htcondor": {"bindings": "tests.htcondor_recorded_bindings"}}),
                         lambda *_: None)
    server = make_server(backend, tmp_path / "work", databases.new("sqlite"))
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
        assert len({j.split(".")[0] for j in jobs}) == 1 and len(jobs) == 5
        assert [call["count"] for call in executing_schedd.named("submit")] == [5]
    finally:
        server.stop()


def test_htcondor_array_has_no_hostile_task_value(tmp_path):
    schedd = FakeSchedd()
    backend = make_backend(tmp_path, schedd)
    reqs = [request(tmp_path, f"x{i}") for i in range(2)]
    for req in reqs:
        req.task = {**hostile_task("n", HOSTILE), "id": req.task_id}
    assert len({backend.array_key(r) for r in reqs}) == 1
    backend.submit_array(reqs)
    (call,) = schedd.named("submit")
    wrapper = Path(call["description"]["executable"]).read_text()
    for text in (wrapper, str(call["description"])):
        assert "pwned" not in text and "evil" not in text and "reboot" not in text
