"""The worker's event log, and the reader that rebuilds a task from it.

A worker appends one JSON object per line to ``<workdir>/<task_id>/events.jsonl``,
flushed and fsynced per event. Every event has

    {"seq": 1, "time": "2026-01-01T00:00:00.000000Z", "task_id": "...", "type": "..."}

plus fields by type:

| type             | fields                                                        |
| ---------------- | ------------------------------------------------------------- |
| `state`          | `state`: a TES state (INITIALIZING, RUNNING, COMPLETE, EXECUTOR_ERROR, SYSTEM_ERROR, CANCELED) |
| `task_start`     | `start_time`                                                  |
| `task_end`       | `end_time`                                                    |
| `metadata`       | `metadata`: {str: str}, merged                                |
| `system_log`     | `message`                                                     |
| `executor_start` | `index`, `start_time`                                         |
| `executor_end`   | `index`, `end_time`, `exit_code` (128+N if killed by signal N), `stdout`, `stderr` (the last `worker.log_tail_bytes` bytes) |
| `output`         | `url`, `path`, `size_bytes` (string, as TES)                  |

``seq`` grows by one per event; ``time`` is RFC 3339 UTC. The first events of a
run are ``state`` INITIALIZING, ``task_start`` and ``metadata`` (hostname, pid,
container_driver); the last are ``task_end`` and the terminal ``state``.

With ``--server`` the worker also POSTs each event, unchanged, to
``{server}/funnel/v1/tasks/{id}/events`` (best effort, in the background); the
gateway folds both copies, de-duplicated by ``seq``.

Reading: ``read_event_log(path)`` folds a file into an ``EventFold`` (``state``,
``task_log`` as a TES tesTaskLog, ``last_seq``, ``terminal``); a torn last line
is ignored and a missing file gives an empty fold.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger(__name__)

TERMINAL_STATES = frozenset({"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED",
                             "PREEMPTED"})


def now_rfc3339() -> str:
    """UTC now as 2026-01-02T03:04:05.123456Z (without datetime: one import less per worker)."""
    seconds, fraction = divmod(time.time_ns() // 1000, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:06d}Z"


class EventFold:
    """A task's state and TES task log, built up one event at a time."""

    def __init__(self) -> None:
        self.state: str | None = None
        self.last_seq = 0
        self.task_log: dict[str, Any] = {"logs": [], "outputs": [], "system_logs": [],
                                         "metadata": {}}

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def _executor(self, index: int) -> dict:
        logs = self.task_log["logs"]
        while len(logs) <= index:
            logs.append({})
        return logs[index]

    def apply(self, event: dict) -> None:
        seq = event.get("seq")
        if isinstance(seq, int):
            if seq <= self.last_seq:
                return  # already applied (second copy of the same event)
            self.last_seq = seq
        kind = event.get("type")
        tl = self.task_log
        if kind == "state" and not self.terminal:
            self.state = str(event["state"])
        elif kind == "task_start":
            tl["start_time"] = event["start_time"]
        elif kind == "task_end":
            tl["end_time"] = event["end_time"]
        elif kind == "metadata":
            tl["metadata"].update({str(k): str(v) for k, v in event["metadata"].items()})
        elif kind == "system_log":
            tl["system_logs"].append(str(event["message"]))
        elif kind == "executor_start":
            self._executor(int(event["index"]))["start_time"] = event["start_time"]
        elif kind == "executor_end":
            entry = self._executor(int(event["index"]))
            for key in ("end_time", "exit_code", "stdout", "stderr"):
                if key in event:
                    entry[key] = event[key]
        elif kind == "output":
            tl["outputs"].append({"url": event["url"], "path": event["path"],
                                  "size_bytes": str(event["size_bytes"])})


def iter_events(path: Path):
    """Events of a log file; a torn (unterminated) last line is ignored."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            yield event


def read_event_log(path: str | Path) -> EventFold:
    """Rebuild a task's state and logs from its event file alone."""
    fold = EventFold()
    for event in iter_events(Path(path)):
        fold.apply(event)
    return fold


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
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, kind: str, **fields: Any) -> dict:
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
        if token:  # auth on: this task's worker token (gateway/worker_tokens.py)
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.queue: queue.Queue = queue.Queue()
        self._abandon = threading.Event()
        self._failing_since: float | None = None
        self.thread = threading.Thread(target=self._run, name="event-sender", daemon=True)
        self.thread.start()

    def send(self, event: dict) -> None:
        self.queue.put(event)

    def _run(self) -> None:
        while True:
            event = self.queue.get()
            if event is None:
                return
            self._deliver(event)

    def _deliver(self, event: dict) -> None:
        from gateway.client import is_transient  # loaded with requests: only with a server

        pause = 0.5
        while True:
            try:
                status = self.session.post(self.url, json=event, timeout=self.timeout).status_code
                reason = f"HTTP {status}"
            except Exception as exc:  # network trouble must not stop the task
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
