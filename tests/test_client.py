"""The Python clients: HTTP's (core/client.py) retries on 429/503 after Retry-After,
pages, the server's message in errors, credentials; then one set of tests on a real server
run over both transports, HTTP and gRPC (proto/client.py): create, get, list pages,
cancel, wait, watch (owners kept apart, resumed without gap or repeat), auth errors and
a full watch stream the client waits out."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import requests
from werkzeug.security import generate_password_hash

from funnel_hpc.core.client import ClientError, TaskClient, TesClient, retry_after
from funnel_hpc.core.sse import messages
from funnel_hpc.proto import funnel_events_pb2, funnel_events_pb2_grpc
from funnel_hpc.proto.client import TesGrpcClient
from tests.events_helpers import ScriptedServer, record, take
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for

TASK = {"executors": [{"image": "busybox", "command": ["true"]}]}


@pytest.fixture
def scripted() -> Iterator[list]:
    """A list of (status, headers, body) answers, served in turn by a ScriptedServer
    (the last one repeats); the server is the list's ``server`` attribute."""
    answers: list = []

    def answer(method, path, query, headers):
        return answers.pop(0) if len(answers) > 1 else answers[0]

    server = ScriptedServer(answer)
    holder = _Answers(answers, server)
    yield holder
    server.close()


class _Answers(list):
    def __init__(self, answers: list, server: ScriptedServer):
        super().__init__()
        self.answers = answers
        self.server = server


def test_503_and_429_are_retried_after_retry_after(scripted):
    scripted.answers += [(503, {"Retry-After": "0"}, {"message": "busy"}),
                         (429, {"Retry-After": "Thu, 01 Jan 1970 00:00:00 GMT"}, {}),
                         (200, {}, {"id": "t1", "state": "QUEUED"})]
    api = TesClient(scripted.server.url, retries=3)
    assert api.get("t1") == {"id": "t1", "state": "QUEUED"}
    assert len(scripted.server.requests) == 3


def test_when_retries_run_out_the_error_carries_the_servers_message(scripted):
    scripted.answers += [(503, {"Retry-After": "0"}, {"code": 503, "message": "db busy"})]
    with pytest.raises(ClientError) as caught:
        TesClient(scripted.server.url, retries=2).get("t1")
    assert caught.value.status == 503 and caught.value.transient
    assert caught.value.server_message == "db busy" and "db busy" in str(caught.value)
    assert len(scripted.server.requests) == 3


def test_without_retries_a_503_is_an_error_at_once(scripted):
    scripted.answers += [(503, {"Retry-After": "0"}, {"message": "busy"})]
    with pytest.raises(ClientError):
        TesClient(scripted.server.url).get("t1")
    assert len(scripted.server.requests) == 1


def test_a_400_is_not_retried_and_says_why(scripted):
    scripted.answers += [(400, {}, {"code": 400, "message": "executors: required"})]
    with pytest.raises(ClientError) as caught:
        TesClient(scripted.server.url, retries=5).create({})
    assert caught.value.status == 400 and not caught.value.transient
    assert caught.value.server_message == "executors: required"
    assert len(scripted.server.requests) == 1


def test_list_all_follows_page_tokens():
    pages = {None: ({"tasks": [{"id": "a"}, {"id": "b"}], "next_page_token": "p2"}),
             "p2": ({"tasks": [{"id": "c"}], "next_page_token": "p3"}),
             "p3": ({"tasks": [{"id": "d"}]})}
    server = ScriptedServer(lambda m, p, query, h: (200, {}, pages[query.get("page_token")]))
    try:
        got = [task["id"] for task in TesClient(server.url).list_all(state="QUEUED")]
        assert got == ["a", "b", "c", "d"]
        assert len(server.requests) == 3
    finally:
        server.close()


def test_credentials_basic_and_bearer(scripted):
    scripted.answers += [(200, {}, {"id": "x", "state": "QUEUED"})]
    TesClient(scripted.server.url, username="alice", password="pw").get("x")
    TesClient(scripted.server.url, token="tok").get("x")
    basic, bearer = (headers["Authorization"] for _, _, headers in scripted.server.requests)
    assert basic == "Basic YWxpY2U6cHc=" and bearer == "Bearer tok"


def test_retry_after_values():
    assert retry_after("5", 0, 60) == 5
    assert retry_after("500", 0, 60) == 60
    assert retry_after(None, 3, 60) == 8
    assert retry_after("not a date", 0, 60) == 1
    assert retry_after("Thu, 01 Jan 1970 00:00:00 GMT", 0, 60) == 0


def test_sse_messages_split_anywhere():
    stream = (b"retry: 2000\nid: 6\n\n: keep-alive\n\n"
              b"id: 7\nevent: state\ndata: {\"a\"\r\ndata: :1}\n\n")
    chunks = [stream[i:i + 3] for i in range(0, len(stream), 3)]
    position, message = messages(chunks)
    assert (position.id, position.data) == ("6", "")  # where the stream starts
    assert (message.id, message.event, message.data) == ("7", "state", '{"a"\n:1}')


# ---- a real server, over HTTP and gRPC ----

PASSWORDS = {"alice": "pw", "bob": "pw2"}
TOKENS = {"tok-alice": "alice"}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("client")
    srv = ServerProcess(work, f"sqlite:///{work}/funnel.db", overrides={
        "auth": {"mode": "basic+bearer", "tokens": TOKENS,
                 "users": {user: generate_password_hash(pw) for user, pw in PASSWORDS.items()},
                 # the wrong passwords below would otherwise be throttled
                 "login_free_failures": 1000, "login_rate_per_second": 0},
        "events": {"watch": {"max_clients": 1, "heartbeat_seconds": 0.5,
                             "poll_seconds": 0.05}}})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(params=["http", "grpc"])
def transport(request) -> str:
    return request.param


def connect(server: ServerProcess, transport: str, user: str | None = None,
            **options: Any) -> TaskClient:
    """A client of `server` over `transport` ("http" or "grpc"), signed in as `user`
    with its password (None: no credentials), or with the options given (token=...)."""
    if user is not None:
        options = {"username": user, "password": PASSWORDS.get(user, "wrong"), **options}
    if transport == "http":
        return TesClient(server.url, timeout=10, **options)
    return TesGrpcClient(f"127.0.0.1:{server.grpc_port}", timeout=10, **options)


def test_create_get_list_cancel_wait_on_a_real_server(server, transport):
    api = connect(server, transport, "alice")
    mark = f"client-{transport}-"
    ids = [api.create({**TASK, "name": f"{mark}{n}"}) for n in range(3)]
    assert api.get(ids[0])["state"] == "QUEUED"
    assert api.get(ids[0], "BASIC")["name"] == f"{mark}0"
    first = api.list_page(page_size=2, name_prefix=mark)
    assert [task["id"] for task in first["tasks"]] == ids[:0:-1] and first["next_page_token"]
    listed = [task["id"] for task in api.list_all(page_size=2, name_prefix=mark)]
    assert listed == ids[::-1]  # newest first, over two pages
    assert [task["id"] for task in api.list_all(name_prefix=mark, state="QUEUED")] == \
        ids[::-1]
    api.cancel(ids[1])
    assert api.wait(ids[1], timeout=30)["state"] == "CANCELED"
    assert api.get(ids[1], "FULL")["executors"] == TASK["executors"]
    with pytest.raises(ClientError) as caught:
        connect(server, transport, "bob").get(ids[0])
    assert caught.value.status == 404 and ids[0] in (caught.value.server_message or "")
    assert not caught.value.transient
    with pytest.raises(ClientError) as caught:
        api.create({"executors": []})
    assert caught.value.status == 400 and "executors" in str(caught.value)
    with pytest.raises(ClientError) as caught:
        api.get(ids[0], "EVERYTHING")
    assert caught.value.status == 400 and "view" in (caught.value.server_message or "")
    assert api.service_info()["name"] == "funnel-hpc"


def test_both_transports_read_the_same_tasks(server):
    http, over_grpc = (connect(server, kind, "alice") for kind in ("http", "grpc"))
    task_id = over_grpc.create({**TASK, "name": "both", "tags": {"k": "v"}})
    for view in ("MINIMAL", "BASIC", "FULL"):
        assert over_grpc.get(task_id, view) == http.get(task_id, view)
    assert [task["id"] for task in http.list_all(name_prefix="both")] == [task_id]


def test_credentials_and_auth_errors(server, transport):
    task_id = connect(server, transport, "alice").create(TASK)
    assert connect(server, transport, token="tok-alice").get(task_id)["id"] == task_id
    for who in ({}, {"user": "alice", "password": "not it"}, {"token": "tok-nobody"}):
        with pytest.raises(ClientError) as caught:
            connect(server, transport, **who).get(task_id)
        assert caught.value.status == 401 and not caught.value.transient, who
        assert caught.value.server_message
    with pytest.raises(ClientError) as caught:
        next(connect(server, transport).watch())
    assert caught.value.status == 401


def test_watch_keeps_owners_apart_and_resumes_without_gap_or_repeat(server, transport):
    alice, bob = (connect(server, transport, user, retries=600, max_retry_wait=0.2)
                  for user in ("alice", "bob"))
    alice_task, bob_task = alice.create(TASK), bob.create(TASK)
    plan = [(alice_task, "alice", "state", {"n": n}) if n % 2 else
            (bob_task, "bob", "executor_log", {"n": n, "big": 2**60}) for n in range(12)]
    ids = record(server, plan)
    alice_ids = [i for i, (task, *_) in zip(ids, plan, strict=True) if task == alice_task]

    first = alice.watch(last_event_id=ids[0] - 1)
    seen = take(first, 3)
    first.close()  # the stream drops
    assert [event["id"] for event in seen] == alice_ids[:3]
    assert seen[0] == {"id": alice_ids[0], "task_id": alice_task, "owner": "alice",
                       "kind": "state", "time": seen[0]["time"], "payload": {"n": 1}}
    resumed = alice.watch(last_event_id=seen[-1]["id"])
    (last,) = record(server, [(alice_task, "alice", "task_end", {})])
    rest = take(resumed, len(alice_ids) - 3 + 1)
    resumed.close()
    assert [event["id"] for event in rest] == alice_ids[3:] + [last]
    assert {event["owner"] for event in seen + rest} == {"alice"}

    only_bob = bob.watch(bob_task, last_event_id=ids[0] - 1)
    bobs = take(only_bob, 1)
    only_bob.close()
    assert bobs[0]["id"] == ids[0] and bobs[0]["payload"]["big"] == 2**60  # exact
    with pytest.raises(ClientError) as caught:
        next(bob.watch(alice_task))
    assert caught.value.status == 404


def hold_the_stream_slot(server: ServerProcess, transport: str) -> Any:
    """An open watch stream of alice's, in the server's only slot (once a stream an
    earlier test closed has let go of it); ``close()`` frees it."""
    alice = "Basic YWxpY2U6cHc="  # alice:pw
    if transport == "http":
        def open_stream() -> Any:
            resp = requests.get(server.url + "/funnel/v1/events", stream=True, timeout=10,
                                headers={"Authorization": alice})
            if resp.status_code == 503:
                resp.close()
                return None
            assert resp.status_code == 200, resp.text
            return resp
        return wait_for(open_stream, 60, "the watch stream slot")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = funnel_events_pb2_grpc.EventServiceStub(channel)

    def open_grpc_stream() -> Any:
        stream = stub.WatchEvents(funnel_events_pb2.WatchEventsRequest(),
                                  metadata=(("authorization", alice),))
        try:
            assert not next(stream).events  # the stream is open: its start position
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return None
        return stream

    stream = wait_for(open_grpc_stream, 60, "the watch stream slot")

    class Holder:
        @staticmethod
        def close() -> None:
            stream.cancel()
            channel.close()
    return Holder


def test_a_full_watch_stream_is_a_503_the_client_retries(server, transport):
    holder = hold_the_stream_slot(server, transport)
    with pytest.raises(ClientError) as caught:
        next(connect(server, transport, "alice").watch())
    assert caught.value.status == 503 and caught.value.transient
    (event_id,) = record(server, [("t1", "alice", "state", {"state": "RUNNING"})])
    patient = connect(server, transport, "alice", retries=600, max_retry_wait=0.2)
    got: list[dict] = []
    stream = patient.watch(last_event_id=event_id - 1)
    reader = threading.Thread(target=lambda: got.append(next(stream)), daemon=True)
    reader.start()
    holder.close()  # the server notices (HTTP: at its next keep-alive) and frees the slot
    reader.join(120)  # within the client's retries (600 x at most 0.2 s)
    assert [event["id"] for event in got] == [event_id]
    stream.close()


def test_a_full_grpc_watch_says_when_to_try_again(server):
    holder = hold_the_stream_slot(server, "grpc")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    try:
        stream = funnel_events_pb2_grpc.EventServiceStub(channel).WatchEvents(
            funnel_events_pb2.WatchEventsRequest(),
            metadata=(("authorization", "Basic YWxpY2U6cHc="),))
        with pytest.raises(grpc.RpcError) as caught:
            next(stream)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "too many event streams" in caught.value.details()
        assert dict(caught.value.trailing_metadata())["retry-after"] == "5"  # as HTTP's
    finally:
        channel.close()
        holder.close()
