"""A forwarded task's event log, written by the tes backend from what the remote reports.

No worker of ours runs a forwarded task, so the backend writes the task's
``<work_dir>/<task id>/events.jsonl`` itself (the format of core/events.py), as the
gateway's own file: the reconciler then reads it like any worker's and folds it into the
task (state, executor logs, outputs, system logs). ``RemoteEventLog.update(remote)``
appends what a remote task document (FULL view, or BASIC when FULL could not be read)
says beyond what the log holds already, in an order the state machine accepts
(INITIALIZING, task_start, RUNNING, executors, outputs, system logs, task_end, the
terminal state), fsynced when it holds a state or an executor's end. The log's own fold
(re-read at first use) says what it holds, so a restarted gateway appends only what is
new.

The remote is not trusted: every field is type-checked and cut to the fold's limits
(``check_event`` must pass, or the event is left out and counted), executor indices
beyond the task's executors are dropped, and the file is opened relative to the task
dir's descriptor (itself opened ``O_NOFOLLOW`` from the work dir's), ``O_NOFOLLOW``, and
written only when it is a regular file of ours. Cost: one open, write and fsync per task
whose remote state changed; two opens and writes, no fsync, per submission.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from funnel_hpc.backends import files
from funnel_hpc.core.events import (
    MAX_METADATA,
    MAX_OUTPUTS,
    MAX_SYSTEM_LOGS,
    TERMINAL_STATES,
    EventFold,
    check_event,
    now_rfc3339,
    read_event_log,
)

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"  # the worker's event log in a task dir (core/events.py)
LOG_TAIL_CHARS = 10240        # of each executor stream kept (worker.log_tail_bytes' default)
SYSTEM_LOG_CHARS = 8192       # of one remote system log line
# remote states of a task that has started: its task_start and RUNNING are written
STARTED = ("RUNNING", "PAUSED", *sorted(TERMINAL_STATES))
# terminal remote states written as the task's end; PREEMPTED is not: the reconciler
# judges it from the job state (another attempt when reconciler.retry_on says so)
ENDS = frozenset({"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED"})
# events whose write is fsynced (with every line before them), as the worker's
# DURABLE_EVENTS: the backend's own metadata (the submission's nonce and remote id) is
# not, which saved two fsyncs per submitted task
DURABLE = frozenset({"state", "executor_end"})


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any, limit: int) -> str | None:
    """A remote string cut to its last `limit` characters; None when it is no string."""
    if not isinstance(value, str):
        return None
    return value[-limit:] if len(value) > limit else value


def last_attempt(remote: dict[str, Any]) -> dict[str, Any]:
    """The remote task's last tesTaskLog (its current attempt), or {}."""
    logs = as_list(remote.get("logs"))
    return _dict(logs[-1]) if logs else {}


class RemoteEventLog:
    """The event log of one forwarded task, appended to from remote task documents."""

    def __init__(self, work_dir: Path, task_id: str, executors: int | None = None):
        self.work_dir = work_dir
        self.task_id = task_id
        self.executors = executors
        # what the log holds (a restarted gateway's included): the fold says, the events
        # written from here on are applied to it too
        self.fold: EventFold = read_event_log(work_dir / task_id / EVENTS_FILE, executors)
        self.dropped = 0  # remote values that made no valid event

    # ---- what is new ----

    def events_for(self, remote: dict[str, Any], metadata: dict[str, str],
                   ends: bool = True) -> list[dict[str, Any]]:
        """The events (without seq) that bring the log up to the remote task document;
        ends: write executors' ends (False for a BASIC view: it lacks their stdout)."""
        state = remote.get("state")
        attempt = last_attempt(remote)
        held = self.fold.task_log
        out: list[dict[str, Any]] = []
        new_meta = {k: v for k, v in metadata.items() if held["metadata"].get(k) != v}
        if new_meta and len(held["metadata"]) + len(new_meta) <= MAX_METADATA:
            out.append({"type": "metadata", "metadata": new_meta})
        if self.fold.terminal or state not in ("INITIALIZING", *STARTED):
            return out
        if self.fold.state is None:
            out.append({"type": "state", "state": "INITIALIZING"})
        if state in STARTED:
            if "start_time" not in held:
                start = _text(attempt.get("start_time"), 64) or now_rfc3339()
                out.append({"type": "task_start", "start_time": start})
            if self.fold.state in (None, "INITIALIZING"):
                out.append({"type": "state", "state": "RUNNING"})
            out += self._executor_events(attempt, ends)
        if state in ENDS:
            out += self._output_events(attempt)
            out += self._system_log_events(attempt)
            end = _text(attempt.get("end_time"), 64) or now_rfc3339()
            out.append({"type": "task_end", "end_time": end})
            out.append({"type": "state", "state": state})
        elif state == "PREEMPTED":
            out += self._system_log_events(attempt)
        return out

    def _executor_events(self, attempt: dict[str, Any], ends: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        held = self.fold.task_log["logs"]
        limit = self.executors if self.executors is not None else 0
        for index, entry in enumerate(as_list(attempt.get("logs"))[:limit]):
            entry = _dict(entry)
            mine = _dict(held[index]) if index < len(held) else {}
            start = _text(entry.get("start_time"), 64)
            if start and "start_time" not in mine:
                out.append({"type": "executor_start", "index": index, "start_time": start})
            end = _text(entry.get("end_time"), 64)
            if end and ends and "end_time" not in mine:
                event: dict[str, Any] = {"type": "executor_end", "index": index,
                                         "end_time": end}
                code = entry.get("exit_code")
                if isinstance(code, int) and not isinstance(code, bool) and code >= 0:
                    event["exit_code"] = code  # funnel-hpc shows -1 for "none"
                for stream in ("stdout", "stderr"):
                    text = _text(entry.get(stream), LOG_TAIL_CHARS)
                    if text is not None:
                        event[stream] = text
                out.append(event)
        return out

    def _output_events(self, attempt: dict[str, Any]) -> list[dict[str, Any]]:
        held = len(self.fold.task_log["outputs"])
        out: list[dict[str, Any]] = []
        for item in as_list(attempt.get("outputs"))[held:MAX_OUTPUTS]:
            item = _dict(item)
            size = item.get("size_bytes", "0")
            out.append({"type": "output", "url": item.get("url"), "path": item.get("path"),
                        "size_bytes": str(size) if isinstance(size, int) else size})
        return out

    def _system_log_events(self, attempt: dict[str, Any]) -> list[dict[str, Any]]:
        held = len(self.fold.task_log["system_logs"])
        out: list[dict[str, Any]] = []
        for line in as_list(attempt.get("system_logs"))[held:MAX_SYSTEM_LOGS]:
            text = _text(line, SYSTEM_LOG_CHARS)
            out.append({"type": "system_log", "message": f"remote: {text}"
                        if text is not None else "remote: (not a string)"})
        return out

    # ---- writing ----

    def note(self, metadata: dict[str, str]) -> int:
        """Append a metadata event (the backend's own records: the remote's id and URL)."""
        return self.update({}, metadata)

    def update(self, remote: dict[str, Any], metadata: dict[str, str],
               ends: bool = True) -> int:
        """Append what is new in the remote document (events_for); the number of events
        written. Raises OSError when the task dir or its log cannot be written safely."""
        events: list[dict[str, Any]] = []
        for event in self.events_for(remote, metadata, ends):
            event = {"seq": self.fold.last_seq + len(events) + 1, "time": now_rfc3339(),
                     "task_id": self.task_id, **event}
            problem = check_event(event, self.executors)
            if problem is not None:  # a remote value no event may carry: left out
                self.dropped += 1
                log.warning("task %s: a remote %s left out: %s", self.task_id,
                            event["type"], problem)
                continue
            events.append(event)
        if not events:
            return 0
        self._append(events)
        for event in events:
            self.fold.apply(event)
        return len(events)

    def _append(self, events: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(event, separators=(",", ":")) + "\n" for event in events)
        work_fd = files.open_work_dir(self.work_dir)
        try:
            dir_fd = files.open_subdir(work_fd, self.task_id)
        finally:
            os.close(work_fd)
        try:
            fd = files.open_append(dir_fd, EVENTS_FILE, os.geteuid())
        finally:
            os.close(dir_fd)
        try:
            view = memoryview(data.encode())
            while view:
                view = view[os.write(fd, view):]
            if any(event["type"] in DURABLE for event in events):
                os.fsync(fd)
        finally:
            os.close(fd)
