"""HTCondor through its Python bindings: Schedd.submit, one Schedd.query per poll, Schedd.act.

Submit: the submit description is rendered from ``templates/htcondor.sub.j2``
(or ``backend.htcondor.template``); the job's executable is a wrapper script
rendered from ``templates/htcondor.sh.j2`` into ``<task_dir>/htcondor.sh`` that
execs the worker. Output, error and the job event log go to the task dir
(a file system shared with the execute nodes is assumed; nothing is
transferred). Each job carries ``+FunnelTaskId`` so a lost submission is found
again (``recover``). The description is parsed by the bindings'
``htcondor.Submit`` and submitted as one job; the job id is the ClusterId.

Poll: ONE ``schedd.query`` whose constraint names every in-flight cluster
(``member(ClusterId, {1, 2, ...})``); clusters no longer in the queue
are looked up with at most one ``schedd.history`` call. A job in neither is
LOST. So a poll costs one schedd query, two when some jobs have left the queue.

JobStatus codes map onto JobState by ``STATE_MAP`` (data). A COMPLETED job
(4) with a non-zero ExitCode or killed by a signal is FAILED. HELD (5) is
FAILED: a held job needs a person (the HoldReason is in the reason) and would
otherwise keep the task QUEUED forever. An IDLE job that has started before
(``NumJobStarts``) was evicted: it is PREEMPTED, and the reconciler removes it
rather than let HTCondor rerun it behind the gateway's back (``reconciler.retry_on``).

Cancel: ``schedd.act(JobAction.Remove, "ClusterId == N", reason)``;
removing a job that is gone already is not an error.

Bindings: ``htcondor2`` (HTCondor >= 24, the only module of the 25.x wheels)
or the older ``htcondor`` module, imported when the backend is created;
``backend.htcondor.bindings`` names the module to use instead (e.g. ``htcondor``
to force the legacy bindings, or a module offering the same ``Schedd``,
``Submit``, ``JobAction``, ``Collector``, ``DaemonTypes`` names: the end-to-end
tests point it at ``tests.htcondor_recorded_bindings``, whose Schedd talks to a
fake schedd, because no HTCondor daemon can run on the test machines).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from funnel_hpc.backends import files
from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.templating import (
    directive,
    map_backend_parameters,
    render,
    script_variables,
)
from funnel_hpc.core.config import HTCondorOptions

# HTCondor JobStatus codes -> common job states
STATE_MAP: dict[int, JobState] = {
    1: JobState.PENDING,    # Idle
    2: JobState.RUNNING,    # Running
    3: JobState.CANCELLED,  # Removed
    4: JobState.COMPLETED,  # Completed (FAILED when ExitCode != 0 or ExitBySignal)
    5: JobState.FAILED,     # Held
    6: JobState.RUNNING,    # Transferring Output
    7: JobState.RUNNING,    # Suspended
}

STATUS_NAMES: dict[int, str] = {1: "IDLE", 2: "RUNNING", 3: "REMOVED", 4: "COMPLETED",
                                5: "HELD", 6: "TRANSFERRING_OUTPUT", 7: "SUSPENDED"}

PROJECTION = ["ClusterId", "ProcId", "JobStatus", "ExitCode", "ExitBySignal", "ExitSignal",
              "HoldReason", "RemoveReason", "FunnelTaskId", "NumJobStarts"]

CANCEL_REASON = "Canceled by funnel-hpc (TES CancelTask)"

# a submit command name from the admin's allow-list: request_gpus, accounting_group, +Attr
COMMAND_NAME = re.compile(r"\+?[A-Za-z][A-Za-z0-9_.]*")

# BINDING_ERRORS: the bindings raise HTCondorException (htcondor2), RuntimeError, ValueError
# or classad errors (legacy htcondor), with no common base but Exception: every call into
# them catches Exception, and says what it was doing.
# what the bindings say when the schedd cannot be reached
UNREACHABLE = ("locate", "connect", "timed out", "timeout", "communicat", "refused")


def load_bindings(module: str = "") -> Any:
    """The named bindings module; by default htcondor2, else the legacy htcondor one."""
    for name in ([module] if module else ["htcondor2", "htcondor"]):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    if module:
        raise BackendError(f"backend.htcondor.bindings: cannot import {module!r}")
    raise BackendError("the HTCondor Python bindings are not installed "
                       "(pip install 'funnel-hpc[htcondor]')")


def job_status(ad: Any) -> JobStatus:
    """One job ClassAd (query or history) -> JobStatus."""
    code = int(ad.get("JobStatus", 0) or 0)
    state = STATE_MAP.get(code, JobState.UNKNOWN)
    exit_code = ad.get("ExitCode")
    by_signal = bool(ad.get("ExitBySignal", False))
    if state is JobState.COMPLETED and (by_signal or (exit_code not in (None, 0))):
        state = JobState.FAILED
    why = ad.get("HoldReason") or ad.get("RemoveReason") or ""
    if state is JobState.PENDING and int(ad.get("NumJobStarts", 0) or 0) > 0:
        state = JobState.PREEMPTED  # idle again after running: evicted from its slot
        why = why or "evicted"
    if by_signal:
        why = f"signal {ad.get('ExitSignal')}" + (f"; {why}" if why else "")
    return JobStatus(state, f"condor: {STATUS_NAMES.get(code, code)} exit={exit_code} "
                            f"reason={why}")


def cluster_constraint(cluster_ids: list[str]) -> str:
    """One flat expression for any number of clusters. (A chain of `ClusterId =?= N ||`
    terms nests one level per job, and the ClassAd library fails to evaluate it somewhere
    between 300 and 500 terms.)"""
    return "member(ClusterId, {" + ", ".join(str(int(c)) for c in cluster_ids) + "})"


def is_unreachable(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(marker in text for marker in UNREACHABLE)


class HTCondorBackend(Backend):
    kind = "htcondor"
    job_output_files = ("htcondor.out", "htcondor.err")  # the shipped template's output/error

    options: HTCondorOptions

    def __init__(self, options: HTCondorOptions, work_dir: Path,
                 on_change: Callable[[], None] | None = None, schedd: Any = None,
                 bindings: Any = None, name: str | None = None):
        super().__init__(options, work_dir, on_change, name)
        self.template = options.template
        self.wrapper_template = options.wrapper_template
        self.htcondor = bindings or load_bindings(options.bindings)
        self._schedd = schedd  # tests hand in a schedd; otherwise located on first use

    def schedd(self) -> Any:
        if self._schedd is None:
            try:
                name = self.options.schedd_name
                if name:
                    collector = self.htcondor.Collector(self.options.collector or None)
                    ad = collector.locate(self.htcondor.DaemonTypes.Schedd, name)
                    self._schedd = self.htcondor.Schedd(ad)
                else:
                    self._schedd = self.htcondor.Schedd()
            except Exception as exc:  # noqa: BLE001 - see BINDING_ERRORS
                raise BackendError(f"cannot locate the schedd: {exc}", transient=True) from None
        return self._schedd

    # ---- submit ----

    def variables(self, request: SubmitRequest) -> dict[str, Any]:
        # backend_parameters map to submit commands here, not to sbatch-style options
        commands = map_backend_parameters(request.backend_parameters,
                                          self.options.backend_parameters,
                                          COMMAND_NAME, "a submit command name")
        variables = script_variables(request, self.options, commands)
        variables["wrapper"] = str(request.task_dir / "htcondor.sh")
        return variables

    def render(self, request: SubmitRequest) -> tuple[str, str]:
        """(submit description, wrapper script) for the request."""
        variables = self.variables(request)
        return render(self.template, variables), render(self.wrapper_template, variables)

    def submit(self, request: SubmitRequest) -> str:
        try:
            description, wrapper = self.render(request)
        except ValueError as exc:
            raise BackendError(f"cannot render the HTCondor submit description: {exc}") from None
        # the owner's to run, nobody else's to read (no symlink followed: files.py)
        files.write_private(Path(request.task_dir), "htcondor.sh", wrapper, mode=0o700)
        files.write_private(Path(request.task_dir), "htcondor.sub", description)
        try:
            submit = self.htcondor.Submit(description)
        except Exception as exc:  # noqa: BLE001 - see BINDING_ERRORS
            raise BackendError(f"HTCondor refused the submit description: {exc}") from None
        schedd = self.schedd()
        try:
            result = schedd.submit(submit, count=1)
        except Exception as exc:  # noqa: BLE001 - see BINDING_ERRORS
            raise BackendError(f"condor submit failed: {exc}",
                               transient=is_unreachable(exc)) from None
        return str(result.cluster())

    # ---- cancel ----

    def cancel(self, job_id: str) -> None:
        if not str(job_id).isdigit():
            return  # not a cluster id: nothing HTCondor could remove
        schedd = self.schedd()
        try:
            schedd.act(self.htcondor.JobAction.Remove, f"ClusterId == {int(job_id)}",
                       CANCEL_REASON)
        except Exception as exc:  # noqa: BLE001 - see BINDING_ERRORS
            raise BackendError(f"condor remove {job_id} failed: {exc}",
                               transient=is_unreachable(exc)) from None

    # ---- poll ----

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        wanted = sorted({str(j) for j in job_ids})
        found: dict[str, JobStatus] = {}
        clusters = [j for j in wanted if j.isdigit()]
        if clusters:
            try:  # poll never raises: a schedd we cannot locate or query is UNKNOWN
                schedd = self.schedd()
                ads = schedd.query(constraint=cluster_constraint(clusters),
                                   projection=PROJECTION)
            except Exception as exc:  # noqa: BLE001 - BackendError or see BINDING_ERRORS
                reason = f"schedd query failed: {exc}"
                return {j: JobStatus(JobState.UNKNOWN, reason) for j in wanted}
            for ad in ads:
                cluster = str(ad.get("ClusterId"))
                if cluster in clusters:
                    found[cluster] = job_status(ad)
            missing = [c for c in clusters if c not in found]
            if missing:
                found.update(self._history(schedd, missing))
        for job_id in wanted:
            found.setdefault(job_id, JobStatus(
                JobState.LOST, "HTCondor no longer knows this job (not in the queue or history)"))
        return found

    def _history(self, schedd: Any, clusters: list[str]) -> dict[str, JobStatus]:
        try:
            ads = list(schedd.history(constraint=cluster_constraint(clusters),
                                      projection=PROJECTION, match=len(clusters)))
        except Exception as exc:  # noqa: BLE001 - see BINDING_ERRORS
            # not LOST: that would fail the tasks; ask again next poll
            return {c: JobStatus(JobState.UNKNOWN, f"schedd history failed: {exc}")
                    for c in clusters}
        out: dict[str, JobStatus] = {}
        for ad in ads:  # newest first: keep the first ad of each cluster
            cluster = str(ad.get("ClusterId"))
            if cluster in clusters and cluster not in out:
                out[cluster] = job_status(ad)
        return out

    # ---- recover ----

    def recover(self, task_id: str, task_dir: Any,
                owner: str | None = None) -> str | None:
        """The newest cluster whose FunnelTaskId is the task's, in the queue or history."""
        constraint = f'FunnelTaskId =?= "{directive(task_id)}"'
        schedd = self.schedd()
        try:
            ads = list(schedd.query(constraint=constraint, projection=["ClusterId"]))
            if not ads:
                ads = list(schedd.history(constraint=constraint, projection=["ClusterId"],
                                          match=1))
        except Exception as exc:  # noqa: BLE001 - see BINDING_ERRORS
            raise BackendError(f"schedd query failed: {exc}", transient=True) from None
        clusters = [int(ad["ClusterId"]) for ad in ads if "ClusterId" in ad]
        return str(max(clusters)) if clusters else None
