"""PBS (OpenPBS, PBS Professional): qsub to submit, qdel to cancel, one qstat per poll.

Submit: the script rendered from ``templates/pbs.sh.j2`` (or ``backend.pbs.template``)
is written to ``<task_dir>/pbs.sh`` and given to ``qsub <path>``; its ``#PBS`` lines carry
every job option (name ``funnel-<task id>``, output and error in the task dir,
``-l select=1:ncpus=N:mem=Mmb``, walltime, ``-q`` from the first zone or
``backend.pbs.queue``, ``-A`` of the site, allow-listed backend_parameters). The job id
is qsub's line, ``123.server``. ``job_header`` gives the ``#PBS`` lines of a rendered
script.

Arrays (``array_max`` > 1): 2 to array_max tasks whose scripts would be identical but for
the task go as ONE ``qsub -J 0-(N-1)`` (qsub prints ``123[].server``); subjob ids are
``123[i].server``, subjob i runs line i of the gateway's task list (backends/arrays.py,
array_script.py). Poll adds ``-t`` and each array's ``123[].server`` to its one qstat
(the subjobs come with their array); ``qdel 123[i].server`` stops one subjob; recover
asks ``qselect -J`` for the array named after the task's list.

Poll: ONE ``qstat -f -F json -x ID...`` (``-x``: finished jobs too, PBS Pro 13+ /
OpenPBS 20+; more than ``max_ids_per_qstat`` ids: one call per that many), read by
``pbs_qstat.py``. An id qstat answers "Unknown Job Id" for (the server's job history has
let it go) is LOST and the worker's event log decides; a qstat that failed otherwise
makes its jobs UNKNOWN. ``recover`` asks ``qselect -x -u <us> -N funnel-<task id>`` (and
``-J`` for an array's name).
Errors follow ``commands.failure`` (the server unreachable is transient, a missing
command or a refused job is not). No command sees a task value: argv lists only.

Config (``backend.pbs``): template, queue, walltime, backend_parameters (TES key -> qsub
option), site, command_timeout, max_ids_per_qstat, array_max.
"""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from funnel_hpc.backends import arrays, files
from funnel_hpc.backends.array_script import key_or_alone, render_one_script
from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.commands import Runner, failure, make_runner
from funnel_hpc.backends.pbs_qstat import job_status, parse_qstat_json, sequence, unknown_ids
from funnel_hpc.backends.templating import render, script_variables
from funnel_hpc.core.config import PbsOptions

SCRIPT_NAME = "pbs.sh"
DIRECTIVE = "#PBS"
# what PBS's commands print when the server cannot be reached
UNREACHABLE = ("cannot connect to server", "Connection refused", "Connection timed out",
               "No server to connect to", "Communication failure", "Server shutting down",
               "pbs_iff")
# what qdel prints for a job that is already gone: not an error for an idempotent cancel
ALREADY_GONE = ("Unknown Job Id", "Job has finished")
# a job id as qsub prints it: sequence number, optional array brackets, optional server
JOB_ID = re.compile(r"[0-9]+(\[[0-9]*\])?(\.[A-Za-z0-9][A-Za-z0-9_.-]*)?")
# a subjob id: the array's sequence number, the index, the server
SUBJOB_ID = re.compile(r"([0-9]+)\[([0-9]+)\](\.[A-Za-z0-9][A-Za-z0-9_.-]*)?")
# the subjob's index in the task list: PBS's own, from 0 (-J 0-(N-1))
ARRAY_INDEX = "PBS_ARRAY_INDEX"
# -l walltime: [[HH:]MM:]SS
WALLTIME = re.compile(r"([0-9]+:){0,2}[0-9]+")


def job_header(script: str) -> list[str]:
    """The `#PBS` option lines of a rendered script, in order."""
    return [line for line in script.splitlines() if line.startswith(DIRECTIVE)]


def parse_job_id(text: str) -> str:
    """qsub prints the new job's id (`123.server`) on its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    job_id = lines[-1] if lines else ""
    if not JOB_ID.fullmatch(job_id):
        raise BackendError(f"qsub printed no job id: {text.strip()[:200]!r}")
    return job_id


def array_of(job_id: str) -> str | None:
    """The array job id of a subjob id ("123[].server" of "123[4].server"), else None."""
    match = SUBJOB_ID.fullmatch(job_id)
    return f"{match.group(1)}[]{match.group(3) or ''}" if match else None


def _number(job_id: str) -> int:
    """A job's sequence number ("123" of "123[4].server"), to find the newest."""
    digits = re.match(r"[0-9]*", job_id)
    return int(digits.group()) if digits and digits.group() else 0


def _own_user() -> str | None:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None


class PbsBackend(Backend):
    kind = "pbs"
    job_output_files = ("pbs.out", "pbs.err")  # the shipped template's -o / -e
    parallel_submit = True  # each submit is its own qsub

    options: PbsOptions

    def __init__(self, options: PbsOptions, work_dir: Path,
                 on_change: Callable[[], None] | None = None, name: str | None = None):
        super().__init__(options, work_dir, on_change, name)
        self.lists = arrays.ListIndex(work_dir)  # recover's: which list holds a task
        if options.walltime and not WALLTIME.fullmatch(options.walltime):
            raise ValueError(f"backend.pbs.walltime must be [[HH:]MM:]SS, "
                             f"not {options.walltime!r}")
        if options.max_ids_per_qstat < 1:
            raise ValueError("backend.pbs.max_ids_per_qstat must be at least 1")
        if options.array_max < 1:
            raise ValueError(f"backend.pbs.array_max must be at least 1, not {options.array_max}")
        self.array_max = options.array_max
        self.template = options.template
        self.runner: Runner = make_runner(None, options.command_timeout)

    # ---- submit / cancel ----

    def script_variables(self, request: SubmitRequest) -> dict[str, Any]:
        return {**script_variables(request, self.options), "walltime": self.options.walltime,
                "array": None}

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

    def submit_array(self, requests: list[SubmitRequest]) -> list[str]:
        """One `qsub -J 0-(N-1)` of these tasks (N >= 2): subjob i runs requests[i]."""
        if len(requests) < 2:
            raise BackendError("a PBS job array has 2 subjobs or more (one goes alone)")
        try:
            listed = arrays.write(self.work_dir, [r.task_id for r in requests])
            self.lists.add(listed)
            script = self.render_array(requests, listed.path)
            # qsub copies the script when it submits: removed once it has
            path = files.write_private(arrays.directory(self.work_dir), f"{listed.name}.sh",
                                       script, mode=0o700)
        except (ValueError, OSError) as exc:
            raise BackendError(f"cannot make the PBS array script: {exc}") from None
        try:
            result = self.runner.run(["qsub", "-J", f"0-{len(requests) - 1}", str(path)])
        finally:
            path.unlink(missing_ok=True)
        if result.returncode != 0:
            raise failure("qsub", result, UNREACHABLE)
        array_id = parse_job_id(result.stdout)
        match = re.fullmatch(r"([0-9]+)\[\](.*)", array_id)
        if match is None:
            raise BackendError(f"qsub -J printed {array_id!r}, not an array job id")
        return [f"{match.group(1)}[{index}]{match.group(2)}" for index in range(len(requests))]

    def submit(self, request: SubmitRequest) -> str:
        try:
            script = self.render_script(request)
        except ValueError as exc:
            raise BackendError(f"cannot render the PBS script: {exc}") from None
        # the owner's to run, nobody else's to read (no symlink followed: files.py)
        path = files.write_private(request.task_dir, SCRIPT_NAME, script, mode=0o700)
        result = self.runner.run(["qsub", str(path)])
        if result.returncode != 0:
            raise failure("qsub", result, UNREACHABLE)
        return parse_job_id(result.stdout)

    def cancel(self, job_id: str) -> None:
        job_id = str(job_id)
        if not JOB_ID.fullmatch(job_id):
            return  # not a PBS job id: nothing qdel could delete
        result = self.runner.run(["qdel", job_id])
        if result.returncode != 0 and \
                not any(words in result.stderr + result.stdout for words in ALREADY_GONE):
            raise failure(f"qdel {job_id}", result, UNREACHABLE)

    # ---- poll ----

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        wanted = [str(j) for j in dict.fromkeys(job_ids)]
        out = {j: JobStatus(JobState.LOST, "not a PBS job id")
               for j in wanted if not JOB_ID.fullmatch(j)}
        ask = [j for j in wanted if j not in out]
        size = self.options.max_ids_per_qstat
        for start in range(0, len(ask), size):
            out.update(self._qstat(ask[start:start + size]))
        return out

    def _qstat(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """One `qstat -f -F json -x` for job_ids (subjobs: -t and their arrays' ids, which
        list every subjob); never raises."""
        parents = list(dict.fromkeys(p for p in map(array_of, job_ids) if p is not None))
        asked = [j for j in job_ids if array_of(j) is None] + parents
        subjobs = ["-t"] if parents else []
        result = self.runner.run(["qstat", "-f", "-F", "json", "-x", *subjobs, *asked])
        try:
            jobs = parse_qstat_json(result.stdout)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep JSON
            if result.returncode == 0:
                reason = f"qstat printed unreadable JSON: {exc}"
                return {j: JobStatus(JobState.UNKNOWN, reason) for j in job_ids}
            jobs = {}
        by_sequence = {sequence(key): key for key in jobs}
        forgotten = {sequence(j) for j in unknown_ids(result.stderr)}
        failed = str(failure("qstat", result, UNREACHABLE)) if result.returncode else ""
        out: dict[str, JobStatus] = {}
        for job_id in job_ids:
            # the server may print another form of its name than qsub did: the sequence
            # number identifies a job on one server
            key = job_id if job_id in jobs else by_sequence.get(sequence(job_id))
            if key is not None:
                out[job_id] = job_status(jobs[key])
            elif sequence(job_id) in forgotten or not failed or \
                    sequence(array_of(job_id) or job_id) in forgotten:
                out[job_id] = JobStatus(JobState.LOST, "qstat: Unknown Job Id (the server's "
                                                       "job history no longer has it)")
            else:
                out[job_id] = JobStatus(JobState.UNKNOWN, failed)
        return out

    # ---- recover ----

    def recover(self, task_id: str, task_dir: Path,
                owner: str | None = None) -> str | None:
        """The newest of our jobs named funnel-<task id>, queued, running or finished
        (qselect -x), or the task's subjob of our newest array named after the task list
        holding it (qselect -x -J). A qselect that failed raises (transient): the job may
        exist."""
        found = self._select(["-N", f"funnel-{task_id}"])
        listed = self.lists.find(task_id)
        if listed is not None:
            found += [f"{m.group(1)}[{listed[1]}]{m.group(2)}"
                      for m in (re.fullmatch(r"([0-9]+)\[\](.*)", j)
                                for j in self._select(["-J", "-N", listed[0].job_name]))
                      if m is not None]
        if not found:
            return None
        return max(found, key=_number)

    def _select(self, criteria: list[str]) -> list[str]:
        """The ids `qselect -x -u <us> <criteria>` prints; raises BackendError(transient)."""
        user = _own_user()
        whose = ["-u", user] if user else []
        result = self.runner.run(["qselect", "-x", *whose, *criteria])
        if result.returncode != 0:
            error = failure("qselect", result, UNREACHABLE)
            error.transient = True
            raise error
        return [line.strip() for line in result.stdout.splitlines()
                if JOB_ID.fullmatch(line.strip())]

    def close(self) -> None:
        self.runner.close()
