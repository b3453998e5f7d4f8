"""The TES 1.1 HTTP API against a real server process, on SQLite and PostgreSQL."""

from __future__ import annotations

import copy
import secrets
from typing import Any

import pytest
import requests
from sqlalchemy import create_engine, text

from tests.api_helpers import row_count

TASK = {
    "name": "hello",
    "executors": [{"image": "busybox", "command": ["echo", "hello"]}],
}


def new_task(**fields):
    task = copy.deepcopy(TASK)
    task.update(fields)
    return task


def create(server, task) -> str:
    resp = requests.post(server.api + "/tasks", json=task, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def get(server, task_id, view=None):
    params = {"view": view} if view else {}
    return requests.get(f"{server.api}/tasks/{task_id}", params=params, timeout=10)


def list_tasks(server, **params):
    resp = requests.get(server.api + "/tasks", params=params, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()





def test_create_returns_id_and_task_starts_queued(api_server):
    task_id = create(api_server, new_task())
    body = get(api_server, task_id).json()
    assert body == {"id": task_id, "state": "QUEUED"}  # MINIMAL is the default view


def test_full_view_returns_what_was_sent(api_server):
    task = new_task(description="d", tags={"k": "v"}, volumes=["/vol/a"],
                    inputs=[{"path": "/in/a.txt", "content": "abc"}])
    task_id = create(api_server, task)
    full = get(api_server, task_id, "FULL").json()
    for key, value in task.items():
        assert full[key] == value
    assert full["state"] == "QUEUED"
    assert full["creation_time"].endswith("Z")


def test_basic_view_omits_content(api_server):
    task_id = create(api_server, new_task(inputs=[{"path": "/in/a", "content": "secret"}]))
    basic = get(api_server, task_id, "BASIC").json()
    assert "content" not in basic["inputs"][0]
    assert basic["inputs"][0]["path"] == "/in/a"
    assert basic["executors"] == TASK["executors"]


def test_read_only_fields_from_client_are_ignored(api_server):
    task = new_task(id="mine", state="COMPLETE", logs=[{"system_logs": ["x"]}],
                    creation_time="2000-01-01T00:00:00Z")
    task_id = create(api_server, task)
    full = get(api_server, task_id, "FULL").json()
    assert task_id != "mine"
    assert full["state"] == "QUEUED"
    assert "logs" not in full
    assert full["creation_time"] != "2000-01-01T00:00:00Z"


def test_cancel_queued_task_then_cancel_again_is_no_change(api_server):
    task_id = create(api_server, new_task())
    resp = requests.post(f"{api_server.api}/tasks/{task_id}:cancel", timeout=10)
    assert resp.status_code == 200 and resp.json() == {}
    assert get(api_server, task_id).json()["state"] == "CANCELED"
    again = requests.post(f"{api_server.api}/tasks/{task_id}:cancel", timeout=10)
    assert again.status_code == 200
    assert get(api_server, task_id).json()["state"] == "CANCELED"


def test_list_pages_and_filters(api_server):
    prefix = "lst-" + secrets.token_hex(4)
    ids = [create(api_server, new_task(name=f"{prefix}-{i}", tags={"batch": prefix, "i": str(i)}))
           for i in range(7)]
    seen = []
    token = None
    while True:
        params = {"name_prefix": prefix, "page_size": 3}
        if token:
            params["page_token"] = token
        page = list_tasks(api_server, **params)
        assert len(page["tasks"]) <= 3
        seen += [t["id"] for t in page["tasks"]]
        token = page.get("next_page_token")
        if not token:
            break
    assert seen == list(reversed(ids))  # newest first, each exactly once
    # state filter
    requests.post(f"{api_server.api}/tasks/{ids[0]}:cancel", timeout=10)
    canceled = list_tasks(api_server, name_prefix=prefix, state="CANCELED")["tasks"]
    assert [t["id"] for t in canceled] == [ids[0]]
    # MINIMAL list entries carry id and state only
    assert set(canceled[0]) == {"id", "state"}
    basic = list_tasks(api_server, name_prefix=prefix, view="BASIC", page_size=1)["tasks"][0]
    assert basic["name"].startswith(prefix) and "executors" in basic


def test_tag_filters_follow_tes_semantics(api_server):
    """The match table of the TES 1.1 ListTasks tag_key/tag_value description."""
    mark = "tag-" + secrets.token_hex(4)

    def make(tags):
        return create(api_server, new_task(name=mark, tags=tags))

    foo_bar = make({"foo": "bar"})
    foo_bat = make({"foo": "bat"})
    foo_empty = make({"foo": ""})
    foo_bar_baz_bat = make({"foo": "bar", "baz": "bat"})
    nothing = make({})

    def ids(keys, values):
        params = {"name_prefix": mark, "tag_key": keys, "tag_value": values}
        return {t["id"] for t in list_tasks(api_server, **params)["tasks"]}

    assert ids(["foo"], ["bar"]) == {foo_bar, foo_bar_baz_bat}
    assert foo_bat not in ids(["foo"], ["bar"])
    assert ids(["foo"], [""]) == {foo_bar, foo_bat, foo_empty, foo_bar_baz_bat}
    assert ids(["foo"], []) == {foo_bar, foo_bat, foo_empty, foo_bar_baz_bat}
    assert ids(["foo", "baz"], ["bar", "bat"]) == {foo_bar_baz_bat}
    assert nothing not in ids(["foo"], [""])


def test_name_prefix_is_literal(api_server):
    mark = secrets.token_hex(4)
    wanted = create(api_server, new_task(name=f"{mark}_a%b"))
    create(api_server, new_task(name=f"{mark}XaYb"))
    found = [t["id"] for t in list_tasks(api_server, name_prefix=f"{mark}_a%")["tasks"]]
    assert found == [wanted]


def test_service_info(api_server):
    info = requests.get(api_server.api + "/service-info", timeout=10).json()
    assert info["type"] == {"group": "org.ga4gh", "artifact": "tes", "version": "1.1.0"}
    assert {"id", "name", "organization", "version", "storage"} <= set(info)
    assert sorted(info["tesResources_backend_parameters"]) == ["gpus", "queue", "vmsize"]


def test_openapi_document_is_served(api_server):
    spec = requests.get(api_server.api + "/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.")
    for path in ("/ga4gh/tes/v1/tasks", "/ga4gh/tes/v1/tasks/{task_id}",
                 "/ga4gh/tes/v1/tasks/{task_id}:cancel", "/ga4gh/tes/v1/service-info"):
        assert path in spec["paths"]


def test_legacy_v1_routes_behave_the_same(api_server):
    resp = requests.post(api_server.url + "/v1/tasks", json=new_task(name="legacy"), timeout=10)
    assert resp.status_code == 200
    task_id = resp.json()["id"]
    via_new = get(api_server, task_id, "FULL").json()
    via_old = requests.get(f"{api_server.url}/v1/tasks/{task_id}?view=FULL", timeout=10).json()
    assert via_new == via_old
    assert requests.get(api_server.url + "/v1/tasks/service-info", timeout=10).ok
    assert requests.post(f"{api_server.url}/v1/tasks/{task_id}:cancel", timeout=10).ok
    assert get(api_server, task_id).json()["state"] == "CANCELED"
    assert requests.get(f"{api_server.url}/v1/tasks/nosuchtask", timeout=10).status_code == 404


def test_backend_parameters_strict_and_lenient(api_server):
    lenient = create(api_server, new_task(resources={"backend_parameters": {"queue": "q1",
                                                                             "gpu": "2"}}))
    full = get(api_server, lenient, "FULL").json()
    assert full["resources"]["backend_parameters"] == {"queue": "q1"}
    assert "gpu" in full["logs"][0]["system_logs"][0]
    strict = requests.post(api_server.api + "/tasks", timeout=10, json=new_task(resources={
        "backend_parameters": {"gpu": "2"}, "backend_parameters_strict": True}))
    assert strict.status_code == 400
    assert "gpu" in strict.json()["message"]
    # keys are case-insensitive
    create(api_server, new_task(resources={"backend_parameters": {"QUEUE": "q", "vmsize": "x"},
                                           "backend_parameters_strict": True}))


BAD_BODIES = {
    "malformed json": "{not json",
    "truncated json": '{"executors": [',
    "json array": "[]",
    "json string": '"task"',
    "json null": "null",
    "empty body": "",
}

BAD_TASKS = {
    "no executors": {"name": "x"},
    "empty executors": {"executors": []},
    "executors not a list": {"executors": {"image": "a", "command": ["b"]}},
    "executor without image": {"executors": [{"command": ["echo"]}]},
    "executor with empty image": {"executors": [{"image": "", "command": ["echo"]}]},
    "executor without command": {"executors": [{"image": "busybox"}]},
    "executor with empty command": {"executors": [{"image": "busybox", "command": []}]},
    "command not strings": {"executors": [{"image": "busybox", "command": [1, 2]}]},
    "command a string": {"executors": [{"image": "busybox", "command": "echo hi"}]},
    "relative workdir": {"executors": [{"image": "b", "command": ["x"], "workdir": "tmp"}]},
    "relative stdout": {"executors": [{"image": "b", "command": ["x"], "stdout": "out.txt"}]},
    "dotdot stdin": {
        "executors": [{"image": "b", "command": ["x"], "stdin": "/a/../../etc/passwd"}]},
    "bad env name": {"executors": [{"image": "b", "command": ["x"], "env": {"A-B": "1"}}]},
    "env value not string": {"executors": [{"image": "b", "command": ["x"], "env": {"A": 1}}]},
    "ignore_error not bool": {"executors": [{"image": "b", "command": ["x"],
                                             "ignore_error": "maybe"}]},
    "input neither url nor content": {**TASK, "inputs": [{"path": "/a"}]},
    "input relative path": {**TASK, "inputs": [{"path": "a", "url": "s3://b/c"}]},
    "input dotdot path": {**TASK, "inputs": [{"path": "/data/../../x", "url": "s3://b/c"}]},
    "input without path": {**TASK, "inputs": [{"url": "s3://b/c"}]},
    "input bad type": {**TASK, "inputs": [{"path": "/a", "url": "s3://b/c", "type": "LINK"}]},
    "output without url": {**TASK, "outputs": [{"path": "/a"}]},
    "output relative path": {**TASK, "outputs": [{"path": "out", "url": "s3://b/c"}]},
    "wildcard output without prefix": {**TASK, "outputs": [{"path": "/out/*.txt",
                                                            "url": "s3://b/c"}]},
    "path with newline": {**TASK, "outputs": [{"path": "/out/a\nb", "url": "s3://b/c"}]},
    "relative volume": {**TASK, "volumes": ["vol"]},
    "negative cpu": {**TASK, "resources": {"cpu_cores": -1}},
    "cpu not integer": {**TASK, "resources": {"cpu_cores": "four"}},
    "ram not number": {**TASK, "resources": {"ram_gb": "lots"}},
    "zones not list": {**TASK, "resources": {"zones": "us-east"}},
    "tags not strings": {**TASK, "tags": {"a": 1}},
    "name not string": {**TASK, "name": 5},
    # unknown fields are ignored (test_interop.py), refused with server.strict_fields
}

BAD_QUERIES: dict[str, tuple[str, dict[str, Any]]] = {
    "unknown view": ("/tasks", {"view": "EVERYTHING"}),
    "lowercase view": ("/tasks", {"view": "full"}),
    "unknown state": ("/tasks", {"state": "DONE"}),
    "page_size zero": ("/tasks", {"page_size": 0}),
    "page_size too big": ("/tasks", {"page_size": 5000}),
    "page_size 2048 (TES: less than 2048)": ("/tasks", {"page_size": 2048}),
    "page_size not int": ("/tasks", {"page_size": "ten"}),
    "bad page_token": ("/tasks", {"page_token": "garbage!"}),
    "forged page_token": ("/tasks", {"page_token": "djI6MTA"}),
    "tag_value without key": ("/tasks", {"tag_value": "x"}),
    "get unknown view": ("/tasks/abc", {"view": "ALL"}),
}


@pytest.mark.parametrize("name", sorted(BAD_BODIES))
def test_bad_body_is_400_and_stores_nothing(api_server, name):
    before = row_count(api_server)
    resp = requests.post(api_server.api + "/tasks", data=BAD_BODIES[name], timeout=10,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["message"].startswith("body")
    assert row_count(api_server) == before


@pytest.mark.parametrize("name", sorted(BAD_TASKS))
def test_bad_task_is_400_naming_the_field(api_server, name):
    before = row_count(api_server)
    resp = requests.post(api_server.api + "/tasks", json=BAD_TASKS[name], timeout=10)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["code"] == 400 and ":" in body["message"], body
    assert row_count(api_server) == before


@pytest.mark.parametrize("name", sorted(BAD_QUERIES))
def test_bad_query_is_400(api_server, name):
    path, params = BAD_QUERIES[name]
    resp = requests.get(api_server.api + path, params=params, timeout=10)
    assert resp.status_code == 400, resp.text
    assert resp.json()["message"]


def test_field_named_in_messages(api_server):
    cases = {
        "executors": BAD_TASKS["no executors"],
        "executors.0.image": BAD_TASKS["executor without image"],
        "executors.0.command": BAD_TASKS["executor with empty command"],
        "inputs.0.url": BAD_TASKS["input neither url nor content"],
        "inputs.0.path": BAD_TASKS["input dotdot path"],
        "outputs.0.path_prefix": BAD_TASKS["wildcard output without prefix"],
    }
    for field_name, task in cases.items():
        message = requests.post(api_server.api + "/tasks", json=task, timeout=10).json()["message"]
        assert field_name + ":" in message, (field_name, message)


def test_oversized_body_is_400(api_server):
    before = row_count(api_server)
    huge = new_task(description="x" * (17 * 1024 * 1024))
    resp = requests.post(api_server.api + "/tasks", json=huge, timeout=30)
    assert resp.status_code == 400
    assert "limit" in resp.json()["message"]
    assert row_count(api_server) == before


@pytest.mark.parametrize("path", ["/tasks/doesnotexist", "/tasks/a%2F..%2Fb",
                                  "/tasks/" + "x" * 300])
def test_unknown_task_is_404(api_server, path):
    resp = requests.get(api_server.api + path, timeout=10)
    assert resp.status_code == 404
    assert "not found" in resp.json()["message"]


def test_cancel_unknown_task_is_404(api_server):
    before = row_count(api_server)
    resp = requests.post(api_server.api + "/tasks/nosuchtask:cancel", timeout=10)
    assert resp.status_code == 404
    assert row_count(api_server) == before


def test_concurrent_creates_all_stored(api_server):
    from concurrent.futures import ThreadPoolExecutor

    mark = "conc-" + secrets.token_hex(4)
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: create(api_server, new_task(name=f"{mark}-{i}")), range(80)))
    assert len(set(ids)) == 80
    listed = list_tasks(api_server, name_prefix=mark, page_size=2047)["tasks"]
    assert {t["id"] for t in listed} == set(ids)


def test_sqlite_runs_in_wal_mode(api_server):
    if not api_server.db_url.startswith("sqlite"):
        pytest.skip("SQLite only")
    engine = create_engine(api_server.db_url)
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()
