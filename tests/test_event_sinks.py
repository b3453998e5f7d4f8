"""Event sinks (gateway/sinks/targets.py) fed by the publisher (gateway/sinks/publisher.py) from the
outbox: order per task, at least once, nothing lost while a sink is down, filters, and
the real Redis broker (scripts/setup/60-broker.sh); on SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import insert

from funnel_hpc.gateway.ops import metrics
from funnel_hpc.gateway.sinks.publisher import Publisher
from funnel_hpc.gateway.sinks.targets import RedisStreamSink, WebhookSink
from funnel_hpc.gateway.store import db, outbox
from tests.components import POSTGRES, POSTGRES_REASON, need
from tests.events_helpers import (
    WebhookReceiver,
    events_settings,
    outbox_engine,
    record_events,
)
from tests.server_helpers import free_port
from tests.waiting import wait_for

SECRET = "s3cret"
KINDS = ("state", "task_start", "executor_start", "executor_end", "task_end")


def plan_for(tasks: int, owner: str = "alice") -> list[tuple[str, str | None, str, dict]]:
    """Events of `tasks` tasks, interleaved across tasks as a busy gateway records them."""
    return [(f"task{n:04d}", owner, kind, {"step": step})
            for step, kind in enumerate(KINDS) for n in range(tasks)]


def assert_in_order_per_task(events: list[dict]) -> None:
    last: dict[str, int] = {}
    for event in events:
        assert event["id"] > last.get(event["task_id"], 0), f"out of order: {event}"
        last[event["task_id"]] = event["id"]


@pytest.fixture
def engine(db_kind, databases):
    """A migrated outbox database, SQLite and PostgreSQL."""
    return outbox_engine(databases.new(db_kind))


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver(SECRET).start()
    yield hook
    if hook.server is not None:
        hook.stop()


def start(engine, *sinks) -> Publisher:
    return Publisher(engine, events_settings(), sinks=list(sinks)).start()


def test_webhook_gets_every_event_once_signed_in_order_per_task(engine, receiver):
    publisher = start(engine, WebhookSink("webhook:a", receiver.url, secret=SECRET))
    try:
        ids = record_events(engine, plan_for(200))
        wait_for(lambda: len(receiver.received()) >= len(ids), 120, "1,000 webhook POSTs")
    finally:
        publisher.stop()
    got = receiver.received()
    assert [event["id"] for event in got] == ids  # each once, in outbox order
    assert receiver.bad_signatures == 0
    assert_in_order_per_task(got)
    assert got[0]["kind"] == "state" and got[0]["payload"] == {"step": 0}


def test_nothing_is_lost_while_the_receiver_is_down(engine, receiver):
    publisher = start(engine, WebhookSink("webhook:a", receiver.url, secret=SECRET))
    (worker,) = publisher.workers
    try:
        first = record_events(engine, plan_for(5))
        wait_for(lambda: len(receiver.received()) >= len(first), 60, "the first events")
        receiver.stop()  # connections refused from now on
        later = record_events(engine, plan_for(20))
        wait_for(lambda: worker.failures >= 3, 60, "three failed attempts")
        assert worker.cursor == first[-1]  # the events wait in the outbox
        receiver.start()  # same port
        wait_for(lambda: len({e["id"] for e in receiver.received()}) >= len(first + later), 60,
                 "the events recorded while the receiver was down")
    finally:
        publisher.stop()
    got = receiver.received()
    assert sorted({event["id"] for event in got}) == first + later  # none lost
    assert_in_order_per_task(got)


def test_a_kept_alive_connection_the_receiver_dropped_is_replaced_at_once(tmp_path, receiver):
    engine = outbox_engine(tmp_path / "outbox.db")
    publisher = start(engine, WebhookSink("webhook:kept", receiver.url, secret=SECRET))
    try:
        first = record_events(engine, plan_for(2))
        wait_for(lambda: len(receiver.received()) >= len(first), 60, "the first events")
        receiver.stop()   # drops the sink's kept-alive connection, as a restart does
        receiver.start()  # same port, before the next event
        later = record_events(engine, plan_for(2))
        wait_for(lambda: len(receiver.received()) >= len(first + later), 60, "later events")
    finally:
        publisher.stop()
    # a new connection at once, not a failed attempt and a pause
    assert metrics.REGISTRY.get_sample_value(
        "funnel_event_sink_failures_total", {"sink": "webhook:kept"}) == 0
    assert [event["id"] for event in receiver.received()] == first + later


def test_an_erroring_receiver_is_retried_without_holding_up_recording(engine, receiver):
    publisher = start(engine, WebhookSink("webhook:a", receiver.url, secret=SECRET))
    (worker,) = publisher.workers
    try:
        receiver.fail_with = 500
        first = record_events(engine, plan_for(3))
        wait_for(lambda: receiver.refused >= 3, 60, "three refused POSTs")
        later = record_events(engine, plan_for(3))  # recording goes on meanwhile
        assert worker.cursor < first[0]
        receiver.fail_with = None
        wait_for(lambda: len(receiver.received()) >= len(first + later), 60, "the retried events")
    finally:
        publisher.stop()
    assert [event["id"] for event in receiver.received()] == first + later


@pytest.mark.postgres
def test_an_event_committed_late_is_not_skipped(databases, postgres_available, receiver):
    """PostgreSQL hands out ids at INSERT: a later id can commit first. The publisher waits
    at the gap (gap_grace_seconds) instead of moving its cursor past the earlier id."""
    need(POSTGRES, postgres_available, POSTGRES_REASON)
    engine = outbox_engine(databases.new("postgres"))
    publisher = Publisher(engine, events_settings(gap_grace_seconds=3600),
                          sinks=[WebhookSink("webhook:a", receiver.url, secret=SECRET)]).start()
    (worker,) = publisher.workers
    try:
        with engine.connect() as slow, slow.begin():
            early = outbox.record(slow, "t1", None, "state", {"n": 1})
            (late,) = record_events(engine, [("t2", None, "state", {"n": 2})])
            looks = worker.looks
            wait_for(lambda: worker.looks >= looks + 3, 60, "three looks at the outbox")
            assert receiver.received() == [] and worker.cursor < early
        wait_for(lambda: len(receiver.received()) >= 2, 60, "both events")
    finally:
        publisher.stop()
    assert [event["id"] for event in receiver.received()] == [early, late]


def _add_task(engine, task_id: str, owner: str, tags: dict[str, str]) -> None:
    now = "2026-01-01T00:00:00.000000Z"
    with db.writing(engine) as conn:
        key = conn.execute(insert(db.tasks), {
            "id": task_id, "state": "QUEUED", "owner": owner, "creation_time": now,
            "spec": {}, "logs": [], "attempt": 0, "event_seq": 0,
            "updated_at": now}).inserted_primary_key
        assert key is not None
        seq = key[0]
        if tags:
            conn.execute(insert(db.task_tags),
                         [{"task_seq": seq, "key": k, "value": v} for k, v in tags.items()])


def test_webhook_filters_by_owner_and_tag(engine, receiver):
    _add_task(engine, "mine", "alice", {"project": "x"})
    _add_task(engine, "untagged", "alice", {})
    _add_task(engine, "theirs", "bob", {"project": "x"})
    publisher = start(engine, WebhookSink("webhook:a", receiver.url, secret=SECRET,
                                          owners=["alice"], tags={"project": "x"}))
    (worker,) = publisher.workers
    try:
        ids = record_events(engine, [("untagged", "alice", "state", {}),
                                     ("mine", "alice", "state", {}),
                                     ("theirs", "bob", "state", {})])
        wait_for(lambda: worker.cursor == ids[-1], 60, "the sink to take all three")
    finally:
        publisher.stop()
    assert [event["task_id"] for event in receiver.received()] == ["mine"]


# ---- the real broker: Redis Streams (scripts/setup/60-broker.sh) ----

REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_or_skip():
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        need("Redis", False, "not reachable on 127.0.0.1:6379 (scripts/setup/60-broker.sh)")
    return client


def _stream_ids(client, prefix: str) -> dict[str, list[int]]:
    import json

    found = {}
    for kind in KINDS:
        entries = client.xrange(prefix + kind)
        found[kind] = [json.loads(fields[b"event"])["id"] for _, fields in entries]
    return found


@pytest.mark.broker
def test_redis_gets_every_event_once_in_a_stream_per_kind(engine):
    client = _redis_or_skip()
    prefix = f"funnel-test-{uuid.uuid4().hex}:"
    sink = RedisStreamSink("redis", REDIS_URL, prefix, maxlen=0)
    publisher = start(engine, sink)
    try:
        ids = record_events(engine, plan_for(200))
        wait_for(lambda: publisher.workers[0].cursor == ids[-1], 120, "the Redis sink")
        by_kind = _stream_ids(client, prefix)
        for step, kind in enumerate(KINDS):
            assert by_kind[kind] == ids[step * 200:(step + 1) * 200]
        # a batch sent again (after a failure part-way) adds nothing twice
        with db.reading(engine) as conn:
            sink.publish(outbox.read(conn, 0, ids[-1], limit=1000))
        assert _stream_ids(client, prefix) == by_kind
    finally:
        publisher.stop()
        client.delete(*(prefix + kind for kind in KINDS))


@pytest.mark.broker
def test_redis_down_then_back_loses_nothing(tmp_path):
    _redis_or_skip()  # the client library and the Debian server are installed
    import redis

    server = shutil.which("redis-server")
    assert server, "redis-server (scripts/setup/60-broker.sh)"
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    def run_broker() -> subprocess.Popen:
        proc = subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port),
                                 "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                                stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        wait_for(lambda: _pings(client), 30, "redis-server to answer")
        return proc

    engine = outbox_engine(tmp_path / "o.db")
    broker = run_broker()
    publisher = start(engine, RedisStreamSink("redis", url, "ev:", maxlen=0))
    (worker,) = publisher.workers
    try:
        first = record_events(engine, plan_for(5))
        wait_for(lambda: worker.cursor == first[-1], 60, "the first events")
        broker.terminate()
        broker.wait(30)
        later = record_events(engine, plan_for(10))
        wait_for(lambda: worker.failures >= 3, 60, "three failed attempts")
        broker = run_broker()  # a new, empty broker: the events still wait in the outbox
        wait_for(lambda: worker.cursor == later[-1], 60, "the events recorded while down")
        by_kind = _stream_ids(redis.Redis.from_url(url), "ev:")
        assert sorted(i for ids in by_kind.values() for i in ids) == later
    finally:
        publisher.stop()
        broker.terminate()
        broker.wait(30)


def _pings(client) -> bool:
    import redis

    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_sink_threads_run_at_a_lower_cpu_priority():
    import os
    import threading

    from funnel_hpc.gateway.sinks.publisher import lower_priority

    seen: list[int] = []

    def run() -> None:
        lower_priority(5)
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [min(19, mine + 5)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # only it
