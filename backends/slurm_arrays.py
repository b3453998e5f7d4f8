"""Slurm job arrays: the array script's variables, element ids, and old task lists.

An array carries only what its tasks share: ``array_variables`` are a task's script
variables (backends/templating.py) without the per-task ones, plus the list and the
worker's command line with ``"$task_dir"`` where each task's own dir goes. Two tasks may
share an array when that rendered script is the same (``array_key``). Element ids are
``<job>_<index>`` as squeue -r and sacct print them; sacct may print a pending range
(``123_[5-9,12%4]``), which ``expand`` spells out. Old lists are removed by the
``ListSweep`` (at most once an hour, from poll): a list older than a day whose array
job slurmctld no longer knows (one squeue -n over their names).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from funnel_hpc.backends import arrays
from funnel_hpc.backends.array_script import KEY_LIST_NAME, shell_words, task_dir_of
from funnel_hpc.backends.array_script import key_of as script_key
from funnel_hpc.backends.base import SubmitRequest

# a task's own variables: never in an array's script
PER_TASK = ("task_id", "job_name", "task_name", "task_dir", "worker_argv", "worker_command")
ELEMENT_ID = re.compile(r"([0-9]+)_([0-9]+)")
JOB_ID = re.compile(r"[0-9]+(?:_[0-9]+)?")   # a plain job or an element
RANGE_ID = re.compile(r"([0-9]+)_\[([0-9,\-]+)(?:%[0-9]+)?\]")
TASK_DIR_WORD = '"$task_dir"'
# what array_key renders with: the same placeholders for every task (KEY_LIST_NAME from
# array_script.py, as the other schedulers' keys)
KEY_SIZE = 2
LIST_MAX_AGE = 24 * 3600.0   # a list younger than this is never removed
SWEEP_EVERY = 3600.0         # seconds between two sweeps
SWEEP_NAMES = 200            # names per question of a sweep (squeue -n's argv)


def element_words(request: SubmitRequest) -> tuple[str, ...]:
    """The worker's argv as shell words, its task dir's paths as "$task_dir"...: the
    command every element of an array runs (equal for tasks that may share one)."""
    return shell_words(request.worker_argv, request.task_dir, TASK_DIR_WORD)


def array_variables(variables: dict[str, Any], request: SubmitRequest, work_dir: Path,
                    task_list: arrays.TaskList | None, size: int) -> dict[str, Any]:
    """The array template's variables from one task's script variables (task_list None:
    the placeholders array_key renders with)."""
    task_dir_of(request, work_dir)  # an element finds its task dir from its id alone
    name = task_list.name if task_list is not None else KEY_LIST_NAME
    path = task_list.path if task_list is not None else Path(work_dir) / arrays.DIR_NAME / name
    shared = {key: value for key, value in variables.items() if key not in PER_TASK}
    return {**shared,
            "array_job_name": arrays.JOB_NAME_PREFIX + name,
            "array_size": size,
            "task_list": str(path),
            "task_id_pattern": f"^{arrays.TASK_ID.pattern}$",
            "work_dir": str(work_dir),
            "element_command": " ".join(element_words(request))}


def key_of(script: str, owner: str | None) -> str:
    """An array key: the owner the jobs run as (or none) and the script's digest."""
    return f"{owner or ''}:{script_key(script)}"


def element_ids(job_id: str, size: int) -> list[str]:
    return [f"{job_id}_{index}" for index in range(size)]


def expand(job_id: str) -> list[str]:
    """sacct's JobID as element ids: "123_4" and "125" as they are, a pending range
    "123_[5-7,9]" (a throttle "%4" at its end ignored) as 123_5, 123_6, 123_7, 123_9."""
    match = RANGE_ID.fullmatch(job_id)
    if match is None:
        return [job_id]
    out = []
    for part in match.group(2).split(","):
        first, _, last = part.partition("-")
        if not first.isdigit() or not (last or first).isdigit():
            continue
        out += [f"{match.group(1)}_{index}" for index in range(int(first), int(last or first) + 1)]
    return out


class ListSweep:
    """Removes task lists no element can still need: older than LIST_MAX_AGE and whose
    array job slurmctld no longer lists (pending, running or just ended). `live` says
    which of some job names slurmctld lists (SlurmLink.live_names); None from it (could
    not ask) removes nothing."""

    def __init__(self, live: Callable[[list[str]], set[str] | None], work_dir: Path):
        self.live = live
        self.work_dir = Path(work_dir)
        self.next_at = 0.0

    def due(self) -> bool:
        return time.monotonic() >= self.next_at

    def run(self) -> int:
        """Remove the lists that may go; returns how many."""
        self.next_at = time.monotonic() + SWEEP_EVERY
        old = arrays.older_than(self.work_dir, LIST_MAX_AGE)
        live: set[str] = set()
        for at in range(0, len(old), SWEEP_NAMES):
            names = [arrays.JOB_NAME_PREFIX + name for name in old[at:at + SWEEP_NAMES]]
            listed = self.live(names)
            if listed is None:
                return 0
            live |= listed
        removed = 0
        for name in old:
            if arrays.JOB_NAME_PREFIX + name not in live and arrays.remove(self.work_dir, name):
                removed += 1
        return removed
