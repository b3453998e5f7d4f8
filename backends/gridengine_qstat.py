"""Grid Engine's ``qstat -xml`` output and state letters -> common job states.

``parse_qstat_xml`` reads the job list of one ``qstat -xml -s prsz`` (pending,
running, suspended and the recently finished "zombie" jobs, state ``z``), an array job's
elements each under its own id ``JOB.IDX`` (qstat lists running elements one by one and
the others as ranges, ``<tasks>2-7:1</tasks>``, ``1,4``: expanded here);
``map_qstat_state`` maps a job's state letters by ``QSTAT_STATE_LETTERS`` (data).
No command is run here.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from funnel_hpc.backends.base import JobState

# qstat state letters -> common job states; the first letter of this list found in
# a job's state string wins (Eqw: error, needs a person; dr: being deleted, still running).
QSTAT_STATE_LETTERS: tuple[tuple[str, JobState], ...] = (
    ("E", JobState.FAILED),
    ("r", JobState.RUNNING),
    ("t", JobState.RUNNING),
    ("s", JobState.RUNNING),
    ("S", JobState.RUNNING),
    ("T", JobState.RUNNING),
    ("R", JobState.PENDING),
    ("h", JobState.PENDING),
    ("q", JobState.PENDING),
    ("w", JobState.PENDING),
)

# qstat's state of a finished job kept by qmaster (finished_jobs), "zombie"
ZOMBIE = "z"

def map_qstat_state(letters: str) -> JobState:
    for letter, state in QSTAT_STATE_LETTERS:
        if letter in letters:
            return state
    return JobState.UNKNOWN


# the most elements one <tasks> range is expanded to (Grid Engine's max_aj_tasks is
# 75,000 by default; the gateway's arrays are far smaller)
MAX_EXPANDED = 100_000
_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+)(?::([0-9]+))?)?")


def job_number(job_id: str) -> str:
    """The job number of a job id or of an element id ("123" of "123.4")."""
    return job_id.split(".", 1)[0]


def expand_tasks(text: str) -> list[int]:
    """qstat's <tasks> of an array job ("3", "1-7:1", "1,4", "2-9:2,11") -> element
    numbers; what does not parse is left out."""
    out: list[int] = []
    for part in text.split(","):
        match = _RANGE.fullmatch(part.strip())
        if match is None:
            continue
        first = int(match.group(1))
        last = int(match.group(2) or first)
        step = max(1, int(match.group(3) or 1))
        out += range(first, min(last, first + MAX_EXPANDED * step) + 1, step)
    return out


def parse_qstat_xml(text: str) -> dict[str, tuple[str, str]]:
    """`qstat -xml` -> {job id: (state letters, job name)}; an array job's elements as
    "JOB.IDX" ids."""
    jobs: dict[str, tuple[str, str]] = {}
    for job in ET.fromstring(text).iter("job_list"):
        number = (job.findtext("JB_job_number") or "").strip()
        if not number:
            continue
        answer = ((job.findtext("state") or "").strip(),
                  (job.findtext("JB_name") or "").strip())
        tasks = job.findtext("tasks")
        if tasks is None:
            jobs[number] = answer
        else:
            for element in expand_tasks(tasks):
                jobs[f"{number}.{element}"] = answer
    return jobs
