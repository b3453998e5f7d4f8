"""py-tes 0.4.2, the version snakemake-executor-plugin-tes pins, against the legacy /v1
routes: create, get in each view, list, cancel and wait as the plugin makes them, with
the plugin's three ways to authenticate, and through every state a task it watches can
be in. py-tes 0.4.2 refuses any state outside TES 1.0's (an UnmarshalError, which stops
the plugin's status loop), so what /v1 reports while a cancel is under way matters.

Each call is one run of tests/pytes_legacy_client.py in a virtualenv with py-tes 0.4.2 and
six, made once per session under pytest's tmp. Cost: ~10 s for the venv, ~0.5 s a call.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.components import need
from tests.server_helpers import REPO, ServerProcess, clean_env, funnel_argv
from tests.waiting import wait_for

CLIENT = REPO / "tests" / "pytes_legacy_client.py"
ANONYMOUS = "-"
# The states py-tes 0.4.2's Task model accepts (tes/models.py).
PYTES_042_STATES = {"UNKNOWN", "QUEUED", "INITIALIZING", "RUNNING", "COMPLETE", "CANCELED",
                    "EXECUTOR_ERROR", "SYSTEM_ERROR"}
VIEWS = ("MINIMAL", "BASIC", "FULL")
TASK_SECONDS = 180  # bound on a busybox task's run (a condition is awaited, not a time)


def unavailable(reason: str) -> None:
    need("py-tes 0.4.2 and its sandbox", False, reason)


@pytest.fixture(scope="session")
def pytes042(tmp_path_factory) -> Path:
    """The Python of a virtualenv with py-tes 0.4.2 and six (which it needs, undeclared)."""
    venv = tmp_path_factory.mktemp("pytes-0.4.2") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "py-tes==0.4.2", "six"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        unavailable(f"cannot install py-tes 0.4.2: {done.stderr[-1500:]}")
    return python


def pytes(python: Path, server: ServerProcess, op: str, *args: str,
          auth: str = ANONYMOUS) -> dict:
    """One py-tes 0.4.2 call against the server's root URL (it adds /v1 itself)."""
    done = subprocess.run([str(python), str(CLIENT), server.url, auth, op, *args],
                          capture_output=True, text=True, timeout=TASK_SECONDS + 60,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def need_bwrap() -> None:
    if shutil.which("bwrap") is None:
        unavailable("bwrap missing (scripts/setup/40-worker.sh)")


def worker_config() -> dict:
    # poll_server_seconds: the worker does not look for cancels itself during the test, so
    # a canceled task stays CANCELING until the reconciler acts
    return {"container_driver": "bwrap", "poll_server_seconds": 3600}


class Reconciler:
    """`funnel reconcile` as its own process, for a server run with --no-reconciler."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.proc: subprocess.Popen | None = None

    def start(self) -> Reconciler:
        log = (self.server.work_dir / "reconciler.log").open("ab")
        self.proc = subprocess.Popen(
            funnel_argv("reconcile", "--config", str(self.server.config_path)), cwd=REPO,
            env=clean_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


@pytest.fixture
def server_and_reconciler(databases, tmp_path):
    need_bwrap()
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite"), overrides={
        "reconciler": {"interval_seconds": 0.5}, "worker": worker_config()}).start()
    reconciler = Reconciler(server).start()
    yield server, reconciler
    reconciler.stop()
    server.stop()


@pytest.mark.registry  # busybox from the test registry
def test_plugin_calls_through_a_task_life(server_and_reconciler, pytes042):
    """Create, get (each view), list, wait: what the plugin does for one job."""
    server, _ = server_and_reconciler
    task_id = pytes(pytes042, server, "create", "echo hello\n")["id"]
    finished = pytes(pytes042, server, "wait", task_id, str(TASK_SECONDS))
    assert finished["state"] == "COMPLETE", server.log()[-3000:]
    views = {view: pytes(pytes042, server, "get", task_id, view) for view in VIEWS}
    assert {view: got.get("error") for view, got in views.items()} == dict.fromkeys(VIEWS)
    assert views["MINIMAL"]["name"] is None and views["BASIC"]["name"] == "snakejob.hello.1"
    assert views["BASIC"]["content"] is None
    assert views["FULL"]["content"] == "echo hello\n"
    assert views["FULL"]["executor_logs"][0]["exit_code"] == 0
    assert views["FULL"]["executor_logs"][0]["stdout"] == "hello\n"
    listed = pytes(pytes042, server, "list", "BASIC")
    assert [task["id"] for task in listed["tasks"]] == [task_id]


@pytest.mark.registry
def test_every_state_of_a_cancel_parses(server_and_reconciler, pytes042):
    """A running task canceled while no reconciler runs stays CANCELING (TES 1.1) until one
    does: py-tes 0.4.2 must still parse it in every view and in a list. The plugin asks
    MINIMAL every few seconds; an UnmarshalError there ends its status thread and fails
    the whole workflow (the same holds for PAUSED and PREEMPTED)."""
    server, reconciler = server_and_reconciler
    task_id = pytes(pytes042, server, "create", "sleep 600\n")["id"]

    def running() -> dict | None:
        task = pytes(pytes042, server, "get", task_id, "FULL")
        return task if task.get("state") == "RUNNING" and task["executor_logs"] else None

    started = wait_for(running, TASK_SECONDS, "the task to run", detail=server.log)
    assert started["executor_logs"][0]["exit_code"] is not None  # TES 1.1 (issue 17, 1)
    reconciler.stop()
    assert pytes(pytes042, server, "cancel", task_id) == {}
    seen = {view: pytes(pytes042, server, "get", task_id, view) for view in VIEWS}
    seen["list"] = pytes(pytes042, server, "list", "MINIMAL")
    reconciler.start()
    ended = pytes(pytes042, server, "wait", task_id, str(TASK_SECONDS))
    assert ended["state"] == "CANCELED", server.log()[-3000:]
    errors = {what: got["error"] for what, got in seen.items() if "error" in got}
    assert errors == {}, seen
    assert {seen[view]["state"] for view in VIEWS} <= PYTES_042_STATES


@pytest.mark.parametrize("auth", ["basic:alice:alice-pw", "token:alice-token"])
def test_plugin_credentials(alice_server, pytes042, auth):
    """--tes-user/--tes-password (HTTP Basic) and --tes-token (bearer) on /v1."""
    task_id = pytes(pytes042, alice_server, "create", "echo hi\n", auth=auth)["id"]
    assert pytes(pytes042, alice_server, "get", task_id, "MINIMAL", auth=auth)["state"] == "QUEUED"
    listed = pytes(pytes042, alice_server, "list", "MINIMAL", auth=auth)["tasks"]
    assert task_id in [task["id"] for task in listed]
    assert pytes(pytes042, alice_server, "cancel", task_id, auth=auth) == {}
    assert pytes(pytes042, alice_server, "get", task_id, "MINIMAL", auth=auth)["state"] == \
        "CANCELED"


def test_no_credentials_is_401(alice_server, pytes042):
    """Without credentials py-tes 0.4.2 sends `Basic None:None`: a clean 401, not a 500."""
    assert pytes(pytes042, alice_server, "list", "MINIMAL") == {"error": "HTTPError",
                                                               "status": 401}


def test_pages_holding_tes11_fields_parse(alice_server, pytes042):
    """Tasks made with every TES 1.1-only field (by a newer client, on the TES 1.1 routes):
    py-tes 0.4.2 lists them BASIC and FULL and gets each on /v1 (its models refuse any
    field they lack, and one such task used to fail a whole page)."""
    import requests

    task = {"name": "tes11", "inputs": [{"path": "/data/in", "content": "x", "streamable": True},
                                        {"path": "/data/d", "url": "file:///tmp/d",
                                         "type": "DIRECTORY", "streamable": False}],
            "outputs": [{"path": "/data/out/*.txt", "path_prefix": "/data/out",
                         "url": "file:///tmp/out", "type": "FILE"}],
            "resources": {"cpu_cores": 1, "preemptible": False, "zones": ["z"],
                          "backend_parameters": {"unsupported": "1"},
                          "backend_parameters_strict": False},
            "executors": [{"image": "busybox", "command": ["true"], "ignore_error": True}]}
    made = [requests.post(alice_server.api + "/tasks", json=task, auth=("alice", "alice-pw"),
                          timeout=30).json()["id"] for _ in range(2)]
    auth = "basic:alice:alice-pw"
    for view in ("BASIC", "FULL"):
        listed = pytes(pytes042, alice_server, "list", view, auth=auth)
        assert "error" not in listed, listed
        assert set(made) <= {t["id"] for t in listed["tasks"]}
        for task_id in made:
            got = pytes(pytes042, alice_server, "get", task_id, view, auth=auth)
            assert got.get("error") is None and got["name"] == "tes11", got
