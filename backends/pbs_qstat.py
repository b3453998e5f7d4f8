"""PBS's ``qstat -f -F json -x`` documents and job states -> common job states.

``parse_qstat_json`` reads one document (``{"timestamp", "pbs_version", "pbs_server",
"Jobs": {"123.server": {"job_state", "Exit_status", "substate", "comment", ...}}}``; PBS
leaves "Jobs" out when no job matched); ``job_status`` maps one job's attributes by
``STATE_MAP`` and ``EXEC_CODES`` (data); ``unknown_ids`` reads the ids qstat named
"Unknown Job Id" on stderr while it printed the others. No command is run here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from funnel_hpc.backends.base import JobState, JobStatus

log = logging.getLogger(__name__)

# job_state letters (qstat -f) -> common job states. F (finished) and X (finished subjob)
# are decided by exit_state below: COMPLETED or FAILED or CANCELLED by Exit_status.
STATE_MAP: dict[str, JobState] = {
    "Q": JobState.PENDING,   # queued
    "H": JobState.PENDING,   # held by a user or operator (a system hold: UNRUNNABLE below)
    "W": JobState.PENDING,   # waiting for its execution time, or after a failed stage-in
    "T": JobState.PENDING,   # in transit to another queue or server
    "R": JobState.RUNNING,   # running
    "E": JobState.RUNNING,   # exiting after having run (stage-out, epilogue)
    "B": JobState.RUNNING,   # an array job whose subjobs have begun
    "S": JobState.RUNNING,   # suspended by the server (preemption by suspension)
    "U": JobState.RUNNING,   # suspended: its workstation became busy
    # moved to another server (peer scheduling): this server no longer follows it, so the
    # gateway cannot either; the worker's event log decides (judgement: not UNKNOWN, which
    # would keep the task waiting for a state this server will never give)
    "M": JobState.LOST,
}
FINISHED_LETTERS = frozenset({"F", "X"})

# substates of a finished job (OpenPBS job.h, JOB_SUBSTATE_*)
SUBSTATE_TERMINATED = 91  # ended by qdel (ours or anyone's)
SUBSTATE_FAILED = 93      # aborted by the server (never ran, or a hook refused it)

# Negative Exit_status values: PBS's own JOB_EXEC_* codes (OpenPBS src/include/job.h), the
# job did not run or was ended by PBS. NODE_FAILED where a node or its MOM failed (the task
# did nothing wrong: reconciler.retry_on "node_fail"), else FAILED.
EXEC_CODES: dict[int, tuple[JobState, str]] = {
    -1: (JobState.FAILED, "JOB_EXEC_FAIL1: exec failed before files, no retry"),
    -2: (JobState.FAILED, "JOB_EXEC_FAIL2: exec failed after files, no retry"),
    -3: (JobState.NODE_FAILED, "JOB_EXEC_RETRY: exec failed, retry"),
    -4: (JobState.NODE_FAILED, "JOB_EXEC_INITABT: aborted on MOM initialization"),
    -5: (JobState.NODE_FAILED, "JOB_EXEC_INITRST: aborted on MOM init, checkpoint"),
    -6: (JobState.NODE_FAILED, "JOB_EXEC_INITRMG: aborted on MOM init, checkpoint, migrate"),
    -7: (JobState.NODE_FAILED, "JOB_EXEC_BADRESRT: restart failed"),
    -10: (JobState.FAILED, "JOB_EXEC_FAILUID: invalid uid/gid for the job"),
    -11: (JobState.NODE_FAILED, "JOB_EXEC_RERUN: job rerun"),
    -12: (JobState.PREEMPTED, "JOB_EXEC_CHKP: checkpointed and killed"),
    -13: (JobState.FAILED, "JOB_EXEC_FAIL_PASSWORD: bad password"),
    -14: (JobState.NODE_FAILED, "JOB_EXEC_RERUN_SIS_FAIL: a sister MOM failed"),
    -15: (JobState.NODE_FAILED, "JOB_EXEC_QUERST: requeued for restart from checkpoint"),
    -16: (JobState.FAILED, "JOB_EXEC_FAILHOOK_RERUN: a hook refused the job"),
    -17: (JobState.FAILED, "JOB_EXEC_FAILHOOK_DELETE: a hook refused the job"),
    -18: (JobState.FAILED, "JOB_EXEC_HOOK_RERUN: a hook requeued the job"),
    -19: (JobState.FAILED, "JOB_EXEC_HOOK_DELETE: a hook deleted the job"),
    -20: (JobState.NODE_FAILED, "JOB_EXEC_RERUN_MS_FAIL: mother superior connection failed"),
    -21: (JobState.FAILED, "JOB_EXEC_FAIL_SECURITY: security breach in the PBS directory"),
    -22: (JobState.FAILED, "JOB_EXEC_HOOKERROR: a hook failed or timed out"),
    -23: (JobState.FAILED, "JOB_EXEC_FAIL_KRB5: no Kerberos credentials"),
    -24: (JobState.FAILED, "JOB_EXEC_KILL_NCPUS_BURST: exceeded ncpus (burst)"),
    -25: (JobState.FAILED, "JOB_EXEC_KILL_NCPUS_SUM: exceeded ncpus (sum)"),
    -26: (JobState.FAILED, "JOB_EXEC_KILL_VMEM: exceeded vmem"),
    -27: (JobState.FAILED, "JOB_EXEC_KILL_MEM: exceeded mem"),
    -28: (JobState.FAILED, "JOB_EXEC_KILL_CPUT: exceeded cput"),
    -29: (JobState.FAILED, "JOB_EXEC_KILL_WALLTIME: exceeded walltime"),
    -30: (JobState.NODE_FAILED, "JOB_EXEC_JOINJOB: join job failed"),
}
# an Exit_status above this is 256 + the signal that killed the job's top process
SIGNAL_BASE = 256

# qstat's words for an id the server does not know (its other ids are still printed)
UNKNOWN_JOB = re.compile(r"Unknown Job Id (\S+)")


def sequence(job_id: str) -> str:
    """The sequence number of a job id ("123" of "123.server", "123[]" of an array)."""
    return job_id.split(".", 1)[0]


def parse_qstat_json(text: str) -> dict[str, Mapping[str, Any]]:
    """One `qstat -f -F json` document -> {job id: its attributes}; {} when it has no
    "Jobs". Raises ValueError for text that is not such a document (strict=False: some
    PBS versions print raw control characters inside Variable_List values)."""
    document = json.loads(text, strict=False) if text.strip() else {}
    if not isinstance(document, dict):
        raise ValueError("not a JSON object")
    jobs = document.get("Jobs") or {}
    if not isinstance(jobs, dict) or not all(isinstance(v, dict) for v in jobs.values()):
        raise ValueError('"Jobs" is not an object of job objects')
    return jobs


def unknown_ids(stderr: str) -> set[str]:
    """The ids qstat (or qdel) said it does not know."""
    return {match.group(1) for match in UNKNOWN_JOB.finditer(stderr)}


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def exit_state(attributes: Mapping[str, Any]) -> tuple[JobState, str]:
    """A finished job's state and what its Exit_status means."""
    code = _int(attributes.get("Exit_status"))
    substate = _int(attributes.get("substate"))
    if substate == SUBSTATE_TERMINATED:  # qdel'd, whatever its top process returned
        return JobState.CANCELLED, "deleted (qdel)" + (f", exit={code}" if code else "")
    if code is None:  # never ran: aborted by the server (substate 93), or deleted queued
        return JobState.FAILED, "no exit status"
    if code == 0:
        return JobState.COMPLETED, "exit=0"
    if code < 0:
        state, meaning = EXEC_CODES.get(code, (JobState.FAILED, "a PBS exec failure"))
        return state, f"exit={code} ({meaning})"
    if code > SIGNAL_BASE:
        return JobState.FAILED, f"exit={code} (killed by signal {code - SIGNAL_BASE})"
    return JobState.FAILED, f"exit={code}"


def job_status(attributes: Mapping[str, Any]) -> JobStatus:
    """One job's attributes (qstat -f -F json) -> JobStatus, the reason quoting PBS."""
    letter = str(attributes.get("job_state") or "")
    comment = str(attributes.get("comment") or "")[:200]
    if letter in FINISHED_LETTERS:
        state, meaning = exit_state(attributes)
    elif letter == "H" and "s" in str(attributes.get("Hold_Types") or ""):
        # a system hold (e.g. too many failed attempts to run): only an operator can
        # release it, so the reconciler ends the task rather than wait for ever
        state, meaning = JobState.UNRUNNABLE, "system hold"
    else:
        state, meaning = STATE_MAP.get(letter, JobState.UNKNOWN), ""
        if letter not in STATE_MAP:
            log.warning("qstat: unknown PBS job_state %r (UNKNOWN)", letter[:20])
    words = " ".join(part for part in (f"qstat: {letter or '?'}", meaning) if part)
    return JobStatus(state, f"{words} comment={comment}" if comment else words)
