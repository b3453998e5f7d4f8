"""The official TES client, py-tes, against the real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tes

from tests.components import BWRAP, BWRAP_REASON, bwrap_ready, need
from tests.pytes_helpers import EVERY_FIELD
from tests.server_helpers import REPO, ServerProcess


def to_task(document: dict) -> tes.Task:
    return tes.client.unmarshal(json.dumps(document), tes.Task)


def strip_server_fields(task_json: dict) -> dict:
    return {k: v for k, v in task_json.items() if k not in ("id", "state", "creation_time", "logs")}


def test_round_trip_every_field(api_server):
    client = tes.HTTPClient(api_server.url, timeout=10)
    task_id = client.create_task(to_task(EVERY_FIELD))

    full = client.get_task(task_id, view="FULL")
    assert full.id == task_id and full.state == "QUEUED"
    assert strip_server_fields(json.loads(full.as_json())) == \
        strip_server_fields(json.loads(to_task(EVERY_FIELD).as_json()))

    basic = client.get_task(task_id, view="BASIC")
    assert [i.content for i in basic.inputs] == [None, None, None]
    assert [i.path for i in basic.inputs] == [i["path"] for i in EVERY_FIELD["inputs"]]
    assert basic.executors[0].env == {"A": "1", "B_2": "two"}

    minimal = client.get_task(task_id, view="MINIMAL")
    assert minimal.id == task_id and minimal.state == "QUEUED"
    assert minimal.executors is None and minimal.name is None


def test_raw_full_view_is_identical_to_the_document(api_server):
    import requests

    client = tes.HTTPClient(api_server.url, timeout=10)
    task_id = client.create_task(to_task(EVERY_FIELD))
    full = requests.get(f"{api_server.api}/tasks/{task_id}", params={"view": "FULL"},
                        timeout=10).json()
    assert strip_server_fields(full) == EVERY_FIELD


def test_list_and_cancel(api_server):
    client = tes.HTTPClient(api_server.url, timeout=10)
    ids = [client.create_task(to_task({**EVERY_FIELD, "name": f"pytes-{i}"}))
           for i in range(3)]
    page = client.list_tasks(view="BASIC", page_size=2)
    assert len(page.tasks) == 2 and page.next_page_token
    assert page.tasks[0].id == ids[-1]
    rest = client.list_tasks(view="MINIMAL", page_size=1, page_token=page.next_page_token)
    assert rest.tasks[0].id == ids[0]
    client.cancel_task(ids[1])
    assert client.get_task(ids[1], view="MINIMAL").state == "CANCELED"
    info = client.get_service_info()
    assert info.name == "funnel-hpc"


# ---- py-tes 0.4.2, as snakemake-executor-plugin-tes pins it, on the legacy /v1 routes ----

PYTES_042_VENV = REPO / "build" / "pytes-0.4.2"


@pytest.fixture(scope="session")
def pytes042_python() -> Path:
    """The Python of a virtualenv with py-tes 0.4.2 and six (its undeclared need), made
    once under build/ from the package index pip is configured with."""
    python = PYTES_042_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PYTES_042_VENV)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "py-tes==0.4.2",
                               "six"], capture_output=True, text=True)
        if done.returncode != 0:
            shutil.rmtree(PYTES_042_VENV, ignore_errors=True)
            need("py-tes 0.4.2", False, f"cannot install it: {done.stderr[-500:]}")
    return python


def run_pytes042(python: Path, *args: str) -> dict:
    done = subprocess.run([str(python), str(REPO / "tests" / "pytes042_client.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_pytes042_on_legacy_routes(api_server, pytes042_python):
    """Create, get in each view, list, cancel: the plugin's calls, typed by py-tes 0.4.2
    (which refuses any field it does not know: /v1 leaves TES 1.1 fields out, and answers
    /v1/tasks/service-info with TES 1.0's {name, doc, storage})."""
    report = run_pytes042(pytes042_python, api_server.url, "queued")
    assert report["MINIMAL"] == {"state": "QUEUED", "name": None, "content": None}
    assert report["BASIC"] == {"state": "QUEUED", "name": "snakejob.rule_a.1", "content": None}
    assert report["FULL"]["content"] == "echo hi > /tmp/result.txt\n"
    assert report["id"] in report["listed"]
    assert report["after_cancel"] == "CANCELED"
    assert report["service_info"] == "ok"  # /v1/tasks/service-info: TES 1.0's shape


def test_pytes042_runs_a_task_to_the_end(databases, tmp_path, pytes042_python):
    """A running executor's log (exit_code -1) and a finished one parse in py-tes 0.4.2."""
    need(BWRAP, bwrap_ready(), BWRAP_REASON)
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)  # the sandbox user writes here
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite"), reconcile=True, overrides={
        "reconciler": {"interval_seconds": 0.5},
        "worker": {"container_driver": "bwrap", "poll_server_seconds": 1,
                   "allowed_dirs": [str(out)]}}).start()
    try:
        report = run_pytes042(pytes042_python, server.url, "run", str(out))
    finally:
        server.stop()
    assert report["state"] == "COMPLETE", (report, server.log()[-3000:])
    assert report["exit_code"] == 0 and report["end_time_parsed"]
    assert (out / "result.txt").read_text() == "hello\n"
    assert report["running_exit_code"] == -1
    assert report["listed_full"] == 2
    assert report["canceled"] == "CANCELED"
