"""The Python client (core/client.py): retries on 429/503 after Retry-After, pages,
the server's message in errors, credentials; then the same calls on a real server."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import requests
from werkzeug.security import generate_password_hash

from funnel_hpc.core.client import ClientError, TesClient, retry_after
from funnel_hpc.core.sse import messages
from tests.events_helpers import ScriptedServer, outbox_engine, record_events
from tests.server_helpers import ServerProcess

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


# ---- a real server, HTTP Basic ----

@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("client")
    srv = ServerProcess(work, f"sqlite:///{work}/funnel.db", overrides={
        "auth": {"mode": "basic", "users": {"alice": generate_password_hash("pw"),
                                            "bob": generate_password_hash("pw2")}},
        "events": {"watch": {"max_clients": 1, "heartbeat_seconds": 0.5}}})
    srv.start()
    yield srv
    srv.stop()


def test_create_get_list_cancel_wait_on_a_real_server(server):
    api = TesClient(server.url, username="alice", password="pw")
    ids = [api.create({**TASK, "name": f"client-{n}"}) for n in range(3)]
    assert api.get(ids[0])["state"] == "QUEUED"
    assert api.get(ids[0], "BASIC")["name"] == "client-0"
    listed = [task["id"] for task in api.list_all(page_size=2, name_prefix="client-")]
    assert listed == ids[::-1]  # newest first, over two pages
    api.cancel(ids[1])
    assert api.wait(ids[1], timeout=30)["state"] == "CANCELED"
    with pytest.raises(ClientError) as caught:
        TesClient(server.url, username="bob", password="pw2").get(ids[0])
    assert caught.value.status == 404 and ids[0] in (caught.value.server_message or "")
    with pytest.raises(ClientError) as caught:
        api.create({"executors": []})
    assert caught.value.status == 400 and "executors" in str(caught.value)
    assert api.service_info()["name"]


def test_a_full_watch_stream_is_a_503_the_client_retries(server):
    auth_header = {"Authorization": "Basic YWxpY2U6cHc="}  # alice:pw
    holder = requests.get(server.url + "/funnel/v1/events", headers=auth_header, stream=True,
                          timeout=10)
    assert holder.status_code == 200  # holds the only stream slot
    with pytest.raises(ClientError) as caught:
        next(TesClient(server.url, username="alice", password="pw").watch())
    assert caught.value.status == 503 and caught.value.transient
    (event_id,) = record_events(outbox_engine(server.work_dir / "funnel.db"),
                                [("t1", "alice", "state", {"state": "RUNNING"})])
    patient = TesClient(server.url, username="alice", password="pw", retries=600,
                        max_retry_wait=0.2)
    got: list[dict] = []
    stream = patient.watch(last_event_id=event_id - 1)
    reader = threading.Thread(target=lambda: got.append(next(stream)), daemon=True)
    reader.start()
    holder.close()  # the server notices at its next keep-alive and frees the slot
    reader.join(120)  # within the client's retries (600 x at most 0.2 s)
    assert [event["id"] for event in got] == [event_id]
