"""HTCondor backend tests.

What was found on these machines (Debian 12, PyPI and Debian apt only):

- ``pip install htcondor`` (25.14.1) installs only the Python bindings
  (``htcondor2``, ``classad2``; the 25.x wheel no longer has the legacy
  ``htcondor`` module) and their libraries: no condor_master, condor_schedd or
  any other daemon or command-line tool.
- Debian 12 has no ``htcondor``/``condor`` package (``apt-cache policy``: no
  candidate); HTCondor's own apt repository is not reachable from here.

So no HTCondor daemon can run, and the ``test_htcondor_recorded_*`` tests run
the backend against the bindings' real contract with a fake schedd
(``tests/htcondor_fake.py:FakeSchedd``): submit descriptions are parsed by the real
``htcondor2.Submit``, constraints evaluated by the real ClassAd library, and
the job ClassAds come from JSON files under ``recorded/`` -- which were written
by hand from the documented job attributes, NOT captured from a live schedd
(see recorded/README.md). ``test_htcondor_real_*`` runs against a personal
HTCondor and is skipped when ``condor_master`` is missing; it has never run here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

htcondor2 = pytest.importorskip("htcondor2", reason="HTCondor bindings: pip install "
                                                    "'funnel-hpc[htcondor]'")

from funnel_hpc.backends.base import BackendError, JobState  # noqa: E402
from funnel_hpc.backends.htcondor import CANCEL_REASON, STATE_MAP, HTCondorBackend, job_status  # noqa: E402
from funnel_hpc.backends.registry import backend_class  # noqa: E402
from tests.backend_helpers import NO_WORK_DIR, backend_options, make_request  # noqa: E402
from tests.htcondor_fake import FakeSchedd  # noqa: E402

WORKER = ["/opt/funnel/bin/funnel", "worker", "run", "--task-file", "/w/task.json"]


def make_backend(schedd=None, **extra) -> HTCondorBackend:
    return HTCondorBackend(backend_options("htcondor", **extra), NO_WORK_DIR, schedd=schedd)


def task(task_id: str = "c5a1c0de0200", **resources) -> dict:
    return {"id": task_id, "name": "t", "resources": resources,
            "executors": [{"image": "busybox", "command": ["true"]}]}


def test_htcondor_recorded_registry():
    assert backend_class("htcondor") is HTCondorBackend
    assert set(make_backend(FakeSchedd()).supported_parameters) == {
        "accounting_group", "accounting_group_user", "priority", "max_runtime"}


def test_htcondor_recorded_state_map_is_data():
    assert STATE_MAP == {1: JobState.PENDING, 2: JobState.RUNNING, 3: JobState.CANCELLED,
                         4: JobState.COMPLETED, 5: JobState.FAILED, 6: JobState.RUNNING,
                         7: JobState.RUNNING}
    assert list(htcondor2.JobStatus.__members__.values()) == list(range(1, 8))
    assert job_status({"JobStatus": 42}).state is JobState.UNKNOWN


def test_htcondor_recorded_poll_is_one_query_plus_history():
    schedd = FakeSchedd()
    backend = make_backend(schedd)
    ids = [str(c) for c in range(101, 111)] + ["999", "not-a-cluster"]
    statuses = backend.poll(ids)
    (query,) = schedd.named("query")
    assert query["constraint"] == \
        "member(ClusterId, {101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 999})"
    (history,) = schedd.named("history")  # only the clusters the queue did not have
    assert history["constraint"] == "member(ClusterId, {107, 108, 109, 110, 999})"
    assert history["match"] == 5  # 107..110 and 999
    expected = {"101": JobState.PENDING, "102": JobState.RUNNING, "103": JobState.FAILED,
                "104": JobState.RUNNING, "105": JobState.RUNNING, "106": JobState.CANCELLED,
                "107": JobState.COMPLETED, "108": JobState.FAILED, "109": JobState.FAILED,
                "110": JobState.CANCELLED, "999": JobState.LOST,
                "not-a-cluster": JobState.LOST}
    assert {k: v.state for k, v in statuses.items()} == expected
    assert statuses["103"].reason.startswith("condor: HELD exit=None reason=Error from slot1")
    assert statuses["108"].reason == "condor: COMPLETED exit=3 reason="
    assert statuses["109"].reason == "condor: COMPLETED exit=None reason=signal 9"
    assert statuses["110"].reason == f"condor: REMOVED exit=None reason={CANCEL_REASON}"
    assert statuses["107"].reason == "condor: COMPLETED exit=0 reason="


def test_htcondor_recorded_poll_all_in_queue_skips_history():
    schedd = FakeSchedd()
    statuses = make_backend(schedd).poll(["101", "102"])
    assert [c for c, _ in schedd.calls] == ["query"]
    assert statuses["101"].state is JobState.PENDING
    assert make_backend(schedd).poll([]) == {}
    assert len(schedd.calls) == 1


def test_htcondor_recorded_schedd_errors_are_unknown():
    schedd = FakeSchedd(fail=htcondor2.HTCondorException("Failed to connect to schedd"))
    backend = make_backend(schedd)
    assert {s.state for s in backend.poll(["101", "107"]).values()} == {JobState.UNKNOWN}
    with pytest.raises(BackendError) as caught:
        backend.cancel("101")
    assert caught.value.transient


def test_htcondor_recorded_submit(tmp_path):
    schedd = FakeSchedd()
    backend = make_backend(schedd)
    request = make_request(tmp_path, task(cpu_cores=2, ram_gb=1.5, disk_gb=2),
                           argv=WORKER, params={"accounting_group": "group_bio.alice"})
    job_id = backend.submit(request)
    assert job_id == "200"
    (sent,) = schedd.named("submit")
    assert sent["count"] == 1
    description = sent["description"]
    wrapper = request.task_dir / "htcondor.sh"
    assert description == {
        "universe": "vanilla", "executable": str(wrapper), "transfer_executable": "false",
        "initialdir": str(request.task_dir),
        "output": f"{request.task_dir}/htcondor.out", "error": f"{request.task_dir}/htcondor.err",
        "log": f"{request.task_dir}/htcondor.log", "batch_name": "funnel-c5a1c0de0200",
        "request_cpus": "2", "request_memory": "1536", "request_disk": str(2048 * 1024),
        "MY.FunnelTaskId": '"c5a1c0de0200"', "accounting_group": "group_bio.alice"}
    assert os.access(wrapper, os.X_OK)
    assert wrapper.read_text().splitlines()[-1] == "exec " + " ".join(WORKER)
    assert backend.poll([job_id])[job_id].state is JobState.PENDING
    assert backend.recover("c5a1c0de0200", request.task_dir) == job_id
    assert backend.recover("c5a1c0de0107", tmp_path) == "107"  # from history
    assert backend.recover("0123456789ab", tmp_path) is None


def test_htcondor_recorded_cancel(tmp_path):
    schedd = FakeSchedd()
    backend = make_backend(schedd)
    job_id = backend.submit(make_request(tmp_path, task()))
    backend.cancel(job_id)
    (act,) = schedd.named("act")
    assert act == {"action": htcondor2.JobAction.Remove, "job_spec": f"ClusterId == {job_id}",
                   "reason": CANCEL_REASON}
    status = backend.poll([job_id])[job_id]
    assert status.state is JobState.CANCELLED and CANCEL_REASON in status.reason
    backend.cancel(job_id)  # gone already: no error
    backend.cancel("not-a-cluster")
    assert len(schedd.named("act")) == 2


IN_FLIGHT = 500


def test_htcondor_recorded_poll_of_500_in_flight_jobs_is_one_query(tmp_path):
    """Issue #5 at 500 in-flight (Idle) jobs: ONE schedd query, no history call (recorded
    contract: the fake schedd, not a live one)."""
    schedd = FakeSchedd()
    backend = make_backend(schedd)
    ids = [backend.submit(make_request(tmp_path, task(f"c5a1c0de{i:04d}")))
           for i in range(IN_FLIGHT)]
    schedd.calls.clear()
    statuses = backend.poll(ids)
    assert [call for call, _ in schedd.calls] == ["query"]
    assert {s.state for s in statuses.values()} == {JobState.PENDING}
    assert len(statuses) == IN_FLIGHT


HOSTILE = "x\n+Injected = True\nqueue 5\n$(Cluster)`id`$(id)\"'\\ "


def hostile_task(task_id: str) -> dict:
    return {"id": task_id, "name": HOSTILE,
            "tags": {HOSTILE: HOSTILE, "k": HOSTILE},
            "resources": {"cpu_cores": 1},
            "executors": [{"image": "busybox", "command": [HOSTILE],
                           "env": {"A": HOSTILE, "B": "\nrequirements = False"}}]}


def test_htcondor_template_injection_keeps_the_keys(tmp_path):
    """Hostile name/tags/env/argv give the same submit keys as a benign task."""
    schedd = FakeSchedd()
    backend = make_backend(schedd)
    benign = make_request(tmp_path / "a", task("c5a1c0de0300"), argv=WORKER,
                          params={"priority": "5"})
    hostile = make_request(tmp_path / "b", hostile_task("c5a1c0de0300"),
                           argv=["printf", "%s\\n", HOSTILE, "$(id)", "`id`", "a'b\"c"],
                           params={"priority": "5", "unlisted": HOSTILE})
    backend.submit(benign)
    backend.submit(hostile)
    first, second = (call["description"] for call in schedd.named("submit"))
    assert set(first) == set(second)
    assert second["MY.FunnelTaskId"] == '"c5a1c0de0300"' and second["priority"] == "5"
    # the wrapper hands the worker its arguments verbatim, on one exec line
    result = subprocess.run(["bash", str(hostile.task_dir / "htcondor.sh")],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "".join(f"{a}\n" for a in
                                    [HOSTILE, "$(id)", "`id`", "a'b\"c"])


@pytest.mark.parametrize("value", ["5\n+Injected = True", "$(Cluster)", "5 `id`", "a\"b",
                                   "x y", "5\rqueue"])
def test_htcondor_template_injection_refuses_parameter_values(tmp_path, value):
    schedd = FakeSchedd()
    backend = make_backend(schedd)
    with pytest.raises(BackendError, match="directive"):
        backend.submit(make_request(tmp_path, task(), params={"priority": value}))
    assert schedd.named("submit") == []


def test_htcondor_bad_command_name_in_config_is_refused(tmp_path):
    backend = make_backend(FakeSchedd(), backend_parameters={"x": "a = b\nqueue"})
    with pytest.raises(BackendError, match="not a submit command name"):
        backend.submit(make_request(tmp_path, task(), params={"x": "1"}))


# ---- a real personal HTCondor (never ran on these machines: no daemons) ----

@pytest.fixture(scope="module")
def personal_condor(tmp_path_factory):
    master = shutil.which("condor_master")
    if master is None:
        pytest.skip("condor_master not installed: the htcondor wheel ships only the Python "
                    "bindings and Debian 12 has no HTCondor package")
    root = tmp_path_factory.mktemp("condor")
    config = root / "condor_config"
    config.write_text(
        f"LOCAL_DIR = {root}\nLOG = $(LOCAL_DIR)/log\nSPOOL = $(LOCAL_DIR)/spool\n"
        "EXECUTE = $(LOCAL_DIR)/execute\nLOCK = $(LOCAL_DIR)/lock\nRUN = $(LOCAL_DIR)/run\n"
        "use ROLE : Personal\nCONDOR_HOST = 127.0.0.1\nNETWORK_INTERFACE = 127.0.0.1\n"
        "SCHEDD_INTERVAL = 2\nNEGOTIATOR_INTERVAL = 2\nSTARTER_UPDATE_INTERVAL = 2\n")
    for sub in ("log", "spool", "execute", "lock", "run"):
        (root / sub).mkdir()
    os.environ["CONDOR_CONFIG"] = str(config)
    htcondor2.reload_config()
    proc = subprocess.Popen([master, "-f"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            htcondor2.Schedd().query(constraint="False")
            break
        except htcondor2.HTCondorException:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail("personal HTCondor did not start in 60 s")
            time.sleep(1)
    yield
    proc.terminate()
    proc.wait(30)


def test_htcondor_real_complete_fail_cancel(personal_condor, tmp_path):
    backend = HTCondorBackend(backend_options("htcondor"), NO_WORK_DIR)
    ok = backend.submit(make_request(tmp_path, task("c5a1c0de0a01"), argv=["true"]))
    bad = backend.submit(make_request(tmp_path, task("c5a1c0de0a02"),
                                      argv=["sh", "-c", "exit 3"]))
    slow = backend.submit(make_request(tmp_path, task("c5a1c0de0a03"), argv=["sleep", "300"]))
    backend.cancel(slow)
    deadline = time.monotonic() + 120
    while True:
        statuses = backend.poll([ok, bad, slow])
        if all(s.state.finished for s in statuses.values()) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert statuses[ok].state is JobState.COMPLETED
    assert statuses[bad].state is JobState.FAILED and "exit=3" in statuses[bad].reason
    assert statuses[slow].state is JobState.CANCELLED
    assert backend.recover("c5a1c0de0a01", tmp_path) == ok
    assert Path(tmp_path / "c5a1c0de0a01" / "htcondor.log").exists()
