"""Grid Engine (SGE, Son of Grid Engine, OGS): DRMAA 1.0 (mode drmaa) or qsub/qstat/qdel (cli).

Submit: the script rendered from ``templates/gridengine.sh.j2`` (or
``backend.gridengine.template``) is written to ``<task_dir>/gridengine.sh`` and is the
job's command; its ``#$`` lines carry every job option (name ``funnel-<task id>``,
``-pe`` for cpus > 1, memory per slot, ``-q`` from the first zone, allow-listed
backend_parameters). Mode cli gives the script to ``qsub -terse`` (several at once);
mode drmaa joins the same lines into the native specification of ``runJob`` in the
one DRMAA helper process (``gridengine_drmaa.py``), so both modes submit the same job.

Poll, whatever the number of jobs: ONE ``qstat -xml -s prsz`` (cli,
``gridengine_qstat.py``) or ONE request to the helper (drmaa: ``jobStatus`` per job
in-process, ended jobs reaped with ``wait`` for their exit and remembered). A job that
ended without an exit status here (qstat zombie or no longer listed; unknown to the
DRMAA session, e.g. after a restart) is looked up in the accounting file
(``gridengine_accounting.py``, read incrementally, no command); not there (yet: qmaster
flushes it every 15 s by default) it is LOST and the worker's event log decides.

Arrays (``array_max`` > 1): tasks whose scripts would be identical but for the task go
as ONE array job, ``qsub -terse -t 1-N`` (the script on stdin) or DRMAA ``runBulkJobs``
(``-b n``: the script is spooled); element ids are ``JOB.IDX`` (1-based, as Grid Engine
numbers them), element IDX runs line IDX-1 of the gateway's task list
(backends/arrays.py, array_script.py). qstat's ranges of pending elements are expanded,
accounting records carry the element; ``qdel JOB -t IDX`` / DRMAA ``control("JOB.IDX")``
stop one element.

Cancel: DRMAA ``control(id, TERMINATE)`` / ``qdel id``; a job already gone is not an
error. ``recover`` looks the job up by name in ``qstat`` (a failed qstat raises: the job
may exist), then in the accounting file; in mode drmaa on a host without qstat, in
accounting only. A task sent in an array is found through its task list, its element
through the array job's name (``funnel-array-<list>``). Errors follow
``commands.failure`` (qmaster unreachable is transient, a missing command is not).

Config (``backend.gridengine``): mode, template, drmaa_library, sge_root, sge_cell,
queue, parallel_environment, memory_resource, backend_parameters (TES key -> qsub
option), site, command_timeout, static_tls, accounting_file, array_max.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from funnel_hpc.backends import arrays, files
from funnel_hpc.backends.array_script import key_or_alone, render_one_script
from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.commands import (
    COMMAND_NOT_FOUND,
    LocalRunner,
    Result,
    Runner,
    failure,
    job_environment,
)
from funnel_hpc.backends.gridengine_accounting import MAX_REMEMBERED, AccountingFile, job_order
from funnel_hpc.backends.gridengine_drmaa import DrmaaAgent
from funnel_hpc.backends.gridengine_qstat import (
    ZOMBIE,
    job_number,
    map_qstat_state,
    parse_qstat_xml,
)
from funnel_hpc.backends.templating import render, script_variables
from funnel_hpc.core.config import GridEngineOptions

DEFAULT_LIBRARY = "/usr/lib/gridengine-drmaa/lib/libdrmaa.so.1.0"

SCRIPT_NAME = "gridengine.sh"
# the element's index in the task list: Grid Engine numbers elements from 1 (-t 1-N)
ARRAY_INDEX = "SGE_TASK_ID - 1"
# what Grid Engine's commands print when qmaster cannot be reached
UNREACHABLE = ("commlib error", "unable to contact qmaster", "unable to send message to qmaster",
               "Connection refused")


def native_specification(script: str) -> str:
    """The `#$` option lines of a rendered script, as one DRMAA native specification."""
    return " ".join(line[2:].strip() for line in script.splitlines() if line.startswith("#$"))


# ---------------------------------------------------------------- the backend

class GridEngineBackend(Backend):
    kind = "gridengine"
    job_output_files = ("gridengine.out", "gridengine.err")  # the shipped template's output/error

    options: GridEngineOptions

    def __init__(self, options: GridEngineOptions, work_dir: Path,
                 on_change: Callable[[], None] | None = None, name: str | None = None):
        super().__init__(options, work_dir, on_change, name)
        self.lists = arrays.ListIndex(work_dir)  # recover's: which list holds a task
        self.mode = options.mode
        if self.mode not in ("drmaa", "cli"):
            raise ValueError(f"backend.gridengine.mode must be drmaa or cli, not {self.mode!r}")
        self.template = options.template
        timeout = options.command_timeout
        self.env = self._environment()
        self.runner: Runner = LocalRunner(timeout, env=self.env)
        self.agent = DrmaaAgent(self.env, timeout) if self.mode == "drmaa" else None
        # qsub processes are independent; the DRMAA helper answers one request at a time
        self.parallel_submit = self.mode == "cli"
        if options.array_max < 1:
            raise ValueError(f"backend.gridengine.array_max must be at least 1, "
                             f"not {options.array_max}")
        self.array_max = options.array_max
        self._finished: dict[str, JobStatus] = {}  # reaped by DRMAA, or cancelled in cli mode
        self.accounting = AccountingFile(Path(
            options.accounting_file
            or Path(self.env["SGE_ROOT"]) / self.env["SGE_CELL"] / "common" / "accounting"))

    def _environment(self) -> dict[str, str]:
        env = job_environment()  # without the gateway's FUNNEL_ configuration
        # empty sge_root / sge_cell: the gateway's environment's, else Grid Engine's own
        env["SGE_ROOT"] = self.options.sge_root or env.get("SGE_ROOT") or "/var/lib/gridengine"
        env["SGE_CELL"] = self.options.sge_cell or env.get("SGE_CELL") or "default"
        env["DRMAA_LIBRARY_PATH"] = self.options.drmaa_library or DEFAULT_LIBRARY
        static_tls = self.options.static_tls
        if static_tls and "GLIBC_TUNABLES" not in env:
            env["GLIBC_TUNABLES"] = f"glibc.rtld.optional_static_tls={static_tls}"
        return env

    # ---- commands (mode cli, recover) ----

    def _run(self, argv: list[str], input: str | None = None) -> Result:
        return self.runner.run(argv, input=input)

    def _drmaa(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request to the DRMAA helper (mode drmaa only)."""
        assert self.agent is not None, "only mode drmaa asks the DRMAA helper"
        return self.agent.call(request)

    # ---- submit / cancel ----

    def script_variables(self, request: SubmitRequest) -> dict[str, Any]:
        variables = script_variables(request, self.options)
        ram_mb, cpus = variables["ram_mb"], variables["cpus"]
        variables.update(
            parallel_environment=self.options.parallel_environment,
            memory_resource=self.options.memory_resource,
            mem_per_slot_mb=int(math.ceil(ram_mb / cpus)) if ram_mb else None,
            array=None,
        )
        return variables

    def render_script(self, request: SubmitRequest) -> str:
        return render(self.template, self.script_variables(request))

    def render_array(self, requests: list[SubmitRequest], list_path: Path) -> str:
        """The one script of an array of these requests (their first one's header)."""
        return render_one_script(self.template, self.script_variables(requests[0]), requests,
                                 list_path, ARRAY_INDEX, self.work_dir)

    def array_key(self, request: SubmitRequest) -> str | None:
        """The digest of the array script this task would share, or None (array_script
        .key_or_alone)."""
        if self.array_max <= 1:
            return None
        return key_or_alone(self.render_array, request, self.work_dir)

    def submit(self, request: SubmitRequest) -> str:
        try:
            script = self.render_script(request)
        except ValueError as exc:
            raise BackendError(f"cannot render the Grid Engine script: {exc}") from None
        # the owner's to run, nobody else's to read (no symlink followed: files.py)
        path = files.write_private(request.task_dir, SCRIPT_NAME, script, mode=0o700)
        if self.mode == "cli":
            result = self._run(["qsub", "-terse", str(path)])
            job_id = result.stdout.strip().split(".")[0]
            if result.returncode != 0 or not job_id.isdigit():
                raise failure("qsub", result, UNREACHABLE)
            return job_id
        reply = self._drmaa({"op": "submit", "command": str(path),
                             "workdir": str(request.task_dir),
                             "native": native_specification(script)})
        if not reply["ok"]:
            raise BackendError(f"DRMAA runJob failed: {reply['error'][:300]}",
                               transient=bool(reply.get("transient")))
        return str(reply["result"])

    def submit_array(self, requests: list[SubmitRequest]) -> list[str]:
        """One array job of these tasks: element i (1-based) runs requests[i-1]."""
        try:
            listed = arrays.write(self.work_dir, [r.task_id for r in requests])
            self.lists.add(listed)
            script = self.render_array(requests, listed.path)
        except (ValueError, OSError) as exc:
            raise BackendError(f"cannot make the Grid Engine array script: {exc}") from None
        count = len(requests)
        if self.mode == "cli":
            # qsub reads the script on stdin (and spools it): no file to clean up
            result = self._run(["qsub", "-terse", "-t", f"1-{count}"], input=script)
            number = result.stdout.strip().split(".")[0]
            if result.returncode != 0 or not number.isdigit():
                raise failure("qsub", result, UNREACHABLE)
            return [f"{number}.{index}" for index in range(1, count + 1)]
        # DRMAA runs a file: -b n has Grid Engine spool it, so it is removed at once
        body = "".join(line for line in script.splitlines(keepends=True)
                       if not line.startswith("#$"))
        path = files.write_private(arrays.directory(self.work_dir), f"{listed.name}.sh",
                                   body, mode=0o700)
        try:
            reply = self._drmaa({"op": "submit_array", "command": str(path),
                                 "workdir": str(self.work_dir), "count": count,
                                 "native": native_specification(script) + " -b n"})
        finally:
            path.unlink(missing_ok=True)
        if not reply["ok"]:
            raise BackendError(f"DRMAA runBulkJobs failed: {reply['error'][:300]}",
                               transient=bool(reply.get("transient")))
        ids = [str(i) for i in reply["result"]]
        if len(ids) != count:
            raise BackendError(f"DRMAA runBulkJobs returned {len(ids)} ids for {count} tasks")
        return ids

    def cancel(self, job_id: str) -> None:
        job_id = str(job_id)
        if job_id in self._finished:
            return
        if self.mode == "cli":
            number, _, element = job_id.partition(".")
            result = self._run(["qdel", number, "-t", element] if element else ["qdel", job_id])
            text = result.stderr + result.stdout
            if result.returncode == 0:
                self._remember(job_id, JobStatus(JobState.CANCELLED, "qdel by funnel-hpc"))
            elif "does not exist" not in text:
                raise failure(f"qdel {job_id}", result, UNREACHABLE)
            return
        reply = self._drmaa({"op": "cancel", "id": job_id})
        if not reply["ok"] and not reply.get("invalid_job"):
            raise BackendError(f"DRMAA control({job_id}, TERMINATE) failed: "
                               f"{reply['error'][:300]}", transient=bool(reply.get("transient")))

    def _remember(self, job_id: str, status: JobStatus) -> None:
        self._finished[job_id] = status
        while len(self._finished) > MAX_REMEMBERED:
            self._finished.pop(next(iter(self._finished)))

    # ---- poll ----

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        wanted = [str(j) for j in dict.fromkeys(job_ids)]
        out = {j: self._finished[j] for j in wanted if j in self._finished}
        ask = [j for j in wanted if j not in out]
        if not ask:
            return out
        if self.mode == "cli":
            out.update(self._poll_qstat(ask))
            return out
        try:
            reply = self._drmaa({"op": "status", "ids": ask})
        except BackendError as exc:
            return {**out, **{j: JobStatus(JobState.UNKNOWN, str(exc)) for j in ask}}
        if not reply["ok"]:
            reason = f"DRMAA status failed: {reply['error'][:300]}"
            return {**out, **{j: JobStatus(JobState.UNKNOWN, reason) for j in ask}}
        for job_id, answer in reply["result"].items():
            status = JobStatus(JobState(answer["state"]), answer["reason"])
            if answer.get("final"):
                self._remember(job_id, status)
            out[job_id] = status
        ended = [j for j in ask if out[j].state == JobState.LOST]
        out.update(self._accounted(ended, {j: out[j] for j in ended}))
        return out

    def _accounted(self, job_ids: list[str], otherwise: dict[str, JobStatus]
                   ) -> dict[str, JobStatus]:
        """Jobs that ended: their accounting record's status, else otherwise[job id]."""
        if not job_ids or not self.accounting.refresh():
            return otherwise
        out = {}
        for job_id in job_ids:
            record = self.accounting.by_id.get(job_id)
            if record is None:
                out[job_id] = otherwise[job_id]
                continue
            out[job_id] = record.status()
            self._remember(job_id, out[job_id])
        return out

    def _qstat(self) -> dict[str, tuple[str, str]] | Result:
        """This user's jobs (pending, running, suspended, recently finished) from one
        `qstat -xml -s prsz`, or the failed result."""
        result = self._run(["qstat", "-xml", "-s", "prsz"])
        if result.returncode != 0:
            return result
        try:
            return parse_qstat_xml(result.stdout)
        except ET.ParseError as exc:
            return Result(1, "", f"qstat printed unreadable XML: {exc}")

    def _poll_qstat(self, job_ids: list[str]) -> dict[str, JobStatus]:
        jobs = self._qstat()
        if isinstance(jobs, Result):
            reason = str(failure("qstat", jobs, UNREACHABLE))
            return {j: JobStatus(JobState.UNKNOWN, reason) for j in job_ids}
        out: dict[str, JobStatus] = {}
        ended: dict[str, JobStatus] = {}
        for job_id in job_ids:
            letters = jobs[job_id][0] if job_id in jobs else ""
            if letters == ZOMBIE:
                ended[job_id] = JobStatus(JobState.LOST, "qstat: finished (z), no accounting "
                                                         "record (yet)")
            elif job_id in jobs:
                out[job_id] = JobStatus(map_qstat_state(letters), f"qstat: {letters}")
            else:
                ended[job_id] = JobStatus(JobState.LOST, "qstat no longer lists this job "
                                                         "(Grid Engine forgets jobs that "
                                                         "ended) and accounting has no record")
        out.update(self._accounted(list(ended), ended))
        return out

    def recover(self, task_id: str, task_dir: Path,
                owner: str | None = None) -> str | None:
        """The newest job named funnel-<task id>, or the task's element of the newest array
        job named after the task list holding it (arrays.ListIndex): in qstat (zombies too),
        else in accounting. A qstat that failed raises (transient): the job may exist.
        Only in mode drmaa on a host without qstat is accounting the one place asked."""
        names: dict[str, int | None] = {f"funnel-{task_id}": None}  # name -> element
        listed = self.lists.find(task_id)
        if listed is not None:
            names[listed[0].job_name] = listed[1] + 1  # Grid Engine counts from 1
        jobs = self._qstat()
        if isinstance(jobs, Result):
            if not (self.mode == "drmaa" and jobs.returncode == COMMAND_NOT_FOUND):
                error = failure("qstat", jobs, UNREACHABLE)
                error.transient = True
                raise error
            jobs = {}
        accounted = self.accounting.refresh()
        found: list[str] = []
        for name, element in names.items():
            ids = [j for j, (_, job_name) in jobs.items() if job_name == name]
            if not ids and accounted:
                record = self.accounting.newest_named(name)
                ids = [record.job_id] if record is not None else []
            if ids:
                number = job_number(max(ids, key=job_order))
                found.append(number if element is None else f"{number}.{element}")
        return max(found, key=job_order) if found else None

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()


