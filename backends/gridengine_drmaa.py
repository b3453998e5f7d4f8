"""Grid Engine's DRMAA helper process and the gateway's end of it.

The DRMAA library runs in ONE long-lived helper process
(``python -m funnel_hpc.backends.gridengine_drmaa``) that holds the one DRMAA
session and speaks JSON lines (backends/jsonlines.py) on its stdin/stdout, because:

- Debian's libdrmaa links libjemalloc, which cannot be dlopen()ed into a
  running Python ("cannot allocate memory in static TLS block"): the helper is
  started with ``GLIBC_TUNABLES=glibc.rtld.optional_static_tls=...``;
- a DRMAA session is per process and its C library is not thread-safe; the
  helper keeps it away from the gateway's threads (one request at a time).

Requests: ``submit`` (runJob), ``submit_array`` (runBulkJobs 1..count, ids ``JOB.IDX``),
``cancel`` (control TERMINATE), ``status`` (jobStatus of
each id, in-process library calls; ended jobs are reaped with ``wait(id, 0)`` for
their exit, kept by the backend since a reaped job is unknown to DRMAA afterwards).
"""

from __future__ import annotations

import sys
from typing import Any

from funnel_hpc.backends.base import BackendError, JobState, JobStatus
from funnel_hpc.backends.jsonlines import ChildGone, ChildProcess, serve

# DRMAA 1.0 job states (drmaa.JobState values) -> common job states.
# "done" and "failed" are refined from the reaped job's exit (see finished_status).
DRMAA_STATE_MAP: dict[str, JobState] = {
    "undetermined": JobState.UNKNOWN,
    "queued_active": JobState.PENDING,
    "system_on_hold": JobState.PENDING,
    "user_on_hold": JobState.PENDING,
    "user_system_on_hold": JobState.PENDING,
    "running": JobState.RUNNING,
    "system_suspended": JobState.RUNNING,
    "user_suspended": JobState.RUNNING,
    "user_system_suspended": JobState.RUNNING,
    "done": JobState.COMPLETED,
    "failed": JobState.FAILED,
}


def finished_status(raw_state: str, info: dict[str, Any] | None, cancelled: bool,
                    wait_error: str = "") -> JobStatus:
    """A DRMAA job that ended ("done"/"failed"), from its reaped JobInfo (a dict)."""
    if cancelled:
        return JobStatus(JobState.CANCELLED, f"drmaa: {raw_state}, terminated by funnel-hpc")
    if info is None:  # e.g. deleted before it ran: no usage information
        return JobStatus(JobState.CANCELLED if raw_state == "failed" else JobState.LOST,
                         f"drmaa: {raw_state}, no exit information ({wait_error})")
    if info.get("wasAborted"):
        return JobStatus(JobState.CANCELLED, f"drmaa: {raw_state}, aborted (deleted by qdel "
                                             "or the scheduler before it could end)")
    if info.get("hasSignal"):
        return JobStatus(JobState.FAILED, f"drmaa: {raw_state}, killed by signal "
                                          f"{info.get('terminatedSignal')}")
    code = info.get("exitStatus")
    if info.get("hasExited") and code == 0:
        return JobStatus(JobState.COMPLETED, "drmaa: done exit=0")
    return JobStatus(JobState.FAILED, f"drmaa: {raw_state} exit={code}")


# ---- the helper process ----

def agent_main() -> int:
    """The helper: one DRMAA session, answering requests until its stdin closes."""
    import drmaa  # DRMAA_LIBRARY_PATH is in this process's environment

    session = drmaa.Session()
    session.initialize()
    cancelled: set[str] = set()

    def describe(exc: Exception) -> dict[str, Any]:
        # DRMAA's transient rule: qmaster unreachable, or it asks to try later
        unreachable = (drmaa.errors.DrmCommunicationException, drmaa.errors.TryLaterException)
        return {"invalid_job": isinstance(exc, drmaa.errors.InvalidJobException),
                "transient": isinstance(exc, unreachable)}

    try:
        return serve(lambda request: _agent_call(drmaa, session, cancelled, request),
                     hello=str(session.drmsInfo), describe=describe)
    finally:
        session.exit()


def _agent_call(drmaa: Any, session: Any, cancelled: set[str], request: dict[str, Any]) -> Any:
    op = request["op"]
    if op in ("submit", "submit_array"):
        template = session.createJobTemplate()
        try:
            template.remoteCommand = request["command"]
            template.workingDirectory = request["workdir"]
            template.nativeSpecification = request["native"]
            if op == "submit_array":
                return list(session.runBulkJobs(template, 1, int(request["count"]), 1))
            return session.runJob(template)
        finally:
            session.deleteJobTemplate(template)
    if op == "cancel":
        session.control(request["id"], drmaa.JobControlAction.TERMINATE)
        cancelled.add(request["id"])
        return None
    if op == "status":
        return {job_id: _agent_status(drmaa, session, cancelled, job_id)
                for job_id in request["ids"]}
    raise ValueError(f"unknown op {op!r}")


def _agent_status(drmaa: Any, session: Any, cancelled: set[str],
                  job_id: str) -> dict[str, Any]:
    try:
        raw = str(session.jobStatus(job_id))
    except drmaa.errors.InvalidJobException:
        return {"state": JobState.LOST.value,
                "reason": "drmaa: this session does not know the job (ended before the "
                          "gateway's DRMAA session started, or never existed)"}
    except drmaa.errors.DrmaaException as exc:
        return {"state": JobState.UNKNOWN.value, "reason": f"drmaa jobStatus failed: {exc}"}
    if raw not in ("done", "failed"):
        state = DRMAA_STATE_MAP.get(raw, JobState.UNKNOWN)
        return {"state": state.value, "reason": f"drmaa: {raw}"}
    info, error = None, ""
    try:
        info = session.wait(job_id, drmaa.Session.TIMEOUT_NO_WAIT)._asdict()
        info.pop("resourceUsage", None)
    except Exception as exc:  # noqa: BLE001 - e.g. "no usage information" for deleted jobs
        error = str(exc)
    status = finished_status(raw, info, job_id in cancelled, error)
    cancelled.discard(job_id)
    return {"state": status.state.value, "reason": status.reason, "final": True}


class DrmaaAgent:
    """The gateway's end of the helper: started on first use, again if it died."""

    def __init__(self, env: dict[str, str], timeout: float):
        self.child = ChildProcess([sys.executable, "-m", "funnel_hpc.backends.gridengine_drmaa"],
                                  timeout, env=env)

    @property
    def requests(self) -> int:
        return self.child.requests

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.child.call(request)
        except ChildGone as exc:
            raise BackendError(f"DRMAA helper: {exc}", transient=True) from None

    def close(self) -> None:
        self.child.close()


if __name__ == "__main__":
    sys.exit(agent_main())
