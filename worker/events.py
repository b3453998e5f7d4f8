"""The worker's side of the event log: appending events and sending them to the gateway.

The format, and the reader that folds a log back into a task, are in
``funnel_hpc.core.events``, shared with the gateway's reconciler.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

from funnel_hpc.core.events import EventFold, now_rfc3339, read_event_log

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from typing import Any

__all__ = ["EventFold", "EventLog", "now_rfc3339", "read_event_log"]

log = logging.getLogger(__name__)


# Events fsynced as they are written: state changes and executor ends (exit code, log
# tails). The others (metadata, system logs, start times) are written at once, so a
# reader on this host sees them, and become durable with the next fsync; a task's last
# event is always a state. Ten fsyncs for a trivial task were most of its run time.
DURABLE_EVENTS = frozenset({"state", "executor_end"})


class EventLog:
    """Appends events to events.jsonl (see DURABLE_EVENTS) and optionally sends them."""

    def __init__(self, path: Path, task_id: str, server: str | None = None,
                 post_timeout: float = 3.0, token: str | None = None,
                 retry_seconds: float = 0.0):
        self.path = path
        self.task_id = task_id
        self.fold = read_event_log(path)  # a restarted worker continues the sequence
        self.seq = self.fold.last_seq
        self._lock = threading.Lock()
        self._sender: _Sender | None = None
        if server:
            url = f"{server.rstrip('/')}/funnel/v1/tasks/{task_id}/events"
            self._sender = _Sender(url, post_timeout, token, retry_seconds)
        path.parent.mkdir(parents=True, exist_ok=True)
        # 600: events carry executors' output tails (the gateway reads as root or owner)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                           0o600)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            self.seq += 1
            event = {"seq": self.seq, "time": now_rfc3339(), "task_id": self.task_id,
                     "type": kind, **fields}
            os.write(self._fd, (json.dumps(event, separators=(",", ":")) + "\n").encode())
            if kind in DURABLE_EVENTS:
                os.fsync(self._fd)  # also makes every earlier line durable
            self.fold.apply(event)
        if self._sender:
            self._sender.send(event)
        return event

    def state(self, state: str) -> None:
        self.emit("state", state=state)

    def system_log(self, message: str) -> None:
        self.emit("system_log", message=message)

    def close(self, flush_seconds: float = 5.0) -> None:
        if self._sender:
            self._sender.close(flush_seconds)
        os.close(self._fd)


class _Sender:
    """Delivery in the background; never fails the task. An event the server does not
    take (unreachable, 5xx, 429: a gateway restarting) is sent again with growing pauses
    while the server has been failing for less than retry_seconds. The gateway drops
    events it already has (by seq), so sending one twice is harmless."""

    def __init__(self, url: str, timeout: float, token: str | None = None,
                 retry_seconds: float = 0.0):
        import requests

        self.url = url
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.session = requests.Session()
        if token:  # auth on: this task's worker token (core/worker_tokens.py)
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._abandon = threading.Event()
        self._failing_since: float | None = None
        self.thread = threading.Thread(target=self._run, name="event-sender", daemon=True)
        self.thread.start()

    def send(self, event: dict[str, Any]) -> None:
        self.queue.put(event)

    def _run(self) -> None:
        while True:
            event = self.queue.get()
            if event is None:
                return
            self._deliver(event)

    def _deliver(self, event: dict[str, Any]) -> None:
        from funnel_hpc.core.client import is_transient  # loaded with requests: only with a server

        pause = 0.5
        while True:
            try:
                status = self.session.post(self.url, json=event, timeout=self.timeout).status_code
                reason = f"HTTP {status}"
            except Exception as exc:  # noqa: BLE001  # network trouble must not stop the task
                status, reason = None, exc.__class__.__name__
            if not is_transient(status):
                self._failing_since = None
                return
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
            if self._abandon.is_set() or now - self._failing_since >= self.retry_seconds:
                log.debug("event %s not delivered: %s", event.get("seq"), reason)
                return
            self._abandon.wait(pause)
            pause = min(pause * 2, 10.0)

    def close(self, flush_seconds: float) -> None:
        self.queue.put(None)
        self.thread.join(flush_seconds)
        self._abandon.set()
