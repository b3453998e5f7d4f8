"""funnel.v1.EventService/WatchEvents (gateway/grpc/server.py) on a real server with
bearer auth: a user's stream never shows another user's events, an admin's shows all,
task_ids narrow, the stream names its position (at the start and when quiet) and
resumes from it, it carries the same events as the SSE stream, and the client resumes
across a server restart without gap or repeat. Events are put in the server's outbox
with outbox.record, as the service and the reconciler do."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from funnel_hpc.core import worker_tokens
from funnel_hpc.core.client import TesClient
from funnel_hpc.proto import funnel_events_pb2, funnel_events_pb2_grpc
from funnel_hpc.proto.client import TesGrpcClient
from tests.events_helpers import outbox_engine, record_events, take
from tests.server_helpers import ServerProcess

TOKENS = {"tok-alice": "alice", "tok-bob": "bob", "tok-root": "root"}
TASK = {"executors": [{"image": "busybox", "command": ["true"]}]}
AUTH = {"mode": "bearer", "tokens": TOKENS, "admins": ["root"]}
WATCH = {"poll_seconds": 0.05, "heartbeat_seconds": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    work = tmp_path_factory.mktemp("grpc-watch")
    srv = ServerProcess(work, f"sqlite:///{work}/funnel.db",
                        overrides={"auth": AUTH, "events": {"watch": WATCH}})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server) -> Iterator[funnel_events_pb2_grpc.EventServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield funnel_events_pb2_grpc.EventServiceStub(channel)
    channel.close()


def client(server: ServerProcess, user: str, **options) -> TesGrpcClient:
    token = next(token for token, name in TOKENS.items() if name == user)
    return TesGrpcClient(f"127.0.0.1:{server.grpc_port}", token=token, timeout=10, **options)


def as_user(user: str) -> tuple[tuple[str, str], ...]:
    token = next(token for token, name in TOKENS.items() if name == user)
    return (("authorization", f"Bearer {token}"),)


def record(server: ServerProcess, plan) -> list[int]:
    return record_events(outbox_engine(server.work_dir / "funnel.db"), plan)


def read_events(stream, count: int) -> list[funnel_events_pb2.Event]:
    """The next `count` events of a raw WatchEvents stream, whatever messages carry
    them (at most 120 messages: heartbeats come every second)."""
    events: list[funnel_events_pb2.Event] = []
    for _ in range(120):
        events += next(stream).events
        if len(events) >= count:
            return events
    raise AssertionError(f"{len(events)} of {count} events: {events}")


def test_a_users_stream_never_shows_another_users_events(server):
    alice, bob = client(server, "alice"), client(server, "bob")
    alice_task, bob_task = alice.create(TASK), bob.create(TASK)
    # bob's events between, before and after alice's, on his task and on a task id of hers
    plan = [(bob_task, "bob", "state", {"n": 0})]
    for n in range(1, 30):
        plan.append((alice_task, "alice", "state", {"n": n}) if n % 3 == 0 else
                    (bob_task if n % 2 else alice_task, "bob", "system_log", {"n": n}))
    plan.append((alice_task, "alice", "task_end", {"last": True}))
    ids = record(server, plan)
    alice_ids = [i for i, (_, owner, *_) in zip(ids, plan, strict=True) if owner == "alice"]
    bob_ids = [i for i, (_, owner, *_) in zip(ids, plan, strict=True) if owner == "bob"]

    stream = alice.watch(last_event_id=ids[0] - 1)
    seen = take(stream, len(alice_ids))  # up to her last event, after every one of bob's
    stream.close()
    assert [event["id"] for event in seen] == alice_ids
    assert {event["owner"] for event in seen} == {"alice"}
    stream = bob.watch(last_event_id=ids[0] - 1)
    assert [event["id"] for event in take(stream, len(bob_ids))] == bob_ids
    stream.close()
    alice.close()
    bob.close()


def test_an_admin_sees_everyone_and_task_ids_narrow(server, stub):
    alice_task = client(server, "alice").create(TASK)
    bob_task = client(server, "bob").create(TASK)
    ids = record(server, [(alice_task, "alice", "state", {}), ("other", "carol", "state", {}),
                          (bob_task, "bob", "state", {})])
    everyone = client(server, "root").watch(last_event_id=ids[0] - 1)
    assert [event["id"] for event in take(everyone, 3)] == ids
    everyone.close()
    both = stub.WatchEvents(funnel_events_pb2.WatchEventsRequest(
        task_ids=[alice_task, bob_task], after_id=ids[0] - 1), metadata=as_user("root"))
    start = next(both)
    assert not start.events and start.position == ids[0] - 1  # it names where it starts
    events = read_events(both, 2)
    both.cancel()
    assert [event.id for event in events] == [ids[0], ids[2]]
    assert events[0].owner == "alice" and events[1].task_id == bob_task


@pytest.mark.parametrize("case", ["no credentials", "a worker token", "another's task",
                                  "unknown task", "negative after_id", "too many tasks"])
def test_refusals_say_why(server, stub, case):
    alice_task = client(server, "alice").create(TASK)
    worker = worker_tokens.token_for(worker_tokens.load_key(server.work_dir), alice_task)
    cases: dict[str, tuple[dict, tuple, grpc.StatusCode, str]] = {
        "no credentials": ({}, (), grpc.StatusCode.UNAUTHENTICATED, "authentication"),
        "a worker token": ({}, (("authorization", f"Bearer {worker}"),),
                           grpc.StatusCode.UNAUTHENTICATED, "worker token"),
        "another's task": ({"task_ids": [alice_task]}, as_user("bob"),
                           grpc.StatusCode.NOT_FOUND, alice_task),
        "unknown task": ({"task_ids": ["nosuchtask"]}, as_user("root"),
                         grpc.StatusCode.NOT_FOUND, "nosuchtask"),
        "negative after_id": ({"after_id": -1}, as_user("alice"),
                              grpc.StatusCode.INVALID_ARGUMENT, "after_id"),
        "too many tasks": ({"task_ids": [alice_task] * 1001}, as_user("alice"),
                           grpc.StatusCode.INVALID_ARGUMENT, "task_ids"),
    }
    request, metadata, code, needle = cases[case]
    stream = stub.WatchEvents(funnel_events_pb2.WatchEventsRequest(**request),
                              metadata=metadata)
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert caught.value.code() == code and needle in caught.value.details()


def test_a_quiet_stream_names_its_position_and_resumes_from_it(server, stub):
    alice_task = client(server, "alice").create(TASK)
    (before,) = record(server, [(alice_task, "alice", "state", {"n": 1})])
    stream = stub.WatchEvents(funnel_events_pb2.WatchEventsRequest(task_ids=[alice_task]),
                              metadata=as_user("alice"))
    start = next(stream)
    assert not start.events and start.position >= before  # from now
    others = record(server, [("other", "bob", "state", {}) for _ in range(3)])
    # nothing of hers for heartbeat_seconds: the position again, soon past bob's events
    # (a heartbeat may have been sent before they were recorded)
    for _ in range(120):
        quiet = next(stream)
        assert not quiet.events
        if quiet.position >= others[-1]:
            break
    assert quiet.position >= others[-1]
    stream.cancel()
    (after,) = record(server, [(alice_task, "alice", "state", {"n": 2})])
    resumed = stub.WatchEvents(funnel_events_pb2.WatchEventsRequest(
        task_ids=[alice_task], after_id=quiet.position), metadata=as_user("alice"))
    assert next(resumed).position == quiet.position
    assert [event.id for event in read_events(resumed, 1)] == [after]  # nothing before it
    resumed.cancel()


def test_large_events_are_split_over_messages_each_naming_its_position(server, stub):
    alice_task = client(server, "alice").create(TASK)
    text = "x" * 400_000  # three of them pass the 1 MiB a message carries
    ids = record(server, [(alice_task, "alice", "system_log", {"message": text})
                          for _ in range(4)])
    stream = stub.WatchEvents(funnel_events_pb2.WatchEventsRequest(
        task_ids=[alice_task], after_id=ids[0] - 1), metadata=as_user("alice"))
    next(stream)  # the start
    messages = [next(stream), next(stream)]
    stream.cancel()
    assert [[event.id for event in message.events] for message in messages] == \
        [ids[:3], ids[3:]]
    assert messages[0].position == ids[2] and messages[1].position >= ids[3]


def test_the_same_events_as_the_sse_stream(server):
    alice_task = client(server, "alice").create(TASK)
    ids = record(server, [(alice_task, "alice", "executor_end",
                           {"seq": 3, "index": 0, "exit_code": 0, "stdout": "hi\n",
                            "size": 12345678901234567890}),
                          (alice_task, "alice", "state", {"state": "COMPLETE",
                                                          "previous": "RUNNING"})])
    over_sse = TesClient(server.url, token="tok-alice", timeout=10).watch(
        last_event_id=ids[0] - 1)
    over_grpc = client(server, "alice").watch(last_event_id=ids[0] - 1)
    sse_events, grpc_events = take(over_sse, 2), take(over_grpc, 2)
    over_sse.close()
    over_grpc.close()
    assert grpc_events == sse_events
    assert grpc_events[0]["payload"]["size"] == 12345678901234567890


def test_the_client_resumes_across_a_server_restart(tmp_path):
    srv = ServerProcess(tmp_path / "srv", f"sqlite:///{tmp_path}/srv/funnel.db",
                        overrides={"auth": AUTH, "events": {"watch": WATCH}}).start()
    try:
        alice = client(srv, "alice", retries=600, max_retry_wait=0.2)
        task_id = alice.create(TASK)
        first = record(srv, [(task_id, "alice", "state", {"n": n}) for n in range(3)])
        stream = alice.watch(last_event_id=first[0] - 1)
        assert [event["id"] for event in take(stream, 3)] == first
        srv.kill()
        # recorded while the server is down: the resumed stream must bring them
        down = record(srv, [(task_id, "alice", "state", {"n": n}) for n in range(3, 5)])
        srv.start()
        up = record(srv, [(task_id, "alice", "task_end", {})])
        assert [event["id"] for event in take(stream, 3)] == down + up
        stream.close()
        alice.close()
    finally:
        srv.stop()
