"""The task event-log format, and the fold that rebuilds a task from it.

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
import time
from pathlib import Path

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from typing import Any

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
