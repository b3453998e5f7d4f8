"""slurmrestd's jobs list (GET /slurm/<version>/jobs) as the rows `squeue -r` prints.

One record of the answer is a plain job ("123"), an array element slurmctld has split out
("123_4": array_job_id 123, array_task_id 4), or an array's pending remainder (array_task_id
unset, array_task_string "0-6", "1,3,5-9", "0-999%10"): expanded here to one row per
element, as ``squeue -r`` does. Each row carries what SlurmBackend.poll reads from
``squeue -O JobArrayID,State,exit_code,Reason``: the state, the exit status as
"code:signal" (the record's exit_code is a wait status, 768 = exit 3, as squeue's), the
reason, plus the job's name and user (recover looks jobs up by name).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from funnel_hpc.backends.base import BackendError


class JobRow(NamedTuple):
    """One job or array element, as `squeue -r -O JobArrayID,State,exit_code,Reason` shows it."""

    job_id: str      # "123", or "123_4" for an array element
    state: str       # Slurm's state name: PENDING, RUNNING, COMPLETED, FAILED...
    exit_code: str   # "code:signal", as sacct prints it
    reason: str      # squeue's Reason: None, JobHeldUser, NonZeroExitCode...
    name: str
    user: str


# one part of an array's index expression: 3, 0-6, 0-10:2 (a "%4" throttle ends the whole)
_RANGE = re.compile(r"(\d+)(?:-(\d+)(?::(\d+))?)?")
# how many elements one expression may expand to (MaxArraySize is at most 4,000,001)
MAX_ELEMENTS = 4_000_001


def wait_status(raw: Any) -> str:
    """A wait status (768, or squeue's "768") as code:signal ("3:0"), as sacct shows it;
    other text as it is. The one converter of both modes (squeue's exit_code column and
    slurmrestd's exit_code field are the same wait status)."""
    if isinstance(raw, str) and raw.isdigit():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        return "" if raw is None else str(raw)
    return f"{raw >> 8}:{raw & 0x7F}"


def array_indexes(expression: str) -> list[int]:
    """The element indexes of an array expression ("0-6", "1,3,5-9", "0-999%10",
    "0-10:2"); ValueError when it is not one."""
    text = expression.partition("%")[0]
    indexes: list[int] = []
    for part in text.split(","):
        match = _RANGE.fullmatch(part.strip())
        if match is None:
            raise ValueError(f"not an array index expression: {expression[:80]!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else first
        step = int(match.group(3)) if match.group(3) else 1
        if last < first or step < 1 or len(indexes) + (last - first) // step >= MAX_ELEMENTS:
            raise ValueError(f"not an array index expression: {expression[:80]!r}")
        indexes.extend(range(first, last + 1, step))
    return indexes


def _task_id(raw: Any) -> int | None:
    """array_task_id: an integer (v0.0.38), a string (v0.0.37), or unset/"N/A"."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and raw.isdigit():
        return int(raw)
    return None


def record_rows(record: dict[str, Any]) -> Iterator[JobRow]:
    """The rows of one record of the jobs list (several for an array's pending rest)."""
    job_id = record.get("job_id")
    if not isinstance(job_id, int):
        return
    state = str(record.get("job_state") or "")
    code = wait_status(record.get("exit_code"))
    reason = str(record.get("state_reason") or "")
    name, user = str(record.get("name") or ""), str(record.get("user_name") or "")
    array_id = record.get("array_job_id")
    if not isinstance(array_id, int) or array_id == 0:
        yield JobRow(str(job_id), state, code, reason, name, user)
        return
    task = _task_id(record.get("array_task_id"))
    if task is not None:
        yield JobRow(f"{array_id}_{task}", state, code, reason, name, user)
        return
    expression = str(record.get("array_task_string") or "")
    try:
        indexes = array_indexes(expression) if expression else []
    except ValueError:
        indexes = []  # the array's meta record: its elements are listed on their own
    for index in indexes:
        yield JobRow(f"{array_id}_{index}", state, code, reason, name, user)


def parse_jobs(body: Any, user: str | None = None) -> list[JobRow]:
    """Every row of a jobs answer; only `user`'s jobs when given (as `squeue --me`).
    BackendError when the answer is not a jobs list."""
    records = body.get("jobs") if isinstance(body, dict) else None
    if not isinstance(records, list):
        raise BackendError(f"slurmrestd answered no jobs list: {str(body)[:200]!r}")
    rows: list[JobRow] = []
    for record in records:
        if not isinstance(record, dict):
            continue
        if user is not None and record.get("user_name") != user:
            continue
        rows.extend(record_rows(record))
    return rows
