"""The reconciler's grouped submission (gateway/reconcile/submission.py) over a scheduler
double with arrays: a tick's tasks with equal array keys go as one array, at most
array_max a time; a key the backend refuses fails that task only; array_max 1 is one
job per task, as a backend without arrays."""

from __future__ import annotations

import threading
from pathlib import Path

from funnel_hpc.backends.array_script import shared_inputs
from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.core import config as config_mod
from funnel_hpc.gateway.reconcile.reconciler import Reconciler
from funnel_hpc.gateway.web.app import make_service
from tests.backend_helpers import NO_WORK_DIR, double_options


def trivial(name: str, cpus: int = 1) -> dict:
    return {"name": name, "executors": [{"image": "busybox", "command": ["true"]}],
            "resources": {"cpu_cores": cpus}}


class ArrayBackend(Backend):
    """A double whose array key is the task's cpu count (13 cpus: refused), as the
    contract says it may be: from shared_inputs alone (it counts its calls)."""

    name = "arrays"
    parallel_submit = True

    def __init__(self, array_max: int):
        super().__init__(double_options(), NO_WORK_DIR)
        self.array_max = array_max
        self.lock = threading.Lock()
        self.jobs: list[list[str]] = []   # the task ids of each submission, in order
        self.keys_made = 0

    def array_key(self, request: SubmitRequest) -> str | None:
        self.keys_made += 1
        return self._key(request)

    @staticmethod
    def _key(request: SubmitRequest) -> str:
        if request.task["resources"]["cpu_cores"] == 13:
            raise BackendError("cannot render the Slurm array script: value refused")
        return f"cpus={request.task['resources']['cpu_cores']}"

    def _job(self, task_ids: list[str]) -> str:
        with self.lock:
            self.jobs.append(task_ids)
            return str(500 + len(self.jobs))

    def submit(self, request: SubmitRequest) -> str:
        return self._job([request.task_id])

    def submit_array(self, requests: list[SubmitRequest]) -> list[str]:
        assert 2 <= len(requests) <= self.array_max
        assert len({self._key(r) for r in requests}) == 1
        job = self._job([r.task_id for r in requests])
        return [f"{job}_{i}" for i in range(len(requests))]

    def cancel(self, job_id: str) -> None:
        pass

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        return {job_id: JobStatus(JobState.PENDING) for job_id in job_ids}


def make(tmp_path: Path, backend: Backend):
    config = config_mod.load(environ={}, overrides={
        "work_dir": str(tmp_path), "reconciler": {"submit_threads": 4}})
    service = make_service(config)
    return service, Reconciler(service, backend, config)


def job_ids(service, task_ids: list[str]) -> list[str]:
    return [service.get_row(task_id).job_id for task_id in task_ids]


def test_equal_keys_go_as_one_array_chunked_at_array_max(tmp_path):
    backend = ArrayBackend(array_max=4)
    service, reconciler = make(tmp_path, backend)
    ones = [service.create(trivial(f"one{i}")) for i in range(6)]
    twos = [service.create(trivial(f"two{i}", cpus=2)) for i in range(3)]
    alone = service.create(trivial("alone", cpus=3))
    assert reconciler.tick().submitted == 10
    assert sorted(len(job) for job in backend.jobs) == [1, 2, 3, 4]  # 6 = 4 + 2; 3; 1
    assert [job for job in backend.jobs if len(job) == 3] == [twos]
    assert sorted(([job for job in backend.jobs if set(job) <= set(ones)]), key=len) == \
        [ones[4:], ones[:4]]  # in order, chunked
    # every task its element id, recorded as its job id and in its log's metadata
    twos_ids = job_ids(service, twos)
    array = twos_ids[0].split("_")[0]
    assert twos_ids == [f"{array}_{i}" for i in range(3)]
    assert service.get(twos[1], "FULL")["logs"][0]["metadata"]["job_id"] == f"{array}_1"
    assert "_" not in service.get_row(alone).job_id  # a group of one goes through submit
    assert len(set(job_ids(service, ones + twos + [alone]))) == 10


def test_a_refused_key_fails_that_task_only(tmp_path):
    backend = ArrayBackend(array_max=10)
    service, reconciler = make(tmp_path, backend)
    good = [service.create(trivial(f"good{i}")) for i in range(3)]
    bad = service.create(trivial("refuse-me", cpus=13))
    assert reconciler.tick().submitted == 3
    assert backend.jobs == [good]
    refused = service.get(bad, "FULL")
    assert refused["state"] == "SYSTEM_ERROR"
    assert any("value refused" in line for line in refused["logs"][0]["system_logs"])
    assert all(service.get(t)["state"] == "QUEUED" for t in good)


def test_one_key_is_made_per_distinct_header_inputs(tmp_path):
    """The backend renders a key once per distinct shared_inputs in a tick: names and
    ids differ, the owner, resources, backend_parameters or worker argv do not."""
    backend = ArrayBackend(array_max=100)
    service, reconciler = make(tmp_path, backend)
    ones = [service.create(trivial(f"one{i}")) for i in range(40)]
    twos = [service.create(trivial(f"two{i}", cpus=2)) for i in range(5)]
    refused = [service.create(trivial(f"bad{i}", cpus=13)) for i in range(3)]
    assert reconciler.tick().submitted == 45
    assert backend.keys_made == 3
    assert sorted(backend.jobs, key=len) == [twos, ones]
    assert all(service.get(t)["state"] == "SYSTEM_ERROR" for t in refused)


def test_shared_inputs_leave_out_only_the_tasks_own_values(tmp_path):
    work = tmp_path / "work"

    def request(task_id: str, **changes) -> SubmitRequest:
        task_dir = changes.pop("task_dir", work / task_id)
        fields = {"task_id": task_id, "task": {"name": task_id, "resources": {"cpu_cores": 2}},
                  "task_dir": task_dir, "owner": "alice",
                  "worker_argv": ["funnel-worker", "--task-file", f"{task_dir}/task.json",
                                  "--workdir", str(work)], **changes}
        return SubmitRequest(**fields)

    same = shared_inputs(request("a1"), work)
    assert shared_inputs(request("b2"), work) == same
    for other in (request("b2", owner="bob"),
                  request("b2", task={"name": "b2", "resources": {"cpu_cores": 3}}),
                  request("b2", backend_parameters={"qos": "long"}),
                  request("b2", worker_argv=["funnel-worker", "--debug"]),
                  request("b2", task_dir=tmp_path / "elsewhere" / "b2"),
                  request("b 2")):  # not a task id: never an element
        assert shared_inputs(other, work) != same


def test_array_max_1_is_one_job_per_task(tmp_path):
    backend = ArrayBackend(array_max=1)
    service, reconciler = make(tmp_path, backend)
    ids = [service.create(trivial(f"t{i}")) for i in range(5)]
    assert reconciler.tick().submitted == 5
    assert sorted(backend.jobs) == sorted([t] for t in ids)
    assert all(job_id.isdigit() for job_id in job_ids(service, ids))


def test_a_failed_array_fails_or_defers_all_its_tasks(tmp_path, monkeypatch):
    backend = ArrayBackend(array_max=10)
    service, reconciler = make(tmp_path, backend)
    ids = [service.create(trivial(f"t{i}")) for i in range(3)]

    def unreachable(requests):
        raise BackendError("Unable to contact slurm controller", transient=True)

    monkeypatch.setattr(backend, "submit_array", unreachable)
    assert reconciler.tick().submitted == 0
    assert all(service.get_row(t).job_id is None for t in ids)  # claims given back
    monkeypatch.undo()
    assert reconciler.tick().submitted == 3
    assert backend.jobs == [ids]


def test_old_task_lists_and_their_companions_are_swept(tmp_path):
    import os
    import time

    from funnel_hpc.backends import arrays

    old = arrays.write(tmp_path, ["a1", "a2"])
    (old.path.parent / f"{old.name}.sh").write_text("#!/bin/sh\n")
    young = arrays.write(tmp_path, ["b1"])
    (old.path.parent / "not-a-list").write_text("kept")
    week_ago = time.time() - arrays.KEEP_SECONDS - 60
    for path in (old.path, old.path.parent / f"{old.name}.sh"):
        os.utime(path, (week_ago, week_ago))
    assert arrays.remove_older_than(tmp_path) == 2
    assert sorted(os.listdir(old.path.parent)) == sorted([young.name, "not-a-list"])
    assert arrays.find(tmp_path, "b1") == (young, 0) and arrays.find(tmp_path, "a1") is None
