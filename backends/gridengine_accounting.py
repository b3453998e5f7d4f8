"""Grid Engine's accounting file (accounting(5)), read incrementally.

Each ``AccountingFile.refresh`` reads only the lines appended since the previous one
(no command; from the start again when the file shrank: rotated), keeping the
records of funnel-hpc jobs (named ``funnel-...``), an array job's elements under their
own ids ``JOB.IDX`` (the record's task number). A record gives a finished job's
status: COMPLETED when ``failed`` and ``exit_status`` are 0, else FAILED.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from funnel_hpc.backends.base import JobState, JobStatus

# accounting(5): colon-separated fields; these are the ones read here
ACCT_NAME, ACCT_NUMBER, ACCT_FAILED, ACCT_EXIT = 4, 5, 11, 12
# the element of an array job (1-based), 0 for a job that is not one
ACCT_TASK_NUMBER = 35

# finished statuses and records kept (oldest dropped beyond this)
MAX_REMEMBERED = 10000


@dataclass
class AccountingRecord:
    job_id: str
    name: str
    failed: int       # 0, or Grid Engine's failure code (accounting(5), "failed")
    exit_status: int  # the job script's exit status (128 + N: killed by signal N)

    def status(self) -> JobStatus:
        reason = f"accounting: failed={self.failed} exit={self.exit_status}"
        if self.failed == 0 and self.exit_status == 0:
            return JobStatus(JobState.COMPLETED, reason)
        return JobStatus(JobState.FAILED, reason)


class AccountingFile:
    """Grid Engine's accounting file, read incrementally: each refresh reads only the
    lines appended since the previous one (from the start again if the file shrank:
    rotated). Records of funnel-hpc jobs (named funnel-...) are kept, the newest
    MAX_REMEMBERED."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.by_id: dict[str, AccountingRecord] = {}

    def refresh(self) -> bool:
        """Read what was appended; False when there is no accounting file."""
        try:
            size = self.path.stat().st_size
            if size < self.offset:
                self.offset = 0
            if size == self.offset:
                return True
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read(size - self.offset)
        except OSError:
            return False
        end = data.rfind(b"\n") + 1  # whole lines only: a line being written waits
        for line in data[:end].decode(errors="replace").splitlines():
            record = parse_accounting_line(line)
            if record is not None and record.name.startswith("funnel-"):
                self.by_id.pop(record.job_id, None)  # a newer record of the same job wins
                self.by_id[record.job_id] = record
        while len(self.by_id) > MAX_REMEMBERED:
            self.by_id.pop(next(iter(self.by_id)))
        self.offset += end
        return True

    def newest_named(self, name: str) -> AccountingRecord | None:
        named = [r for r in self.by_id.values() if r.name == name]
        return max(named, key=lambda r: job_order(r.job_id)) if named else None


def job_order(job_id: str) -> tuple[int, int]:
    """A job id or element id ("123", "123.4") as numbers, to find the newest."""
    number, _, element = job_id.partition(".")
    return int(number), int(element or 0)


def parse_accounting_line(line: str) -> AccountingRecord | None:
    """One accounting(5) line, or None for comments and lines that do not parse."""
    if not line or line.startswith("#"):
        return None
    fields = line.split(":")
    try:
        number = str(int(fields[ACCT_NUMBER]))
        element = int(fields[ACCT_TASK_NUMBER]) if len(fields) > ACCT_TASK_NUMBER else 0
        return AccountingRecord(job_id=f"{number}.{element}" if element else number,
                                name=fields[ACCT_NAME],
                                failed=int(fields[ACCT_FAILED]),
                                exit_status=int(fields[ACCT_EXIT]))
    except (IndexError, ValueError):
        return None
