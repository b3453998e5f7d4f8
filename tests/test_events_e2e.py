"""Task events out, end to end: a real server with the reconciler and the local backend
runs tasks; a webhook receiver and a watcher get each task's events once, in order.

The outbox is written by TaskService.create / transition / update_fields (the reconciler
hands them the worker's events it folds) and published by the thread gateway/cli/server.py
starts."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from funnel_hpc.core.client import TesClient
from tests.events_helpers import WebhookReceiver
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for, wait_for_state

SECRET = "e2e-secret"
TASKS = 20
STATES = ["QUEUED", "INITIALIZING", "RUNNING", "COMPLETE"]


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver(SECRET).start()
    yield hook
    hook.stop()


def test_tasks_events_reach_the_webhook_and_the_watcher_once_in_order(tmp_path, receiver):
    srv = ServerProcess(tmp_path / "srv", f"sqlite:///{tmp_path}/funnel.db", reconcile=True,
                        overrides={
                            "reconciler": {"interval_seconds": 0.3},
                            "worker": {"container_driver": "bwrap"},
                            "events": {"poll_seconds": 0.1, "retry_min_seconds": 0.1,
                                       "webhooks": [{"url": receiver.url, "secret": SECRET}]}})
    srv.start()
    try:
        api = TesClient(srv.url)
        watcher = api.watch(last_event_id=0)
        ids = [api.create({"executors": [{"image": "busybox", "command": ["true"]}]})
               for _ in range(TASKS)]
        for task_id in ids:
            wait_for_state(srv.api, task_id, "COMPLETE", timeout=120,
                           detail=lambda: srv.log()[-2000:])

        def ended(events: list[dict]) -> bool:
            done = {e["task_id"] for e in events if e["kind"] == "state"
                    and e["payload"]["state"] == "COMPLETE"}
            return done >= set(ids)

        wait_for(lambda: ended(receiver.received()), 60, "every task's COMPLETE at the hook")
        watched: list[dict] = []

        def follow() -> None:
            for event in watcher:
                watched.append(event)
                if ended(watched):
                    return

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        reader.join(60)  # a watcher that misses an event fails the test, not hangs it
        assert ended(watched), watched[-5:]
    finally:
        srv.stop()
    hooked = receiver.received()
    assert receiver.bad_signatures == 0
    assert len({e["id"] for e in hooked}) == len(hooked)  # once each (no sink failure here)
    for stream in (hooked, watched):
        for task_id in ids:
            mine = [e for e in stream if e["task_id"] == task_id]
            assert [e["id"] for e in mine] == sorted(e["id"] for e in mine)
            states = [e["payload"]["state"] for e in mine if e["kind"] == "state"]
            assert states == STATES, (task_id, states)
            kinds = {e["kind"] for e in mine}
            assert {"task_start", "executor_start", "executor_end", "task_end"} <= kinds
