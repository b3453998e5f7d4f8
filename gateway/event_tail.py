"""Incremental reading of a task attempt's worker event logs, for the reconciler.

Each ``read_new`` stats the attempt's two event files (the worker's own, and the copy the
gateway received over HTTP) and reads only the bytes appended since the last call, whole
lines only; every line is untrusted (``core.events.parse_line`` and ``EventFold`` skip and
count what is not a well-formed event of the task, and de-duplicate by ``seq``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from funnel_hpc.core.events import EventFold, parse_line

EVENT_FILES = ("events.jsonl", "events.received.jsonl")


@dataclass
class EventTail:
    """Incremental reader of one task attempt's event logs."""

    directory: Path
    executors: int | None = None  # the task's executor count: events beyond it are bad
    fold: EventFold = field(init=False)
    offsets: dict[str, int] = field(default_factory=dict)
    paths: tuple[str, ...] = ()
    # events applied since the reconciler last stored the fold: it hands them to the
    # event outbox with the change they make (gateway/outbox.py), then clears this
    fresh: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fold = EventFold(executors=self.executors)
        # plain strings: at 10,000 tasks in flight each tick stats 20,000 files
        self.paths = tuple(os.path.join(self.directory, name) for name in EVENT_FILES)

    def read_new(self) -> bool:
        """Apply events appended since the last call; True if any was new."""
        before = self.fold.last_seq
        for path in self.paths:
            offset = self.offsets.get(path, 0)
            try:
                if os.stat(path).st_size <= offset:
                    continue
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1  # only whole lines; a torn tail waits
            # untrusted lines: parse_line and the fold skip (and count) what is not a
            # well-formed event of this task; repeats (by seq) are ignored by the fold
            for line in data[:end].splitlines():
                event = parse_line(line)
                if event is None:
                    self.fold.skipped += 1
                    continue
                seq = self.fold.last_seq
                self.fold.apply(event)
                if self.fold.last_seq > seq:  # new (a repeat by seq is ignored)
                    self.fresh.append(event)
            self.offsets[path] = offset + end
        return self.fold.last_seq > before
