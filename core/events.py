"""The task event-log format, and the fold that rebuilds a task from it.

A worker appends one JSON object per line to ``<workdir>/<task_id>/events.jsonl``,
flushed and fsynced per event. Every event has

    {"seq": 1, "time": "2026-01-01T00:00:00.000000Z", "task_id": "...", "type": "..."}

plus fields by type:

| type             | fields                                                        |
| ---------------- | ------------------------------------------------------------- |
| `state`          | `state`: a TES state (below)                                  |
| `task_start`     | `start_time`                                                  |
| `task_end`       | `end_time`                                                    |
| `metadata`       | `metadata`: {str: str}, merged                                |
| `system_log`     | `message`                                                     |
| `executor_start` | `index`, `start_time`                                         |
| `executor_log`   | `index`, `limit`, `stdout`, `stderr`, `reset` (live logs)     |
| `executor_end`   | `index`, `end_time`, `exit_code`, `stdout`, `stderr` (below)  |
| `output`         | `url`, `path`, `size_bytes` (string, as TES)                  |

A ``state`` event's state is INITIALIZING, RUNNING, COMPLETE, EXECUTOR_ERROR,
SYSTEM_ERROR or CANCELED. An ``executor_end``'s ``exit_code`` is 128+N if the
executor was killed by signal N; its ``stdout`` and ``stderr`` are the last
``worker.log_tail_bytes`` bytes.

While an executor runs, an ``executor_log`` every ``worker.log_update_seconds`` carries
only what each stream gained since the last one (``stdout``/``stderr``, either may be
absent): the fold appends it and keeps the last ``limit`` characters (the worker's
``log_tail_bytes``, at most MAX_TEXT). ``reset: true`` says more than ``limit`` was
written since the last update, so the text replaces the tail. The ``executor_end`` that
follows carries the authoritative tails and replaces them.

``seq`` grows by one per event; ``time`` is RFC 3339 UTC. The first events of a
run are ``state`` INITIALIZING, ``task_start`` and ``metadata`` (hostname, pid,
container_driver); the last are ``task_end`` and the terminal ``state``.

With ``--server`` the worker also POSTs each event, unchanged, to
``{server}/funnel/v1/tasks/{id}/events`` (best effort, in the background); the
gateway folds both copies, de-duplicated by ``seq``.

Reading: ``read_event_log(path)`` folds a file into an ``EventFold`` (``state``,
``task_log`` as a TES tesTaskLog, ``last_seq``, ``terminal``); a torn last line
is ignored and a missing file gives an empty fold.

Events are untrusted (whoever holds a task's directory or worker token writes them):
``check_event`` says what is wrong with one ("field: reason", the gateway's intake
answers 400 with it), and the fold skips such events and lines (counted in
``skipped``) instead of raising; sizes are bounded (``MAX_*`` below), so no event
makes the fold allocate more than its limits.
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
# What a worker may report; QUEUED, CANCELING and UNKNOWN are the gateway's to set.
WORKER_STATES = TERMINAL_STATES | {"INITIALIZING", "RUNNING", "PAUSED"}
EVENT_TYPES = ("state", "task_start", "task_end", "metadata", "system_log",
               "executor_start", "executor_log", "executor_end", "output")

MAX_EVENT_BYTES = 4 << 20       # one event line (two log tails, JSON-escaped)
MAX_TEXT = 1 << 20              # message, stdout, stderr (characters)
MAX_SEQ = 2**31 - 1             # tasks.event_seq is a 32-bit INTEGER column
MAX_EXECUTORS = 1000            # a task's executors (gateway/store/tes_schemas.py)
MAX_METADATA = 256              # entries of one metadata event
MAX_SYSTEM_LOGS = 10_000        # kept per fold; later ones are counted in `skipped`
MAX_OUTPUTS = 100_000
_SHORT = 256                    # times, task ids, metadata keys


def now_rfc3339() -> str:
    """UTC now as 2026-01-02T03:04:05.123456Z (without datetime: one import less per worker)."""
    return _rfc3339_micros(time.time_ns() // 1000)


def rfc3339(epoch: float) -> str:
    """`epoch` seconds in now_rfc3339's format, so that the strings compare as times (the
    cut-offs of the reconciler's changed rows and of purges)."""
    return _rfc3339_micros(int(epoch * 1_000_000))


def _rfc3339_micros(micros: int) -> str:
    seconds, fraction = divmod(micros, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:06d}Z"


def _text(limit: int):
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return "must be a string"
        return f"longer than {limit} characters" if len(value) > limit else None
    return check


def _integer(low: int, high: int):
    def check(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return "must be an integer"
        return None if low <= value <= high else f"must be between {low} and {high}"
    return check


def _state(value: Any) -> str | None:
    if value in WORKER_STATES:
        return None
    return f"must be one of {', '.join(sorted(WORKER_STATES))}"


def _metadata(value: Any) -> str | None:
    if not isinstance(value, dict) or len(value) > MAX_METADATA:
        return f"must be an object of at most {MAX_METADATA} entries"
    for key, item in value.items():
        if len(key) > _SHORT or not isinstance(item, (str, int, float, bool)) \
                or len(str(item)) > MAX_TEXT:
            return f"entry {key[:_SHORT]!r}: keys up to {_SHORT} characters, scalar values"
    return None


def _size(value: Any) -> str | None:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    return None if isinstance(text, str) and text.isdigit() and len(text) <= 20 \
        else "must be a non-negative integer (or its decimal string)"


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


_INDEX = _integer(0, MAX_EXECUTORS - 1)
# type -> field -> (check, required)
_FIELDS: dict[str, dict[str, tuple[Any, bool]]] = {
    "state": {"state": (_state, True)},
    "task_start": {"start_time": (_text(_SHORT), True)},
    "task_end": {"end_time": (_text(_SHORT), True)},
    "metadata": {"metadata": (_metadata, True)},
    "system_log": {"message": (_text(MAX_TEXT), True)},
    "executor_start": {"index": (_INDEX, True), "start_time": (_text(_SHORT), True)},
    "executor_log": {"index": (_INDEX, True), "limit": (_integer(0, MAX_TEXT), True),
                     "stdout": (_text(MAX_TEXT), False), "stderr": (_text(MAX_TEXT), False),
                     "reset": (_flag, False)},
    "executor_end": {"index": (_INDEX, True), "end_time": (_text(_SHORT), False),
                     "exit_code": (_integer(-(2**31), 2**31 - 1), False),
                     "stdout": (_text(MAX_TEXT), False), "stderr": (_text(MAX_TEXT), False)},
    "output": {"url": (_text(8192), True), "path": (_text(4096), True),
               "size_bytes": (_size, True)},
}
_COMMON = {"seq": (_integer(1, MAX_SEQ), True), "time": (_text(_SHORT), False),
           "task_id": (_text(_SHORT), False)}


def check_event(event: Any, executors: int | None = None) -> str | None:
    """None if event is a well-formed event (of a task with `executors` executors, when
    given), else "field: reason". Fields not listed above are allowed and ignored."""
    if not isinstance(event, dict):
        return "event: must be a JSON object"
    kind = event.get("type")
    if kind not in _FIELDS:
        return f"type: must be one of {', '.join(EVENT_TYPES)}"
    for name, (check, required) in {**_COMMON, **_FIELDS[kind]}.items():
        if name not in event:
            if required:
                return f"{name}: required for a {kind} event"
            continue
        problem = check(event[name])
        if problem:
            return f"{name}: {problem}"
    if executors is not None and "index" in _FIELDS[kind] and event["index"] >= executors:
        return f"index: the task has {executors} executor(s)"
    return None


class EventFold:
    """A task's state and TES task log, built up one event at a time; events that fail
    check_event are skipped (counted in `skipped`), never raised on."""

    def __init__(self, executors: int | None = None) -> None:
        self.state: str | None = None
        self.last_seq = 0
        self.skipped = 0
        self.executors = executors
        self.task_log: dict[str, Any] = {"logs": [], "outputs": [], "system_logs": [],
                                         "metadata": {}}

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def _executor(self, index: int) -> dict:
        logs = self.task_log["logs"]
        while len(logs) <= index:  # index < MAX_EXECUTORS: checked before
            logs.append({})
        return logs[index]

    def apply(self, event: Any) -> bool:
        """Fold one event in; False if it was a repeat (seq not above last_seq) or bad."""
        if check_event(event, self.executors) is not None:
            self.skipped += 1
            return False
        if event["seq"] <= self.last_seq:
            return False  # already applied (second copy of the same event)
        self.last_seq = event["seq"]
        self._fold(event["type"], event)
        return True

    def _fold(self, kind: str, event: dict) -> None:
        task_log = self.task_log
        if kind == "state" and not self.terminal:
            self.state = event["state"]
        elif kind in ("task_start", "task_end"):
            key = "start_time" if kind == "task_start" else "end_time"
            task_log[key] = event[key]
        elif kind == "metadata":
            merged = task_log["metadata"]
            for key, value in event["metadata"].items():
                if key in merged or len(merged) < MAX_METADATA:  # bound the merged total
                    merged[key] = str(value)
        elif kind == "system_log":
            self._bounded_append("system_logs", event["message"], MAX_SYSTEM_LOGS)
        elif kind == "executor_start":
            self._executor(event["index"])["start_time"] = event["start_time"]
        elif kind == "executor_log":
            self._append_logs(self._executor(event["index"]), event)
        elif kind == "executor_end":
            entry = self._executor(event["index"])
            for key in ("end_time", "exit_code", "stdout", "stderr"):
                if key in event:
                    entry[key] = event[key]
        elif kind == "output":
            self._bounded_append("outputs", {"url": event["url"], "path": event["path"],
                                             "size_bytes": str(event["size_bytes"])},
                                 MAX_OUTPUTS)

    @staticmethod
    def _append_logs(entry: dict, event: dict) -> None:
        """Live log text onto an executor's tails, each kept to the event's limit."""
        limit = event["limit"]
        for key in ("stdout", "stderr"):
            text = event.get(key)
            if text is None:
                continue
            joined = text if event.get("reset") else entry.get(key, "") + text
            entry[key] = joined[len(joined) - limit:] if len(joined) > limit else joined

    def _bounded_append(self, key: str, item: Any, limit: int) -> None:
        if len(self.task_log[key]) < limit:
            self.task_log[key].append(item)
        else:
            self.skipped += 1


def parse_line(line: bytes) -> dict | None:
    """One event-log line as an event object, or None if it is not one (not JSON, too
    long or deep, not an object). Never raises."""
    if len(line) > MAX_EVENT_BYTES:
        return None
    try:
        event = json.loads(line)
    except (ValueError, RecursionError):  # json raises RecursionError on deep nesting
        return None
    return event if isinstance(event, dict) else None


def iter_events(path: Path):
    """Event objects of a log file; a torn (unterminated) last line and lines that are not
    event objects (parse_line) are skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        event = parse_line(line)
        if event is not None:
            yield event


def read_event_log(path: str | Path, executors: int | None = None) -> EventFold:
    """Rebuild a task's state and logs from its event file alone (bad events skipped)."""
    fold = EventFold(executors)
    for event in iter_events(Path(path)):
        fold.apply(event)
    return fold
