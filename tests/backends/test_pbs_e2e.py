"""End to end on the PBS backend: a real server, reconciler and worker, over a PBS double.

NOT a real PBS: no PBS server can be installed on these machines (Debian 12 has no
OpenPBS or PBS Pro package; OpenPBS's packages are not reachable). The gateway runs the
real PBS backend, whose qsub/qstat/qdel/qselect are the executing double of
``tests/pbs_helpers.py`` (first on the server's PATH): qsub runs each job script with
bash as a detached process, qstat -f -F json -x answers in the recorded OpenPBS shape,
qdel stops the job's process group. What this shows is the backend's contract with the
gateway and the worker (job ids with a server suffix, the script's worker command, the
state mapping driving the task), not PBS's own behaviour.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.backend_helpers import set_environ
from tests.components import BWRAP, BWRAP_REASON, bwrap_ready, need
from tests.e2e_helpers import (
    TERMINAL,
    E2EBackend,
    create,
    fixed,
    job_id,
    make_server,
    sh,
    wait_executor_started,
    wait_state,
)
from tests.pbs_helpers import FakePbs
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for


@pytest.fixture(scope="module")
def pbs_double(tmp_path_factory) -> Iterator[FakePbs]:
    need(BWRAP, bwrap_ready(), BWRAP_REASON)
    fake = FakePbs(tmp_path_factory.mktemp("pbs"), document="qstat-none.json", execute=True)
    restore = set_environ({"PATH": f"{fake.bin}{os.pathsep}{os.environ['PATH']}"})
    yield fake
    restore()


@pytest.fixture(scope="module")
def pbs_server(pbs_double, databases, tmp_path_factory) -> Iterator[ServerProcess]:
    def qdel_outside(task: dict, _work: Path) -> None:
        subprocess.run(["qdel", job_id(task)], check=True, capture_output=True)

    backend = E2EBackend("pbs-recorded-contract", "pbs", fixed({}), qdel_outside)
    server = make_server(backend, tmp_path_factory.mktemp("e2e-pbs"),
                         databases.new("sqlite")).start()
    yield server
    server.stop()


def test_pbs_hello_world_completes(pbs_server, pbs_double):
    task_id = create(pbs_server, [sh("echo hello world")], name="hello")
    task = wait_state(pbs_server, task_id, TERMINAL)
    assert task["state"] == "COMPLETE", task
    assert task["logs"][0]["logs"][0]["stdout"] == "hello world\n"
    metadata = task["logs"][0]["metadata"]
    assert metadata["backend"] == "pbs" and re.fullmatch(r"\d+\.pbs-head", metadata["job_id"])
    (call,) = [c for c in pbs_double.calls("qsub") if f"funnel-{task_id}" in c["script"]]
    assert call["argv"] == ["qsub", str(Path(pbs_server.work_dir) / task_id / "pbs.sh")]
    # the worker's end comes first; the double's mom marks the job F a moment later
    finished = wait_for(lambda: pbs_double.jobs()[metadata["job_id"]].get("job_state") == "F"
                        and pbs_double.jobs()[metadata["job_id"]], 30, "the job to be F")
    assert finished["Exit_status"] == 0


def test_pbs_executor_error(pbs_server):
    task_id = create(pbs_server, [sh("echo bad >&2; exit 7")])
    task = wait_state(pbs_server, task_id, TERMINAL)
    assert task["state"] == "EXECUTOR_ERROR"
    assert task["logs"][0]["logs"][0]["exit_code"] == 7


def test_pbs_cancel_running_task_is_a_qdel(pbs_server, pbs_double):
    task_id = create(pbs_server, [sh("echo up; sleep 120")])
    wait_state(pbs_server, task_id, "RUNNING")
    wait_executor_started(pbs_server, task_id)
    assert requests.post(f"{pbs_server.api}/tasks/{task_id}:cancel", timeout=10).ok
    task = wait_state(pbs_server, task_id, TERMINAL, timeout=60)
    assert task["state"] == "CANCELED"
    assert ["qdel", job_id(task)] in pbs_double.argv("qdel")


def test_pbs_job_deleted_outside_is_system_error(pbs_server):
    task_id = create(pbs_server, [sh("sleep 120")])
    task = wait_state(pbs_server, task_id, "RUNNING")
    wait_executor_started(pbs_server, task_id)
    subprocess.run(["qdel", job_id(task)], check=True, capture_output=True)
    task = wait_state(pbs_server, task_id, TERMINAL, timeout=60)
    assert task["state"] == "SYSTEM_ERROR"
    assert any("did not record an end" in line or "stopped outside the gateway" in line
               for line in task["logs"][0]["system_logs"]), task["logs"][0]["system_logs"]
