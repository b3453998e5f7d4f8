"""Gateway limits a hostile user met: FULL pages bounded across requests (a process-wide
budget, gateway/store/page_budget.py), strings no worker could pass refused at POST, and
watch streams capped per user below the global cap (HTTP and gRPC)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests

from funnel_hpc.core import config as config_mod
from funnel_hpc.gateway.store.tasks import ListQuery, Unavailable
from funnel_hpc.gateway.web.app import make_service
from funnel_hpc.proto import funnel_events_pb2, funnel_events_pb2_grpc
from tests.server_helpers import ServerProcess

TOKENS = {"tok-alice": "alice", "tok-bob": "bob", "tok-root": "root"}
AUTH = {"mode": "bearer", "tokens": TOKENS, "admins": ["root"]}
MB = 1 << 20


def task(content_bytes: int = 0, **executor: object) -> dict:
    body: dict = {"executors": [{"image": "busybox", "command": ["true"], **executor}]}
    if content_bytes:
        body["inputs"] = [{"path": "/in/data", "content": "x" * content_bytes}]
    return body


def bearer(user: str) -> dict[str, str]:
    token = next(token for token, name in TOKENS.items() if name == user)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("limits")
    srv = ServerProcess(work, f"sqlite:///{work}/funnel.db", overrides={
        "auth": AUTH,
        "limits": {"max_list_bytes_in_flight": 3 * MB},
        "events": {"watch": {"poll_seconds": 0.05, "heartbeat_seconds": 1,
                             "max_clients": 8, "max_clients_per_user": 2}}})
    srv.start()
    yield srv
    srv.stop()


# ---- strings no worker could pass ----

def bobs_tasks(server: ServerProcess) -> int:
    listed = requests.get(server.api + "/tasks", params={"page_size": 2000},
                          headers=bearer("bob"), timeout=10).json()
    return len(listed.get("tasks", []))


@pytest.mark.parametrize(("executor", "field"), [
    ({"command": ["echo", "a\x00b"]}, "executors.0.command.1"),
    ({"env": {"X": "1\x002"}}, "executors.0.env.X"),
    ({"workdir": "/tmp/\x00"}, "executors.0.workdir"),
    ({"image": "busybox\n"}, "executors.0.image"),
    ({"image": "busybox; rm -rf /"}, "executors.0.image"),
    ({"image": "-busybox"}, "executors.0.image"),
    ({"env": {"1BAD": "x"}}, "executors.0.env"),  # the schema's rule
])
def test_what_a_worker_would_refuse_is_a_400_naming_the_field(server, executor, field):
    before = bobs_tasks(server)
    resp = requests.post(server.api + "/tasks", json=task(**executor), headers=bearer("bob"),
                         timeout=10)
    assert resp.status_code == 400, resp.text
    assert resp.json()["message"].startswith(field + ":"), resp.json()
    assert bobs_tasks(server) == before  # refused whole: no task was made


def test_newlines_in_arguments_and_env_values_are_taken(server):
    """Multi-line `sh -c` scripts and env values are common (workflow engines send them);
    the worker passes them through execve unchanged."""
    resp = requests.post(server.api + "/tasks", headers=bearer("bob"), timeout=10,
                         json=task(command=["sh", "-c", "echo a\necho b"], env={"X": "1\n2"}))
    assert resp.status_code == 200, resp.text


def test_a_nul_in_input_content_is_file_data_and_is_taken(server):
    body = task()
    body["inputs"] = [{"path": "/in/bin", "content": "a\x00b"}]
    resp = requests.post(server.api + "/tasks", json=body, headers=bearer("bob"), timeout=10)
    assert resp.status_code == 200, resp.text


# ---- FULL pages across requests ----

def test_full_pages_end_early_at_the_process_budget_and_lose_nothing(server):
    ids = set()
    for _ in range(6):
        resp = requests.post(server.api + "/tasks", json=task(MB - 4096),
                             headers=bearer("alice"), timeout=30)
        assert resp.status_code == 200, resp.text
        ids.add(resp.json()["id"])
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        params = {"view": "FULL", "page_size": "40"}
        if token:
            params["page_token"] = token
        page = requests.get(server.api + "/tasks", params=params, headers=bearer("alice"),
                            timeout=60).json()
        pages += 1
        assert len(page["tasks"]) <= 3, "a page held more than the 3 MiB budget"
        seen += [t["id"] for t in page["tasks"]]
        token = page.get("next_page_token")
        if not token:
            break
    assert set(seen) == ids and len(seen) == len(ids)
    assert pages >= 2


def test_a_page_that_finds_the_budget_spent_ends_early_or_is_refused(tmp_path: Path):
    """In one process: a page in flight holds the budget; the next page ends after the
    tasks that fit, or, holding none, is refused (the API's 503 with Retry-After)."""
    config = config_mod.load(environ={}, overrides={
        "work_dir": str(tmp_path / "work"),
        "limits": {"max_list_bytes_in_flight": 3 * MB}})
    service = make_service(config)
    for _ in range(4):
        service.create(task(MB - 4096))
    full = ListQuery(view="FULL", page_size=40)
    with service.page_budget.hold() as first:
        tasks, token = service.list(full, first)
        assert len(tasks) == 3 and token  # 3 documents of just under 1 MiB fit
        with service.page_budget.hold() as second, pytest.raises(Unavailable) as refused:
            service.list(full, second)
        assert refused.value.status == 503
        assert "limits.max_list_bytes_in_flight" in refused.value.message
        assert service.list(ListQuery(view="MINIMAL", page_size=40), second)[0]  # no bytes
    assert service.page_budget.used == 0
    with service.page_budget.hold() as again:
        assert len(service.list(full, again)[0]) == 3  # given back when the page was sent


# ---- watch streams per user ----

def open_sse(server: ServerProcess, user: str) -> requests.Response:
    return requests.get(server.url + "/funnel/v1/events", headers=bearer(user), stream=True,
                        timeout=10)


def test_one_user_cannot_take_every_http_stream(server):
    bobs = [open_sse(server, "bob") for _ in range(2)]
    try:
        assert [r.status_code for r in bobs] == [200, 200]
        third = open_sse(server, "bob")
        assert third.status_code == 503
        assert third.headers["Retry-After"]
        assert "max_clients_per_user" in third.json()["message"]
        alice = open_sse(server, "alice")
        assert alice.status_code == 200
        alice.close()
    finally:
        for resp in bobs:
            resp.close()


def test_one_user_cannot_take_every_grpc_stream(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = funnel_events_pb2_grpc.EventServiceStub(channel)
    metadata = {user: (("authorization", headers["Authorization"]),)
                for user, headers in ((u, bearer(u)) for u in ("alice", "bob"))}
    streams = []
    try:
        for _ in range(2):
            stream = stub.WatchEvents(funnel_events_pb2.WatchEventsRequest(),
                                      metadata=metadata["bob"], timeout=30)
            next(stream)  # the stream's first message: its slot is taken
            streams.append(stream)
        third = stub.WatchEvents(funnel_events_pb2.WatchEventsRequest(),
                                 metadata=metadata["bob"], timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            next(third)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "max_clients_per_user" in refused.value.details()
        alice = stub.WatchEvents(funnel_events_pb2.WatchEventsRequest(),
                                 metadata=metadata["alice"], timeout=30)
        next(alice)
        alice.cancel()
    finally:
        for stream in streams:
            stream.cancel()
        channel.close()
