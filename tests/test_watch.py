"""GET /funnel/v1/events (gateway/web/watch.py) on a real server: a user follows its own
tasks only, resumes with Last-Event-ID without gap or repeat. Events are put in the
server's outbox with outbox.record, as the service and the reconciler do."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from funnel_hpc.core.client import ClientError, TesClient
from tests.events_helpers import record, take
from tests.server_helpers import ServerProcess

TOKENS = {"tok-alice": "alice", "tok-bob": "bob", "tok-root": "root"}
TASK = {"executors": [{"image": "busybox", "command": ["true"]}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("watch")
    srv = ServerProcess(work, f"sqlite:///{work}/funnel.db", overrides={
        "auth": {"mode": "bearer", "tokens": TOKENS, "admins": ["root"]},
        "events": {"watch": {"poll_seconds": 0.05, "heartbeat_seconds": 1}}})
    srv.start()
    yield srv
    srv.stop()


def client(server: ServerProcess, user: str) -> TesClient:
    token = next(token for token, name in TOKENS.items() if name == user)
    return TesClient(server.url, token=token, timeout=10)


def test_a_user_sees_only_its_own_tasks_and_resumes_without_gap_or_repeat(server):
    alice_task = client(server, "alice").create(TASK)
    bob_task = client(server, "bob").create(TASK)
    mixed = [(alice_task, "alice", "state", {"n": n}) if n % 2 else
             (bob_task, "bob", "state", {"n": n}) for n in range(20)]
    ids = record(server, mixed)
    alice_ids = [i for i, (task, *_) in zip(ids, mixed, strict=True) if task == alice_task]
    bob_ids = [i for i, (task, *_) in zip(ids, mixed, strict=True) if task == bob_task]

    first = client(server, "alice").watch(last_event_id=ids[0] - 1)
    seen = take(first, 4)
    first.close()  # the connection drops
    assert [event["id"] for event in seen] == alice_ids[:4]
    assert {event["owner"] for event in seen} == {"alice"}

    resumed = client(server, "alice").watch(last_event_id=seen[-1]["id"])
    more = record(server, [(alice_task, "alice", "task_end", {}),
                           (bob_task, "bob", "task_end", {})])
    rest = take(resumed, len(alice_ids) - 4 + 1)
    resumed.close()
    assert [event["id"] for event in rest] == alice_ids[4:] + more[:1]

    bobs = client(server, "bob").watch(last_event_id=ids[0] - 1)
    assert [event["id"] for event in take(bobs, len(bob_ids) + 1)] == bob_ids + more[1:]
    bobs.close()


def test_an_admin_sees_everyone_and_task_id_narrows(server):
    alice_task = client(server, "alice").create(TASK)
    ids = record(server, [(alice_task, "alice", "state", {}), ("other", "bob", "state", {})])
    everyone = client(server, "root").watch(last_event_id=ids[0] - 1)
    assert [event["id"] for event in take(everyone, 2)] == ids
    everyone.close()
    one = client(server, "root").watch(task_id=alice_task, last_event_id=ids[0] - 1)
    assert [event["id"] for event in take(one, 1)] == ids[:1]
    one.close()


def test_the_stream_is_sse_and_bad_requests_say_why(server):
    alice_task = client(server, "alice").create(TASK)
    (event_id,) = record(server, [(alice_task, "alice", "executor_start", {"index": 0})])
    headers = {"Authorization": "Bearer tok-alice", "Last-Event-ID": str(event_id - 1)}
    with requests.get(server.url + "/funnel/v1/events", headers=headers, stream=True,
                      timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = ""
        for chunk in resp.iter_content(chunk_size=None):
            text += chunk.decode()
            if "data:" in text and text.endswith("\n\n"):
                break
    assert f"id: {event_id}\nevent: executor_start\ndata: {{" in text
    bad = requests.get(server.url + "/funnel/v1/events",
                       headers={**headers, "Last-Event-ID": "x"}, timeout=10)
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["message"]
    with pytest.raises(ClientError) as caught:
        next(client(server, "bob").watch(task_id=alice_task))
    assert caught.value.status == 404
    assert requests.get(server.url + "/funnel/v1/events", timeout=10).status_code == 401
