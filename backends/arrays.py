"""Task lists of scheduler job arrays: what element i of an array runs, and how a
restarted gateway finds a task's element again.

An array job's script carries nothing of its tasks: before submission the gateway writes
a task list, one task id a line, in ``<work_dir>/arrays/<name>`` (its own directory,
never a task dir), and element *i* (0-based; a scheduler counting from 1 subtracts one)
reads line *i*, checks it is a task id, and runs the worker for ``<work_dir>/<id>``. The
array job is named ``funnel-array-<name>``, so ``recover`` finds a task whose submission
the gateway died in: ``find`` says which list holds it and where, the scheduler says
which job carries that name.

Lists are private (0600) unless the elements run as the tasks' owners (submit_as_owner):
then they are world-readable under a random name in a directory that cannot be listed
(0711), and one array holds one owner's tasks only. Nothing a user writes is read here.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from funnel_hpc.backends import files

DIR_NAME = "arrays"
NAME = re.compile(r"[0-9a-f]{16}")
TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the gateway's task ids (gateway/store/tasks.py)
JOB_NAME_PREFIX = "funnel-array-"
DIR_MODE = 0o711


@dataclass(frozen=True)
class TaskList:
    name: str            # [0-9a-f]{16}
    path: Path           # <work_dir>/arrays/<name>
    task_ids: tuple[str, ...]

    @property
    def job_name(self) -> str:
        """The array job's name: how recover finds it."""
        return JOB_NAME_PREFIX + self.name


def directory(work_dir: Path) -> Path:
    """<work_dir>/arrays, ours, 0711 (made when missing; a link or another's refused)."""
    path = Path(work_dir) / DIR_NAME
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise OSError(f"{path} is not a directory of the gateway's")
    if stat.S_IMODE(info.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def write(work_dir: Path, task_ids: list[str], shared: bool = False) -> TaskList:
    """A new task list of these ids (in element order). shared: readable by the owners'
    jobs (0644), else 0600. Raises ValueError for an id that is not a task id."""
    for task_id in task_ids:
        if not TASK_ID.fullmatch(task_id):
            raise ValueError(f"not a task id: {task_id[:80]!r}")
    name = secrets.token_hex(8)
    path = files.write_private(directory(work_dir), name, "".join(f"{t}\n" for t in task_ids),
                               mode=0o644 if shared else files.FILE_MODE)
    return TaskList(name, path, tuple(task_ids))


def read(work_dir: Path, name: str) -> TaskList | None:
    """The list of that name, or None (no such list, or not a file of the gateway's)."""
    if not NAME.fullmatch(name):
        return None
    path = Path(work_dir) / DIR_NAME / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd) as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return None
        ids = tuple(line.strip() for line in handle)
    return TaskList(name, path, tuple(i for i in ids if TASK_ID.fullmatch(i)))


def find(work_dir: Path, task_id: str) -> tuple[TaskList, int] | None:
    """The newest list holding task_id, and its 0-based index there (for recover: rare,
    so a scan of the lists is fine), or None."""
    where = Path(work_dir) / DIR_NAME
    try:
        entries = [e for e in os.scandir(where) if NAME.fullmatch(e.name)]
    except FileNotFoundError:
        return None
    entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime, reverse=True)
    for entry in entries:
        listed = read(work_dir, entry.name)
        if listed is not None and task_id in listed.task_ids:
            return listed, listed.task_ids.index(task_id)
    return None


def name_of_job(job_name: str) -> str | None:
    """The list name in an array job's name (funnel-array-<name>), or None."""
    name = job_name.removeprefix(JOB_NAME_PREFIX)
    return name if job_name.startswith(JOB_NAME_PREFIX) and NAME.fullmatch(name) else None


# a list, and the files a backend keeps beside it (<name>.sh: HTCondor's wrapper, a
# script a crash left before its unlink)
_LIST_FILE = re.compile(r"([0-9a-f]{16})(?:\.[a-z]{1,8})?")
KEEP_SECONDS = 7 * 24 * 3600.0  # no list is kept longer (reconciler sweep, hourly)
INDEX_SECONDS = 30.0  # how long recover trusts its ListIndex


def remove_older_than(work_dir: Path, seconds: float = KEEP_SECONDS) -> int:
    """Delete lists (and their companion files) last written more than `seconds` ago:
    an element of their array that has not started by then finds no task and exits
    (its task ends SYSTEM_ERROR). Returns how many files went."""
    where = Path(work_dir) / DIR_NAME
    cutoff = time.time() - seconds
    removed = 0
    try:
        entries = list(os.scandir(where))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if _LIST_FILE.fullmatch(entry.name) and \
                entry.stat(follow_symlinks=False).st_mtime < cutoff:
            try:
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def older_than(work_dir: Path, seconds: float) -> list[str]:
    """The names of the lists last written more than `seconds` ago (for a sweep that
    asks the scheduler first which of them an array job may still read)."""
    where = Path(work_dir) / DIR_NAME
    cutoff = time.time() - seconds
    try:
        entries = list(os.scandir(where))
    except FileNotFoundError:
        return []
    return sorted(entry.name for entry in entries if NAME.fullmatch(entry.name)
                  and entry.stat(follow_symlinks=False).st_mtime < cutoff)


def remove(work_dir: Path, name: str) -> bool:
    """Delete the list of that name; False when there was none."""
    if not NAME.fullmatch(name):
        return False
    try:
        os.unlink(Path(work_dir) / DIR_NAME / name)
    except FileNotFoundError:
        return False
    return True


def index(work_dir: Path) -> dict[str, tuple[TaskList, int]]:
    """Every listed task id -> its newest list and index there: `find` for many tasks at
    once (a restart recovering a whole interrupted tick reads each list once, not once
    per task)."""
    where = Path(work_dir) / DIR_NAME
    try:
        entries = [e for e in os.scandir(where) if NAME.fullmatch(e.name)]
    except FileNotFoundError:
        return {}
    entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime)
    found: dict[str, tuple[TaskList, int]] = {}
    for entry in entries:  # oldest first: a newer list's entry replaces an older one's
        listed = read(work_dir, entry.name)
        if listed is not None:
            for position, task_id in enumerate(listed.task_ids):
                found[task_id] = (listed, position)
    return found


class ListIndex:
    """Which list holds a task, for a backend's recover: every list read once, again
    when the index is older than INDEX_SECONDS (a restart recovers a whole tick of
    tasks in one go: `find` per task would read every list per task). The lists this
    process writes are added as they are."""

    def __init__(self, work_dir: Path):
        self.work_dir = Path(work_dir)
        self.built_at = -INDEX_SECONDS
        self.entries: dict[str, tuple[TaskList, int]] = {}

    def find(self, task_id: str) -> tuple[TaskList, int] | None:
        if time.monotonic() - self.built_at >= INDEX_SECONDS:
            self.entries = index(self.work_dir)
            self.built_at = time.monotonic()
        return self.entries.get(task_id)

    def add(self, task_list: TaskList) -> None:
        """A list this process just wrote."""
        for position, task_id in enumerate(task_list.task_ids):
            self.entries[task_id] = (task_list, position)
