"""What CWL runners, later-TES and older clients need of the API (issue 30), through a
real server with auth on: strict booleans, unknown fields ignored and named (or refused
with server.strict_fields), every schema-valid body of the official TES 1.1 document
accepted unless it breaks a rule docs/reference.md lists, and /v1 documents that hold
only TES 1.0 fields."""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests

from tests.server_helpers import REPO, ServerProcess
from tests.tes_body_helpers import SERVER_RULES, bodies, broken_rules

ALICE = ("alice", "alice-pw")
GENERATED = 240


def executor(**fields) -> dict:
    return {"image": "busybox", "command": ["echo", "hi"], **fields}


def post(server: ServerProcess, task: dict) -> requests.Response:
    return requests.post(server.api + "/tasks", json=task, auth=ALICE, timeout=30)


def get(server: ServerProcess, path: str, **params) -> dict:
    resp = requests.get(server.url + path, params=params, auth=ALICE, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.fixture(scope="module")
def strict_server(databases, tmp_path_factory):
    """A server with auth on and server.strict_fields: true."""
    from werkzeug.security import generate_password_hash

    server = ServerProcess(tmp_path_factory.mktemp("strict"), databases.new("sqlite"),
                           overrides={"server": {"strict_fields": True}, "auth": {
                               "mode": "basic", "users": {
                                   "alice": generate_password_hash("alice-pw")}}}).start()
    yield server
    server.stop()


# ---- booleans ----

@pytest.mark.parametrize("value", ["yes", "true", "false", 0, 1, 0.0, [], {}])
@pytest.mark.parametrize("where", ["executors.0.ignore_error", "resources.preemptible",
                                   "resources.backend_parameters_strict",
                                   "inputs.0.streamable"])
def test_booleans_are_true_or_false_only(alice_server, where, value):
    task: dict[str, Any] = {"executors": [executor()], "resources": {},
                            "inputs": [{"path": "/data/x", "content": "x"}]}
    *parents, name = where.split(".")
    node: Any = task
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[name] = value
    resp = post(alice_server, task)
    assert resp.status_code == 400, resp.text
    assert resp.json()["message"] == f"{where}: must be true or false (a JSON boolean)"
    node[name] = True
    assert post(alice_server, task).status_code == 200


# ---- unknown fields ----

def test_unknown_fields_are_ignored_and_named(alice_server):
    task = {"name": "later-tes", "bar": 1, "executors": [executor(foo={"x": 1})],
            "resources": {"cpu_cores": 1, "gpu_type": "a100"},
            "outputs": [{"path": "/data/o", "url": "file:///tmp/o", "checksum": "sha1"}]}
    resp = post(alice_server, task)
    assert resp.status_code == 200, resp.text
    warning = resp.headers["Warning"]
    assert warning.startswith('299 - "unknown fields ignored: ') and warning.endswith('"')
    named = set(warning[len('299 - "unknown fields ignored: '):-1].split(", "))
    assert named == {"bar", "executors.0.foo", "resources.gpu_type", "outputs.0.checksum"}
    full = get(alice_server, f"/ga4gh/tes/v1/tasks/{resp.json()['id']}", view="FULL")
    assert "foo" not in full["executors"][0] and "bar" not in full
    assert full["resources"] == {"cpu_cores": 1}
    logs = full["logs"][0]["system_logs"]
    assert any(line.startswith("unknown fields ignored: ") and "executors.0.foo" in line
               for line in logs), logs
    # nothing is said when nothing was ignored
    assert "Warning" not in post(alice_server, {"executors": [executor()]}).headers


def test_hostile_field_names_stay_in_one_printable_header(alice_server):
    names = ['a"b', "c\r\nSet-Cookie: x=1", "\u00e9\u2028", "\\", "b" * 500] + \
        [f"k{i}" for i in range(100)]
    task = {"executors": [executor(**dict.fromkeys(names, 1))]}
    resp = post(alice_server, task)
    assert resp.status_code == 200, resp.text
    assert "Set-Cookie" not in resp.headers
    assert len(resp.raw.headers.getlist("Warning")) == 1
    warning = resp.headers["Warning"]
    assert re.fullmatch(r'299 - "[\x20-\x7e]*"', warning), warning
    # named in order: escaped as JSON escapes them, cut at 100 characters, 20 at most
    assert warning.startswith(r'299 - "unknown fields ignored: executors.0.\\, '
                              r'executors.0.a\"b, executors.0.' + "b" * 88 + "..., "
                              r"executors.0.c\r\nSet-Cookie: x=1, executors.0.k0, "), warning
    assert warning.endswith(' and 85 more"') and len(warning) < 4000


def test_an_unknown_field_named_by_a_lone_surrogate_is_named_escaped(alice_server):
    body = '{"\\udc00": 1, "executors": [{"image": "b", "command": ["x"]}]}'
    resp = requests.post(alice_server.api + "/tasks", data=body, auth=ALICE, timeout=30,
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["Warning"] == r'299 - "unknown fields ignored: \udc00"'
    full = get(alice_server, f"/ga4gh/tes/v1/tasks/{resp.json()['id']}", view="FULL")
    assert r"unknown fields ignored: \udc00" in full["logs"][0]["system_logs"]


def test_strict_fields_refuses_unknown_fields(strict_server):
    resp = post(strict_server, {"executors": [executor(foo=1)], "bar": 2})
    assert resp.status_code == 400
    assert "executors.0.foo: Unknown field." in resp.json()["message"]
    assert "bar: Unknown field." in resp.json()["message"]
    assert post(strict_server, {"executors": [executor()]}).status_code == 200


def test_every_schema_valid_body_is_taken_unless_a_listed_rule_refuses_it(alice_server):
    """Bodies generated from the official TES 1.1 document (tests/tes_body_helpers.py):
    each is accepted, or refused by a rule that docs/reference.md lists; never for an
    unknown field (TES 1.1 does not forbid additional properties)."""
    reference = (REPO / "docs" / "reference.md").read_text()
    accepted, unexplained, with_unknown = 0, [], 0
    refused_by: dict[str, int] = {}
    for body in bodies(GENERATED):
        resp = post(alice_server, body)
        if resp.status_code == 200:
            accepted += 1
            with_unknown += "Warning" in resp.headers
            continue
        assert resp.status_code == 400, (resp.status_code, resp.text, body)
        message = resp.json()["message"]
        assert "Unknown field" not in message, (message, body)
        rules = broken_rules(message)
        if not rules:
            unexplained.append((message, body))
        for rule in rules:
            refused_by[rule] = refused_by.get(rule, 0) + 1
    assert unexplained == [], unexplained[:5]
    print(f"{accepted}/{GENERATED} accepted ({with_unknown} with unknown fields ignored); "
          f"refused by {refused_by}")
    assert accepted >= GENERATED // 4 and with_unknown > 0
    for rule in SERVER_RULES:
        assert f"| {rule} |" in reference, f"docs/reference.md does not list rule {rule!r}"


# ---- /v1: TES 1.0 documents ----

TES11_TASK = {
    "name": "tes11-fields",
    "inputs": [{"path": "/data/in", "content": "x", "streamable": True}],
    "outputs": [{"path": "/data/out/*.txt", "path_prefix": "/data/out",
                 "url": "file:///tmp/out", "type": "FILE"},
                {"path": "/data/o2", "url": "file:///tmp/o2", "type": "DIRECTORY"}],
    "resources": {"cpu_cores": 1, "backend_parameters": {"unsupported": "1"},
                  "backend_parameters_strict": False, "preemptible": True},
    "executors": [executor(ignore_error=True)],
}


def test_v1_documents_hold_only_tes10_fields(alice_server):
    task_id = post(alice_server, TES11_TASK).json()["id"]
    for view in ("BASIC", "FULL"):
        new = get(alice_server, f"/ga4gh/tes/v1/tasks/{task_id}", view=view)
        old = get(alice_server, f"/v1/tasks/{task_id}", view=view)
        assert new["inputs"][0]["streamable"] is True and "ignore_error" in new["executors"][0]
        assert "streamable" not in old["inputs"][0]
        assert "ignore_error" not in old["executors"][0]
        assert old["resources"] == {"cpu_cores": 1, "preemptible": True}
        assert old["outputs"][0] == {"path": "/data/out/*.txt", "url": "file:///tmp/out"}
        assert old["outputs"][1]["type"] == "DIRECTORY"
        listed = get(alice_server, "/v1/tasks", view=view)["tasks"]
        assert [t for t in listed if t["id"] == task_id][0] == old


# ---- gRPC ----

def grpc_create(server: ServerProcess, raw: bytes):
    """CreateTask with a raw request (fields this proto lacks), as alice; (id, trailers)."""
    import grpc

    from funnel_hpc.proto import tes_pb2

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    try:
        call = channel.unary_unary("/tes.TaskService/CreateTask",
                                   request_serializer=lambda body: body,
                                   response_deserializer=tes_pb2.CreateTaskResponse.FromString)
        basic = "Basic " + __import__("base64").b64encode(b"alice:alice-pw").decode()
        response, outcome = call.with_call(raw, metadata=[("authorization", basic)], timeout=30)
        return response.id, dict(outcome.trailing_metadata() or ())
    finally:
        channel.close()


def test_grpc_unknown_fields_are_named_or_refused(alice_server, strict_server):
    import grpc
    from google.protobuf import json_format

    from funnel_hpc.proto import tes_pb2

    executors = tes_pb2.Task.DESCRIPTOR.fields_by_name["executors"].number
    executor = tes_pb2.Executor(image="busybox", command=["true"]).SerializeToString() + \
        bytes([0xd0, 0x02, 0x01])                          # field 42 (varint): unknown
    raw = tes_pb2.Task(name="later").SerializeToString() + \
        bytes([executors << 3 | 2, len(executor)]) + executor + \
        bytes([0x98, 0x06, 0x05])                          # field 99 (varint): unknown
    task_id, trailers = grpc_create(alice_server, raw)
    assert trailers["warning"] == "unknown fields ignored: #99, executors.0.#42"
    full = get(alice_server, f"/ga4gh/tes/v1/tasks/{task_id}", view="FULL")
    assert full["executors"] == [{"image": "busybox", "command": ["true"]}]
    assert trailers["warning"] in full["logs"][0]["system_logs"]
    with pytest.raises(grpc.RpcError) as refused:
        grpc_create(strict_server, raw)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "#99: Unknown field." in refused.value.details()
    # booleans over gRPC are proto bools: nothing but true or false can be sent
    assert json_format.MessageToDict(tes_pb2.Executor(ignore_error=True))["ignoreError"] is True
