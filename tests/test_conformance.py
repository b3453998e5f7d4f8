"""Strict TES 1.1 conformance: every task in every view, every list page and service-info,
validated against the vendored TES 1.1 schema (tests/tes_schema/) through a real server,
while tasks are queued, running and finished.

A running executor has no exit status; the server reports it as exit_code -1 (docs/reference.md,
"API rules"), so a typed client validating a page never meets a log
without the exit_code TES requires.
"""

from __future__ import annotations

import secrets
import shutil

import pytest
import requests

from tests.components import BWRAP, BWRAP_REASON, bwrap_ready, need
from tests.pytes_helpers import EVERY_FIELD
from tests.server_helpers import ServerProcess
from tests.tes_schema_helpers import list_errors, service_info_errors, task_errors
from tests.waiting import wait_for, wait_for_state

VIEWS = ("MINIMAL", "BASIC", "FULL")
TERMINAL = {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED", "PREEMPTED"}


def sh(script: str) -> dict:
    return {"image": "busybox", "command": ["sh", "-c", script]}


def create(server: ServerProcess, task: dict) -> str:
    resp = requests.post(server.api + "/tasks", json=task, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def check_everything(server: ServerProcess, task_ids: list[str]) -> dict[str, str]:
    """Validate service-info (TES and legacy routes), every list page in every view and
    each task in every view; return {task id: state} as the FULL list showed them."""
    problems: list[str] = []
    for url in (server.api + "/service-info", server.url + "/v1/service-info"):
        problems += [f"{url}: {p}" for p in service_info_errors(
            requests.get(url, timeout=10).json())]
    states: dict[str, str] = {}
    for view in VIEWS:
        token = None
        while True:
            params = {"view": view, "page_size": "7"}
            if token:
                params["page_token"] = token
            page = requests.get(server.api + "/tasks", params=params, timeout=30).json()
            problems += [f"list {view}: {p}" for p in list_errors(page, view)]
            if view == "FULL":
                states.update({t["id"]: t["state"] for t in page["tasks"]})
            token = page.get("next_page_token")
            if not token:
                break
        for task_id in task_ids:
            task = requests.get(f"{server.api}/tasks/{task_id}", params={"view": view},
                                timeout=10).json()
            problems += [f"get {task_id} {view}: {p}" for p in task_errors(task, view)]
    assert not problems, "\n".join(problems[:40])
    return states


def test_queued_and_canceled_tasks_conform(api_server):
    """No reconciler: tasks stay QUEUED; every field of the model is set once."""
    ids = [create(api_server, EVERY_FIELD),
           create(api_server, {"executors": [sh("true")]}),
           create(api_server, {**EVERY_FIELD, "resources": {"backend_parameters": {
               "unsupported": "x"}}})]  # a system log at creation
    requests.post(f"{api_server.api}/tasks/{ids[1]}:cancel", timeout=10)
    states = check_everything(api_server, ids)
    assert {states[i] for i in ids} == {"QUEUED", "CANCELED"}


@pytest.fixture(scope="module")
def running_server(databases, tmp_path_factory):
    """Reconciler on, local backend, bwrap over the busybox root (scripts/setup/40-worker.sh)."""
    need(BWRAP, bwrap_ready(), BWRAP_REASON)
    work = tmp_path_factory.mktemp("conformance")
    server = ServerProcess(work, databases.new("sqlite"), reconcile=True, overrides={
        "backend": {"name": "local", "local": {"max_concurrent": 1}},
        "reconciler": {"interval_seconds": 0.5},
        "worker": {"container_driver": "bwrap", "poll_server_seconds": 1}}).start()
    yield server
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


def test_running_and_finished_tasks_conform(running_server):
    server = running_server
    done = create(server, {"executors": [sh("echo hello")]})
    failed = create(server, {"executors": [sh("echo bad >&2; exit 3")]})
    for task_id in (done, failed):
        wait_for_state(server.api, task_id, TERMINAL, 120, detail=lambda: server.log()[-3000:])
    # executor 0 ends, executor 1 runs until canceled: one finished and one running log
    running = create(server, {"executors": [sh("echo one"), sh("echo two; sleep 600")]})
    queued = create(server, {"executors": [sh("true")]})  # waits: max_concurrent is 1

    def executor_running() -> dict | None:
        task = requests.get(f"{server.api}/tasks/{running}", params={"view": "FULL"},
                            timeout=10).json()
        logs = task.get("logs") or [{}]
        started = len(logs[-1].get("logs", [])) == 2
        return task if task["state"] == "RUNNING" and started else None

    task = wait_for(executor_running, 120, "executor 1 to start",
                    detail=lambda: server.log()[-3000:])
    assert task["logs"][-1]["logs"][0]["exit_code"] == 0
    assert task["logs"][-1]["logs"][1]["exit_code"] == -1  # running: no exit status yet
    states = check_everything(server, [done, failed, running, queued])
    assert states[running] == "RUNNING"
    assert {states[done], states[failed]} == {"COMPLETE", "EXECUTOR_ERROR"}

    requests.post(f"{server.api}/tasks/{running}:cancel", timeout=10)
    wait_for_state(server.api, running, TERMINAL, 120, detail=lambda: server.log()[-3000:])
    wait_for_state(server.api, queued, TERMINAL, 120, detail=lambda: server.log()[-3000:])
    states = check_everything(server, [done, failed, running, queued])
    assert states[running] == "CANCELED" and states[queued] == "COMPLETE"


# ---- TES 1.1 semantics the measured clients rely on ----

def post(server: ServerProcess, task: dict) -> requests.Response:
    return requests.post(server.api + "/tasks", json=task, timeout=30)


def test_input_with_url_and_content_is_accepted(api_server):
    """TES: "If content is not empty, url must be ignored" (it was a 400)."""
    both = {"path": "/data/a.txt", "url": "s3://bucket/a.txt", "content": "inline"}
    task_id = create(api_server, {"executors": [sh("cat /data/a.txt")], "inputs": [both]})
    full = requests.get(f"{api_server.api}/tasks/{task_id}", params={"view": "FULL"},
                        timeout=10).json()
    assert full["inputs"] == [both]
    # the url is not even looked at: a scheme with no store is no reason to refuse
    ignored = {**both, "url": "nostore://bucket/a.txt"}
    assert post(api_server, {"executors": [sh("true")], "inputs": [ignored]}).ok
    # empty content is no content: the url is fetched, so it must be one the server has
    empty = {**both, "content": "", "url": "nostore://bucket/a.txt"}
    resp = post(api_server, {"executors": [sh("true")], "inputs": [empty]})
    assert resp.status_code == 400 and "nostore" in resp.json()["message"]
    # empty content alone is an empty file
    assert post(api_server, {"executors": [sh("true")],
                             "inputs": [{"path": "/data/empty", "content": ""}]}).ok


def test_input_with_url_and_content_runs_with_the_content(running_server):
    server = running_server
    unreachable = "http://127.0.0.1:9/never-fetched"  # discard port: fetching would fail
    task_id = create(server, {"executors": [sh("cat /data/a.txt")], "inputs": [
        {"path": "/data/a.txt", "url": unreachable, "content": "from content\n"}]})
    task = wait_for_state(server.api, task_id, TERMINAL, 120,
                          detail=lambda: server.log()[-3000:])
    assert task["state"] == "COMPLETE", task
    assert task["logs"][-1]["logs"][0]["stdout"] == "from content\n"


def test_name_prefix_is_a_case_sensitive_literal_prefix(api_server):
    """SQLite's LIKE ignored case; `%`, `_` and `\\` in a prefix are plain characters."""
    mark = "Np" + secrets.token_hex(4)
    names = {name: create(api_server, {"name": name, "executors": [sh("true")]})
             for name in (f"{mark}-Abc", f"{mark}-abc", f"{mark}-ABC_1", f"{mark}-É%\\x",
                          f"{mark}-é%\\x", f"{mark}-AbcXYZ")}

    def found(prefix: str) -> set[str]:
        page = requests.get(server_tasks(api_server), params={"name_prefix": prefix},
                            timeout=10).json()
        return {t["id"] for t in page["tasks"]}

    assert found(f"{mark}-Abc") == {names[f"{mark}-Abc"], names[f"{mark}-AbcXYZ"]}
    assert found(f"{mark}-abc") == {names[f"{mark}-abc"]}
    assert found(f"{mark}-ABC_") == {names[f"{mark}-ABC_1"]}
    assert found(f"{mark}-AB_") == set()
    assert found(f"{mark}-É%\\") == {names[f"{mark}-É%\\x"]}
    assert found(mark.lower()) == set()
    assert len(found(mark)) == len(names)


def server_tasks(server: ServerProcess) -> str:
    return server.api + "/tasks"


def test_page_size_must_be_less_than_2048(api_server):
    assert requests.get(server_tasks(api_server), params={"page_size": 2047}, timeout=30).ok
    resp = requests.get(server_tasks(api_server), params={"page_size": 2048}, timeout=30)
    assert resp.status_code == 400 and "page_size" in resp.json()["message"]


def test_service_info_advertises_the_configured_stores(api_server, running_server,
                                                       tmp_path_factory, databases):
    """service_info.storage empty (the default): the stores this server has."""
    info = requests.get(api_server.api + "/service-info", timeout=10).json()
    assert {"http://", "https://", "s3://"} <= set(info["storage"])
    assert not [url for url in info["storage"] if url.startswith("file:")]  # no allowed_dirs
    work = tmp_path_factory.mktemp("storage-info")
    server = ServerProcess(work, databases.new("sqlite"), overrides={
        "worker": {"allowed_dirs": ["/srv/data", "/scratch/"]},
        "storage": {"allowed_schemes": ["file", "s3"]}}).start()
    try:
        info = requests.get(server.api + "/service-info", timeout=10).json()
        assert info["storage"] == ["file:///srv/data/", "file:///scratch/", "s3://"]
        assert not service_info_errors(info)
    finally:
        server.stop()
    configured = ServerProcess(tmp_path_factory.mktemp("storage-set"), databases.new("sqlite"),
                               overrides={"service_info": {"storage": ["s3://lab-bucket"]}})
    configured.start()
    try:
        info = requests.get(configured.api + "/service-info", timeout=10).json()
        assert info["storage"] == ["s3://lab-bucket"]
    finally:
        configured.stop()


@pytest.mark.parametrize("kind,url,scheme", [
    ("inputs", "gopher://bucket/a", "gopher"),
    ("inputs", "nostore://bucket/a", "nostore"),
    ("inputs", "bucket/a", "(none)"),
    ("outputs", "webdav://host/out", "webdav"),
])
def test_url_scheme_without_a_store_is_400_naming_it(api_server, kind, url, scheme):
    item = {"path": "/data/x", "url": url}
    resp = post(api_server, {"executors": [sh("true")], kind: [item]})
    assert resp.status_code == 400, resp.text
    message = resp.json()["message"]
    assert message.startswith(f"{kind}.0.url:") and repr(scheme) in message, message


def test_allowed_scheme_list_is_honoured(tmp_path, databases):
    """A scheme with a store but left out of storage.allowed_schemes is refused too."""
    server = ServerProcess(tmp_path / "schemes", databases.new("sqlite"), overrides={
        "storage": {"allowed_schemes": ["file"]}}).start()
    try:
        resp = post(server, {"executors": [sh("true")],
                             "outputs": [{"path": "/data/x", "url": "s3://b/k"}]})
        assert resp.status_code == 400 and "'s3'" in resp.json()["message"]
        assert post(server, {"executors": [sh("true")],
                             "outputs": [{"path": "/data/x", "url": "file:///srv/k"}]}).ok
    finally:
        server.stop()


def test_url_schemes_with_a_store_are_accepted(api_server):
    items = [{"path": f"/data/{i}", "url": url} for i, url in enumerate(
        ["file:///srv/x", "/srv/bare/path", "s3://b/k", "http://h/x", "HTTPS://h/x",
         "ftp://h/x"])]
    assert post(api_server, {"executors": [sh("true")], "inputs": items}).ok
