"""Grid Engine's ``qstat -xml`` output and state letters -> common job states.

``parse_qstat_xml`` reads the job list of one ``qstat -xml -s prsz`` (pending,
running, suspended and the recently finished "zombie" jobs, state ``z``);
``map_qstat_state`` maps a job's state letters by ``QSTAT_STATE_LETTERS`` (data).
No command is run here.
"""

from __future__ import annotations

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


def parse_qstat_xml(text: str) -> dict[str, tuple[str, str]]:
    """`qstat -xml` -> {job id: (state letters, job name)}."""
    jobs: dict[str, tuple[str, str]] = {}
    for job in ET.fromstring(text).iter("job_list"):
        number = (job.findtext("JB_job_number") or "").strip()
        if number:
            jobs[number] = ((job.findtext("state") or "").strip(),
                            (job.findtext("JB_name") or "").strip())
    return jobs
