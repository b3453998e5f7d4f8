"""End to end over HTTP: server + reconciler + backend + worker, on each backend here.

The same suite runs on every backend, each in the most real form these machines allow:

- ``local``: the embedded backend, for real.
- ``slurm``: the real single-node Slurm cluster (scripts/setup/30-slurm.sh).
- ``gridengine`` and ``gridengine-cli``: the real single-host Grid Engine cell
  (scripts/setup/50-gridengine.sh; all.q has 2 slots), through DRMAA and through
  qsub/qstat/qdel.
- ``aws-batch``: a real ``moto_server`` on 127.0.0.1. The gateway submits, polls
  (describe_jobs) and cancels (terminate_job) through the real AWS API as moto serves
  it, and moto's Batch walks each job through its states itself. moto runs a job as a
  Docker container and there is no Docker engine here, so ``moto_server`` is pointed
  at ``tests/fake_docker.py``, a fake Docker Engine that runs each container's command
  (the funnel worker, fetching its task from the gateway by id) as a local process with
  the gateway's work dir as its shared file system, and gives the compute environment
  2 slots by holding jobs in SUBMITTED through moto's state manager.
- ``htcondor-recorded-contract``: NOT a real HTCondor. No HTCondor daemon can run on
  these machines (the PyPI wheel ships only the Python bindings, Debian 12 has no
  HTCondor package, HTCondor's repository is not reachable). The gateway loads
  ``tests.htcondor_recorded_bindings`` (config ``backend.htcondor.bindings``): the real
  ``htcondor2`` Submit/JobAction/ClassAd types, with a Schedd that talks over XML-RPC to
  the fake schedd of ``tests/htcondor_fake.py`` in this test process. That schedd
  answers from the hand-written recorded ClassAds, evaluates constraints with the real
  ClassAd library, and runs each submitted job's wrapper script as a local process on 2
  "slots", reporting Idle/Running/Completed/Removed as HTCondor documents. What the
  suite shows there is the backend's contract with the bindings, not HTCondor's own
  behaviour.

"Killed outside the gateway" is ``kill -9`` of the worker (local), ``scancel`` (Slurm),
``qdel`` (Grid Engine), ``terminate_job`` by another client (AWS Batch; moto kills the
container) and ``act(Remove)`` on the schedd by someone else (HTCondor).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from funnel_hpc.core.events import iter_events
from tests.components import (
    BWRAP,
    BWRAP_REASON,
    GRIDENGINE,
    GRIDENGINE_REASON,
    bwrap_ready,
    gridengine_ready,
    need,
)
from tests.e2e_helpers import (
    TERMINAL,
    TICK,
    E2EBackend,
    create,
    fixed,
    get,
    job_id,
    make_server,
    port_closed,
    sh,
    start_local,
    start_slurm,
    wait_executor_started,
    wait_state,
    wait_ticks,
)
from tests.waiting import wait_for


def start_gridengine(mode: str) -> E2EBackend:
    need(GRIDENGINE, gridengine_ready(), GRIDENGINE_REASON)
    return E2EBackend("gridengine" if mode == "drmaa" else "gridengine-cli", "gridengine",
                      fixed({"gridengine": {"mode": mode}}),
                      lambda task, _w: subprocess.run(["qdel", job_id(task)], check=True,
                                                      capture_output=True))


def start_aws_batch(tmp: Path) -> E2EBackend:
    """moto_server with its Batch running jobs through tests/fake_docker.py (2 slots)."""
    from tests.backend_helpers import DEFINITION, FAKE_AWS_ENV, QUEUE, MotoServer, set_environ
    from tests.fake_docker import FakeDockerEngine
    from tests.server_helpers import worker_image_env

    need(BWRAP, bwrap_ready(), BWRAP_REASON)
    engine = FakeDockerEngine(tmp, slots=2)
    moto = MotoServer.start({"DOCKER_HOST": engine.url})
    moto.create_batch_environment()
    engine.attach(moto)
    restore = set_environ(FAKE_AWS_ENV)  # the gateway's boto3 client reads them

    def config(work: Path) -> dict:
        return {"aws_batch": {
            "endpoint_url": moto.url, "job_queue": QUEUE, "job_definition": DEFINITION,
            "worker_command": [sys.executable, "-m", "funnel_hpc.worker", "run"],
            "environment": {"FUNNEL_WORK_DIR": str(work),
                            "FUNNEL_WORKER__CONTAINER_DRIVER": "bwrap",
                            "FUNNEL_WORKER__POLL_SERVER_SECONDS": "1",
                            **worker_image_env()}}}

    def kill(task: dict, _work: Path) -> None:
        moto.client("batch").terminate_job(jobId=job_id(task),
                                           reason="terminated by an operator")

    def close() -> None:
        engine.close()
        moto.stop()
        restore()

    return E2EBackend("aws-batch", "aws-batch", config, kill, close)


def start_htcondor_recorded_contract() -> E2EBackend:
    """The recorded-contract schedd of tests/htcondor_fake.py, served to the gateway."""
    pytest.importorskip("htcondor2", reason="HTCondor bindings: pip install "
                                            "'funnel-hpc[htcondor]'")
    from tests.backend_helpers import set_environ
    from tests.htcondor_fake import ExecutingSchedd, serve

    schedd = ExecutingSchedd(slots=2)
    rpc, url = serve(schedd)
    restore = set_environ({"RECORDED_SCHEDD_URL": url})  # read by the gateway's bindings

    def close() -> None:
        rpc.shutdown()
        schedd.close()
        restore()

    return E2EBackend("htcondor-recorded-contract", "htcondor",
                      fixed({"htcondor": {"bindings": "tests.htcondor_recorded_bindings"}}),
                      lambda task, _w: schedd.remove_outside(job_id(task)), close)


# Real components carry their marker, so `-m "not slurm and not gridengine"` runs the rest.
BACKENDS = ["local", pytest.param("slurm", marks=pytest.mark.slurm),
            pytest.param("gridengine", marks=pytest.mark.gridengine),
            pytest.param("gridengine-cli", marks=pytest.mark.gridengine),
            "aws-batch", "htcondor-recorded-contract"]


def start_backend(backend_id: str, tmp: Path) -> E2EBackend:
    starters: dict[str, Callable[[], E2EBackend]] = {
        "local": start_local,
        "slurm": start_slurm,
        "gridengine": lambda: start_gridengine("drmaa"),
        "gridengine-cli": lambda: start_gridengine("cli"),
        "aws-batch": lambda: start_aws_batch(tmp),
        "htcondor-recorded-contract": start_htcondor_recorded_contract,
    }
    return starters[backend_id]()


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request, tmp_path_factory) -> Iterator[E2EBackend]:
    harness = start_backend(request.param, tmp_path_factory.mktemp(f"harness-{request.param}"))
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def server(backend, databases, tmp_path_factory):
    srv = make_server(backend, tmp_path_factory.mktemp(f"e2e-{backend.id}"),
                      databases.new("sqlite")).start()
    yield srv
    srv.stop()


def test_hello_world_completes_with_stdout(server, backend):
    task_id = create(server, [sh("echo hello world")], name="hello")
    task = wait_state(server, task_id, TERMINAL)
    assert task["state"] == "COMPLETE", task
    log = task["logs"][0]
    assert log["logs"][0]["stdout"] == "hello world\n"
    assert log["logs"][0]["exit_code"] == 0
    assert log["metadata"]["backend"] == backend.name and log["metadata"]["job_id"]
    basic = get(server, task_id, "BASIC")
    assert "stdout" not in basic["logs"][0]["logs"][0]


def test_executor_error(server):
    task_id = create(server, [sh("echo bad >&2; exit 7")])
    task = wait_state(server, task_id, TERMINAL)
    assert task["state"] == "EXECUTOR_ERROR"
    assert task["logs"][0]["logs"][0]["exit_code"] == 7
    assert task["logs"][0]["logs"][0]["stderr"] == "bad\n"


def test_cancel_running_task(server):
    task_id = create(server, [sh("echo up; sleep 120")])
    wait_state(server, task_id, "RUNNING")
    wait_executor_started(server, task_id)
    assert requests.post(f"{server.api}/tasks/{task_id}:cancel", timeout=10).ok
    task = wait_state(server, task_id, TERMINAL, timeout=60)
    assert task["state"] == "CANCELED"


def test_cancel_pending_task(server, backend):
    # fill the 2 slots (local: max_concurrent; Slurm: 2 CPUs; Grid Engine: all.q; the
    # fake compute environment / schedd: 2 slots) so the next task waits
    blockers = [create(server, [sh("sleep 60")], resources={"cpu_cores": 1}) for _ in range(2)]
    for blocker in blockers:
        wait_state(server, blocker, "RUNNING")
    waiting = create(server, [sh("echo should-not-run")], resources={"cpu_cores": 1})
    wait_ticks(server, 3)  # the reconciler has had three chances to start it
    assert get(server, waiting, "MINIMAL")["state"] == "QUEUED"
    requests.post(f"{server.api}/tasks/{waiting}:cancel", timeout=10)
    # moto's Batch may end a canceled RUNNABLE job only when a slot frees, i.e. when the
    # blockers' 60 s sleeps end: on a busy machine that is after 60 s from here
    task = wait_state(server, waiting, TERMINAL, timeout=180)
    assert task["state"] == "CANCELED"
    assert not any(e.get("stdout") for log in task.get("logs", []) for e in log.get("logs", []))
    for blocker in blockers:
        requests.post(f"{server.api}/tasks/{blocker}:cancel", timeout=10)
    for blocker in blockers:
        wait_state(server, blocker, TERMINAL, timeout=60)


def test_job_killed_outside_is_system_error(server, backend):
    task_id = create(server, [sh("sleep 120")])
    task = wait_state(server, task_id, "RUNNING")
    wait_executor_started(server, task_id)
    killed_at = time.monotonic()
    backend.kill_outside(task, server.work_dir)
    task = wait_state(server, task_id, TERMINAL, timeout=30)
    assert task["state"] == "SYSTEM_ERROR"
    assert time.monotonic() - killed_at < 2 * TICK + 5  # within two ticks, plus scheduler lag
    assert any("did not record an end" in line or "stopped outside the gateway" in line
               for line in task["logs"][0]["system_logs"]), task["logs"][0]["system_logs"]


def test_server_kill9_restart_loses_nothing_submits_nothing_twice(backend, databases, tmp_path):
    work = tmp_path / "restart"
    db_url = databases.new("sqlite")
    srv = make_server(backend, work, db_url).start()
    expected = {}
    try:
        for i in range(50):
            if i % 10 == 9:
                expected[create(srv, [sh(f"exit {i % 5 + 1}")])] = "EXECUTOR_ERROR"
            else:
                expected[create(srv, [sh(f"sleep 1; echo task-{i}")])] = "COMPLETE"
        # some submitted, some running, some done
        wait_for(lambda: any(task["state"] in TERMINAL for task in requests.get(
            srv.api + "/tasks", params={"page_size": 100}, timeout=10).json()["tasks"]),
            120, "a first task to end", detail=lambda: srv.log()[-3000:])
        srv.kill()
        wait_for(lambda: port_closed(srv.port), 30, f"port {srv.port} to close")
        srv = make_server(backend, work, db_url, same_address_as=srv)
        srv.start()
        states: dict[str, str] = {}

        def all_ended() -> bool:
            listed = requests.get(srv.api + "/tasks", params={"page_size": 100},
                                  timeout=10).json()["tasks"]
            states.clear()
            states.update({t["id"]: t["state"] for t in listed})
            return len(states) == 50 and all(s in TERMINAL for s in states.values())

        wait_for(all_ended, 240, "the 50 tasks to end after the restart", interval=1,
                 detail=lambda: {k: v for k, v in states.items() if v not in TERMINAL})
        wrong = {k: (states.get(k), v) for k, v in expected.items() if states.get(k) != v}
        never_ran = {k for k in wrong if not (work / k / "events.jsonl").exists()}
        for task_id in expected:
            starts = [e for e in iter_events(work / task_id / "events.jsonl")
                      if e["type"] == "task_start"] if task_id not in never_ran else []
            assert len(starts) == (task_id not in never_ran), \
                f"task {task_id} ran {len(starts)} times"
            assert not list((work / task_id).glob("events.jsonl.attempt*"))
        # a task claimed but not yet submitted when the gateway died is submitted on
        # restart (not failed); a job started while the gateway was down has a worker
        # that waits for it (worker.server_wait_seconds)
        assert states == expected, {k: (v, get(srv, k)["logs"][-1].get("system_logs"))
                                    for k, v in wrong.items()}
    finally:
        srv.stop()
