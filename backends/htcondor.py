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

Arrays (``array_max`` > 1): tasks whose description and wrapper would be identical but
for the task go as ONE cluster of N procs (one ``Schedd.submit`` with count N); proc P
runs the wrapper ``<work_dir>/arrays/<list>.sh`` with argument $(Process), which reads line
P of the gateway's task list (backends/arrays.py, array_script.py). Element ids are
``CLUSTER.PROC``: polled in the same one query (the cluster constraint), removed one by
one (``ClusterId == C && ProcId == P``), recovered by the cluster's JobBatchName
(``funnel-array-<list>``).

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

from funnel_hpc.backends import arrays, files
from funnel_hpc.backends.array_script import (
    KEY_LIST_NAME,
    array_variables,
    checked,
    key_of,
    worker_command,
)
from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.templating import (
    TemplateValueError,
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


# a job id: a cluster ("123", one task's job) or a proc of one ("123.4", an array element)
JOB_ID = re.compile(r"([0-9]+)(?:\.([0-9]+))?")
# the proc's index in the task list: its $(Process), the wrapper's one argument
ARRAY_INDEX = "$1"


def parse_job_id(job_id: str) -> tuple[int, int | None] | None:
    """(cluster, proc or None) of a job id, or None for what is not one."""
    match = JOB_ID.fullmatch(str(job_id))
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)) if match.group(2) is not None else None


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
        self.lists = arrays.ListIndex(work_dir)  # recover's: which list holds a task
        if options.array_max < 1:
            raise ValueError(f"backend.htcondor.array_max must be at least 1, "
                             f"not {options.array_max}")
        self.array_max = options.array_max
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
        variables["array"] = None
        return variables

    def render(self, request: SubmitRequest) -> tuple[str, str]:
        """(submit description, wrapper script) for the request."""
        variables = self.variables(request)
        return render(self.template, variables), render(self.wrapper_template, variables)

    def render_array(self, requests: list[SubmitRequest], list_path: Path) -> tuple[str, str]:
        """(submit description, wrapper) of one cluster of these requests' procs."""
        one = self.variables(requests[0])
        del one["wrapper"]
        variables = array_variables(one, list_path=list_path, index=ARRAY_INDEX,
                                    work_dir=self.work_dir,
                                    command=worker_command(requests, self.work_dir))
        variables["array"]["wrapper"] = str(list_path.parent / f"{list_path.name}.sh")
        return (render(self.template, variables),
                checked(render(self.wrapper_template, variables), variables))

    def array_key(self, request: SubmitRequest) -> str | None:
        """The digest of the description and wrapper this task's proc would share. None
        (one cluster, through submit, which names what is wrong) when it cannot be a proc
        of an array: a value the template refuses, a template without an array part,
        another task dir."""
        if self.array_max <= 1:
            return None
        try:
            description, wrapper = self.render_array(
                [request], Path(self.work_dir) / arrays.DIR_NAME / KEY_LIST_NAME)
        except (BackendError, TemplateValueError):
            return None
        return key_of(description + "\0" + wrapper)

    def submit_array(self, requests: list[SubmitRequest]) -> list[str]:
        """One cluster of len(requests) procs: proc P runs requests[P]. The wrapper stays
        in <work_dir>/arrays while procs may start (nothing is transferred)."""
        try:
            listed = arrays.write(self.work_dir, [r.task_id for r in requests])
            self.lists.add(listed)
            description, wrapper = self.render_array(requests, listed.path)
            path = files.write_private(arrays.directory(self.work_dir), f"{listed.name}.sh",
                                       wrapper, mode=0o700)
        except (ValueError, OSError) as exc:
            raise BackendError(f"cannot render the HTCondor array: {exc}") from None
        try:
            try:
                submit = self.htcondor.Submit(description)
            except Exception as exc:  # noqa: BLE001 - see BINDING_ERRORS
                raise BackendError(f"HTCondor refused the submit description: {exc}") from None
            try:
                result = self.schedd().submit(submit, count=len(requests))
            except Exception as exc:  # noqa: BLE001 - see BINDING_ERRORS
                raise BackendError(f"condor submit failed: {exc}",
                                   transient=is_unreachable(exc)) from None
        except BackendError:
            path.unlink(missing_ok=True)
            raise
        cluster = int(result.cluster())
        return [f"{cluster}.{proc}" for proc in range(len(requests))]

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
        parsed = parse_job_id(job_id)
        if parsed is None:
            return  # not a job id: nothing HTCondor could remove
        cluster, proc = parsed
        spec = f"ClusterId == {cluster}" + (f" && ProcId == {proc}" if proc is not None else "")
        schedd = self.schedd()
        try:
            schedd.act(self.htcondor.JobAction.Remove, spec, CANCEL_REASON)
        except Exception as exc:  # noqa: BLE001 - see BINDING_ERRORS
            raise BackendError(f"condor remove {job_id} failed: {exc}",
                               transient=is_unreachable(exc)) from None

    # ---- poll ----

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        wanted = sorted({str(j) for j in job_ids})
        found: dict[str, JobStatus] = {}
        asked = [j for j in wanted if parse_job_id(j) is not None]
        if asked:
            try:  # poll never raises: a schedd we cannot locate or query is UNKNOWN
                schedd = self.schedd()
                ads = schedd.query(constraint=cluster_constraint(_clusters(asked)),
                                   projection=PROJECTION)
            except Exception as exc:  # noqa: BLE001 - BackendError or see BINDING_ERRORS
                reason = f"schedd query failed: {exc}"
                return {j: JobStatus(JobState.UNKNOWN, reason) for j in wanted}
            _match(ads, set(asked), found)
            missing = [j for j in asked if j not in found]
            if missing:
                found.update(self._history(schedd, missing))
        for job_id in wanted:
            found.setdefault(job_id, JobStatus(
                JobState.LOST, "HTCondor no longer knows this job (not in the queue or history)"))
        return found

    def _history(self, schedd: Any, job_ids: list[str]) -> dict[str, JobStatus]:
        # one ad per cluster asked for, or every proc of the arrays asked for
        procs = any("." in j for j in job_ids)
        try:
            ads = list(schedd.history(constraint=cluster_constraint(_clusters(job_ids)),
                                      projection=PROJECTION,
                                      match=-1 if procs else len(job_ids)))
        except Exception as exc:  # noqa: BLE001 - see BINDING_ERRORS
            # not LOST: that would fail the tasks; ask again next poll
            return {j: JobStatus(JobState.UNKNOWN, f"schedd history failed: {exc}")
                    for j in job_ids}
        out: dict[str, JobStatus] = {}
        _match(ads, set(job_ids), out)  # newest first: the first ad of each job wins
        return out

    # ---- recover ----

    def recover(self, task_id: str, task_dir: Any,
                owner: str | None = None) -> str | None:
        """The newest cluster whose FunnelTaskId is the task's, or the task's proc of the
        newest cluster named after the task list holding it (JobBatchName), in the queue
        or history."""
        found = [str(c) for c in self._clusters_where(f'FunnelTaskId =?= "{directive(task_id)}"')]
        listed = self.lists.find(task_id)
        if listed is not None:
            name = directive(listed[0].job_name)
            found += [f"{c}.{listed[1]}" for c in
                      self._clusters_where(f'JobBatchName =?= "{name}"')]
        return max(found, key=lambda j: int(j.split(".")[0])) if found else None

    def _clusters_where(self, constraint: str) -> list[int]:
        """The clusters of the queue's jobs matching, else of the newest in history."""
        schedd = self.schedd()
        try:
            ads = list(schedd.query(constraint=constraint, projection=["ClusterId"]))
            if not ads:
                ads = list(schedd.history(constraint=constraint, projection=["ClusterId"],
                                          match=1))
        except Exception as exc:  # noqa: BLE001 - see BINDING_ERRORS
            raise BackendError(f"schedd query failed: {exc}", transient=True) from None
        clusters = [int(ad["ClusterId"]) for ad in ads if "ClusterId" in ad]
        return [max(clusters)] if clusters else []


def _clusters(job_ids: list[str]) -> list[str]:
    """The distinct clusters of these job ids (all parse)."""
    return list(dict.fromkeys(j.split(".")[0] for j in job_ids))


def _match(ads: Any, wanted: set[str], out: dict[str, JobStatus]) -> None:
    """Each ad's status under the id asked for it ("C" or "C.P"), the first ad of each."""
    for ad in ads:
        cluster = str(ad.get("ClusterId"))
        for job_id in (cluster, f"{cluster}.{ad.get('ProcId')}"):
            if job_id in wanted and job_id not in out:
                out[job_id] = job_status(ad)
