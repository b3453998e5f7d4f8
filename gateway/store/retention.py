"""Task records and directories an admin removes or measures (`funnel admin purge|du`).

``purge`` deletes tasks that ENDED (a terminal state) before a cut-off, oldest first in
batches of ``BATCH``: one SELECT and one DELETE per batch (the DELETE repeats the state
and time conditions, so a row that is not ended is never removed), then each deleted
task's directories ``<work_dir>/<task id>`` and ``<work_dir>/.gateway/<task id>``. Removal
never follows a symlink (shutil.rmtree refuses a linked top directory and unlinks links
inside). A task's end time is its ``updated_at``: a terminal task is never written again.

``disk_usage`` walks the work dir once (lstat, no links followed) and sums bytes per
task state; directories without a task row are "orphaned", everything else "other".
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.engine import Engine

from funnel_hpc.core.events import rfc3339
from funnel_hpc.core.states import TERMINAL
from funnel_hpc.gateway.store import db
from funnel_hpc.gateway.store.task_dirs import gateway_dir

BATCH = 500
TASK_DIR_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
GENERATED_ID = re.compile(r"[0-9a-f]{20}")  # gateway/store/tasks.py new_task_id
AGE = re.compile(r"(\d+)([smhdw])")
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
ORPHANED = "orphaned"  # a task-like directory with no task row
OTHER = "other"        # the database, image cache, worker config, ...
TERMINAL_VALUES = sorted(state.value for state in TERMINAL)


def parse_age(text: str) -> float:
    """'30d', '12h', '90m', '45s', '2w' -> seconds."""
    match = AGE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not an age like 30d, 12h, 90m, 45s or 2w")
    return int(match.group(1)) * AGE_UNITS[match.group(2)]


@dataclass
class PurgeResult:
    """What a purge removed (or, dry, would remove)."""

    cutoff: str
    tasks: list[str] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)
    bytes_freed: int = 0
    errors: list[str] = field(default_factory=list)


def _ended_before(cutoff: str):
    t = db.tasks
    return (t.c.state.in_(TERMINAL_VALUES)) & (t.c.updated_at < cutoff)


def _candidates(engine: Engine, cutoff: str) -> Iterator[list[tuple[int, str, str]]]:
    """Batches of (seq, id, state) of tasks ended before cutoff, oldest first."""
    t = db.tasks
    last = 0
    while True:
        query = (select(t.c.seq, t.c.id, t.c.state).where(_ended_before(cutoff), t.c.seq > last)
                 .order_by(t.c.seq).limit(BATCH))
        with db.reading(engine) as conn:
            rows = [(int(seq), str(task_id), str(state))
                    for seq, task_id, state in conn.execute(query)]
        if not rows:
            return
        yield rows
        last = rows[-1][0]


def purge(engine: Engine, work_dir: str | Path, older_than: float, dry_run: bool = False,
          now: float | None = None) -> PurgeResult:
    """Delete tasks that ended more than older_than seconds ago, and their directories."""
    cutoff = rfc3339((time.time() if now is None else now) - older_than)
    result = PurgeResult(cutoff)
    t = db.tasks
    for batch in _candidates(engine, cutoff):
        if not dry_run:
            seqs = [seq for seq, _, _ in batch]
            with db.writing(engine) as conn:
                conn.execute(delete(db.task_tags).where(db.task_tags.c.task_seq.in_(seqs)))
                conn.execute(delete(t).where(t.c.seq.in_(seqs), _ended_before(cutoff)))
        for _, task_id, state in batch:
            result.tasks.append(task_id)
            result.states[state] = result.states.get(state, 0) + 1
            if not dry_run:  # what only the gateway wrote for it (gateway/reconcile/event_tail.py)
                shutil.rmtree(gateway_dir(work_dir, task_id), ignore_errors=True)
            directory = task_directory(work_dir, task_id)
            if directory is None:
                continue
            result.bytes_freed += tree_bytes(directory)
            if not dry_run:
                _remove(directory, result)
    return result


def task_directory(work_dir: str | Path, task_id: str) -> Path | None:
    """<work_dir>/<task id> when the id is a plain name and the directory is there."""
    if not TASK_DIR_NAME.fullmatch(task_id):
        return None
    path = Path(work_dir) / task_id
    return path if path.is_dir() and not path.is_symlink() else None


def _remove(directory: Path, result: PurgeResult) -> None:
    try:
        shutil.rmtree(directory)
    except OSError as exc:  # the record is gone; say which directory stayed
        result.errors.append(f"{directory}: {exc.strerror or exc}")


def tree_bytes(path: Path) -> int:
    """Bytes of the files under path (lstat: links count as themselves, never followed)."""
    total = 0
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue  # removed while we walked
    return total


def task_states(engine: Engine) -> dict[str, str]:
    """Task id -> state of every task (one query; ids and states only)."""
    t = db.tasks
    with db.reading(engine) as conn:
        return {str(row.id): str(row.state) for row in conn.execute(select(t.c.id, t.c.state))}


def _task_dir_shaped(name: str, path: Path) -> bool:
    """A directory the gateway made for a task: named like the ids it generates (a dir
    whose task.json was never written or was lost still is one), or holding a task.json
    (e.g. an id from an older version); image-cache and the like are not."""
    return bool(GENERATED_ID.fullmatch(name)) or (
        bool(TASK_DIR_NAME.fullmatch(name)) and (path / "task.json").exists())


def disk_usage(engine: Engine, work_dir: str | Path) -> dict[str, dict[str, int]]:
    """State (or orphaned / other) -> {"tasks": task rows, "dirs": directories,
    "bytes": bytes} of what the work dir holds."""
    states = task_states(engine)
    usage: dict[str, dict[str, int]] = {}

    def add(key: str, tasks: int = 0, dirs: int = 0, size: int = 0) -> None:
        entry = usage.setdefault(key, {"tasks": 0, "dirs": 0, "bytes": 0})
        entry["tasks"] += tasks
        entry["dirs"] += dirs
        entry["bytes"] += size

    for state in states.values():
        add(state, tasks=1)
    root = Path(work_dir)
    entries = list(os.scandir(root)) if root.is_dir() else []
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            key = states.get(entry.name, ORPHANED if _task_dir_shaped(entry.name, path)
                             else OTHER)
            add(key, dirs=1, size=tree_bytes(path))
        else:
            add(OTHER, size=entry.stat(follow_symlinks=False).st_size)
    return usage
