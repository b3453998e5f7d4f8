"""gRPC tes.TaskService through a real channel to a real server, with HTTP parity."""

from __future__ import annotations

import filecmp
import secrets
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import requests
from google.protobuf import json_format

from funnel_hpc.proto import tes_pb2, tes_pb2_grpc
from tests.pytes_helpers import EVERY_FIELD
from tests.server_helpers import ServerProcess

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def stub(api_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{api_server.grpc_port}")
    grpc.channel_ready_future(channel).result(timeout=10)
    yield tes_pb2_grpc.TaskServiceStub(channel)
    channel.close()


def message(document: dict) -> tes_pb2.Task:
    return json_format.ParseDict(document, tes_pb2.Task())


def as_json(msg) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def http_json(server, path: str, **params) -> dict:
    resp = requests.get(f"{server.api}{path}", params=params, timeout=10)
    assert resp.ok, resp.text
    return resp.json()


def http_task(server, task_id, view="FULL") -> tes_pb2.Task:
    return message(http_json(server, f"/tasks/{task_id}", view=view))


def test_create_over_grpc_read_over_http_identically(stub, api_server):
    task_id = stub.CreateTask(message(EVERY_FIELD)).id
    for view in ("MINIMAL", "BASIC", "FULL"):
        # the very same TES JSON, whichever protocol reads it
        assert as_json(stub.GetTask(tes_pb2.GetTaskRequest(id=task_id, view=view))) == \
            http_json(api_server, f"/tasks/{task_id}", view=view)
    over_grpc = stub.GetTask(tes_pb2.GetTaskRequest(id=task_id, view="FULL"))
    assert over_grpc.state == tes_pb2.QUEUED
    assert over_grpc.inputs[1].content == "hello\n"
    assert dict(over_grpc.tags) == EVERY_FIELD["tags"]


def test_create_over_http_read_over_grpc_identically(stub, api_server):
    # (equal as messages: proto3 cannot tell an explicit false/0/"" from an unset field)
    task_id = requests.post(api_server.api + "/tasks", json=EVERY_FIELD, timeout=10).json()["id"]
    for view in ("MINIMAL", "BASIC", "FULL"):
        assert stub.GetTask(tes_pb2.GetTaskRequest(id=task_id, view=view)) == \
            http_task(api_server, task_id, view)


def test_list_views_match_http(stub, api_server):
    mark = "views-" + secrets.token_hex(4)
    stub.CreateTask(message({**EVERY_FIELD, "name": mark}))
    pages = {}
    for view in ("MINIMAL", "BASIC", "FULL"):
        page = stub.ListTasks(tes_pb2.ListTasksRequest(name_prefix=mark, view=view))
        assert as_json(page) == http_json(api_server, "/tasks", name_prefix=mark, view=view)
        assert len(page.tasks) == 1
        pages[view] = page.tasks[0]
    assert set(as_json(pages["MINIMAL"])) == {"id", "state"}
    assert pages["BASIC"].executors and not any(i.content for i in pages["BASIC"].inputs)
    assert pages["FULL"].inputs[1].content == "hello\n"


def test_views_trim(stub):
    task_id = stub.CreateTask(message(EVERY_FIELD)).id
    minimal = stub.GetTask(tes_pb2.GetTaskRequest(id=task_id))
    assert minimal.id == task_id and not minimal.executors and not minimal.name
    basic = stub.GetTask(tes_pb2.GetTaskRequest(id=task_id, view="BASIC"))
    assert basic.executors and all(not i.content for i in basic.inputs)


def test_pages_filters_and_cancel(stub, api_server):
    mark = "grpc-" + secrets.token_hex(4)
    ids = [stub.CreateTask(message({"name": f"{mark}-{i}", "tags": {"g": mark, "i": str(i)},
                                    "executors": EVERY_FIELD["executors"]})).id
           for i in range(5)]
    seen, token = [], ""
    while True:
        page = stub.ListTasks(tes_pb2.ListTasksRequest(name_prefix=mark, page_size=2,
                                                       page_token=token))
        seen += [t.id for t in page.tasks]
        if not page.HasField("next_page_token"):
            break
        token = page.next_page_token
    assert seen == list(reversed(ids))
    tagged = stub.ListTasks(tes_pb2.ListTasksRequest(tag_key=["g", "i"], tag_value=[mark, "3"]))
    assert [t.id for t in tagged.tasks] == [ids[3]]
    any_value = stub.ListTasks(tes_pb2.ListTasksRequest(tag_key=["g"], page_size=100))
    assert set(ids) <= {t.id for t in any_value.tasks}

    stub.CancelTask(tes_pb2.CancelTaskRequest(id=ids[0]))
    canceled = stub.ListTasks(tes_pb2.ListTasksRequest(name_prefix=mark, state=tes_pb2.CANCELED))
    assert [t.id for t in canceled.tasks] == [ids[0]]
    # the same list over HTTP
    http_ids = [t["id"] for t in requests.get(api_server.api + "/tasks", timeout=10, params={
        "name_prefix": mark, "state": "CANCELED"}).json()["tasks"]]
    assert http_ids == [ids[0]]


@pytest.mark.parametrize("call,request_message,code,needle", [
    ("CreateTask", tes_pb2.Task(name="no executors"),
     grpc.StatusCode.INVALID_ARGUMENT, "executors"),
    ("CreateTask", tes_pb2.Task(executors=[tes_pb2.Executor(image="b")]),
     grpc.StatusCode.INVALID_ARGUMENT, "executors.0.command"),
    ("CreateTask", tes_pb2.Task(executors=[tes_pb2.Executor(image="b", command=["x"])],
                                inputs=[tes_pb2.Input(path="rel", url="s3://b/k")]),
     grpc.StatusCode.INVALID_ARGUMENT, "inputs.0.path"),
    ("GetTask", tes_pb2.GetTaskRequest(id="nosuchtask"),
     grpc.StatusCode.NOT_FOUND, "not found"),
    ("GetTask", tes_pb2.GetTaskRequest(id="x", view="ALL"),
     grpc.StatusCode.INVALID_ARGUMENT, "view"),
    ("ListTasks", tes_pb2.ListTasksRequest(page_token="bogus!"),
     grpc.StatusCode.INVALID_ARGUMENT, "page_token"),
    ("ListTasks", tes_pb2.ListTasksRequest(page_size=5000), grpc.StatusCode.INVALID_ARGUMENT,
     "page_size"),
    ("ListTasks", tes_pb2.ListTasksRequest(view="EVERYTHING"), grpc.StatusCode.INVALID_ARGUMENT,
     "view"),
    ("ListTasks", tes_pb2.ListTasksRequest(tag_key=["a"], tag_value=["1", "2"]),
     grpc.StatusCode.INVALID_ARGUMENT, "tag_value"),
    ("CancelTask", tes_pb2.CancelTaskRequest(id="nosuchtask"), grpc.StatusCode.NOT_FOUND,
     "not found"),
])
def test_errors(stub, call, request_message, code, needle):
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, call)(request_message)
    assert caught.value.code() == code
    assert needle in caught.value.details()


def test_service_info_and_reflection(stub, api_server):
    info = stub.GetServiceInfo(tes_pb2.GetServiceInfoRequest())
    assert info.type.artifact == "tes" and info.name == "funnel-hpc"
    over_http = json_format.ParseDict(http_json(api_server, "/service-info"),
                                      tes_pb2.ServiceInfo(), ignore_unknown_fields=True)
    assert info == over_http
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{api_server.grpc_port}")
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflect.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"tes.TaskService", "funnel.v1.EventService"} <= names
    channel.close()


def test_database_busy_is_unavailable(databases, tmp_path):
    url = databases.new("sqlite")
    server = ServerProcess(tmp_path / "srv", url,
                           overrides={"database": {"sqlite_busy_timeout": 1}}).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    try:
        stub = tes_pb2_grpc.TaskServiceStub(channel)
        task = message({"executors": [{"image": "busybox", "command": ["true"]}]})
        stub.CreateTask(task, timeout=10)
        holder = sqlite3.connect(url.split("///", 1)[1], isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            with pytest.raises(grpc.RpcError) as caught:
                stub.CreateTask(task, timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "retry" in caught.value.details()
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        stub.CreateTask(task, timeout=10)
        assert len(stub.ListTasks(tes_pb2.ListTasksRequest()).tasks) == 2
    finally:
        channel.close()
        server.stop()


def test_generated_stubs_are_current(tmp_path):
    subprocess.run(["bash", str(REPO / "scripts" / "gen-proto.sh"), str(tmp_path)], check=True,
                   cwd=REPO, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    for source in sorted((REPO / "proto").glob("*.proto")):
        for name in (f"{source.stem}_pb2.py", f"{source.stem}_pb2.pyi",
                     f"{source.stem}_pb2_grpc.py"):
            assert (tmp_path / name).exists(), f"scripts/gen-proto.sh does not make {name}"
            assert filecmp.cmp(tmp_path / name, REPO / "proto" / name, shallow=False), \
                f"proto/{name} is stale: run scripts/gen-proto.sh"
