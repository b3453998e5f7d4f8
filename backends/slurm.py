"""Slurm: sbatch to submit, scancel to cancel, one squeue (and at most one sacct) per poll.

The submission script is rendered from ``templates/slurm.sh.j2`` (or the
admin's ``backend.slurm.template``), written to ``<task_dir>/slurm.sh`` and
given to ``sbatch --parsable`` on standard input, so the same path works over
SSH (``backend.slurm.ssh.host``) with a work dir shared with the login node.

A poll lists this user's jobs with one ``squeue --me -t all`` (not ``-j``: the
argv would grow with the number of jobs); with ``submit_as_owner`` the jobs belong
to many users, and the poll names them instead (``squeue -j ID,ID,...``; a lone id
Slurm forgot is an error there, read as "no such job") rather than list every
user's jobs on the cluster; ``recover`` then asks for the owner's jobs only (``-u
OWNER``) and binds a job only if its user is the owner, and every owner passes the owner
policy (backends/owners.py) before ``sudo``. Jobs that already left slurmctld's memory
(MinJobAge) are looked up with one ``sacct`` call when accounting is enabled (probed once). A
job neither knows is LOST: the reconciler then trusts the worker's event log,
and fails the task if that log has no end either. So a poll costs one scheduler
command, two when some jobs are gone and accounting is on.

With ``array_max`` > 1 the tasks of one tick whose script header is the same go as one
``sbatch --array`` job (``templates/slurm-array.sh.j2``; backends/slurm_arrays.py): its
elements are ``<job>_<index>`` ids like any other, listed one a line by the same one
``squeue -r``, canceled one by one (``scancel 123_4``), and found again by ``recover``
through the gateway's task list and the array's name (backends/arrays.py).

``JobStatus.reason`` carries what Slurm said, e.g.
``squeue: FAILED exit=3:0 reason=NonZeroExitCode``.
"""

from __future__ import annotations

import logging
import pwd
from collections.abc import Callable
from pathlib import Path

from funnel_hpc.backends import arrays, files
from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.commands import Result, Runner, failure, make_runner
from funnel_hpc.backends.owners import UNIX_USER, OwnerPolicy, OwnerRefused
from funnel_hpc.backends.slurm_arrays import (
    ELEMENT_ID,
    JOB_ID,
    KEY_SIZE,
    ListIndex,
    ListSweep,
    array_variables,
    element_ids,
    element_words,
    expand,
    key_of,
)
from funnel_hpc.backends.templating import render, script_variables
from funnel_hpc.core.config import ConfigError, SlurmOptions

log = logging.getLogger(__name__)

# Slurm job states (squeue %T, sacct State) -> common job states
STATE_MAP: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.RUNNING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "TIMEOUT": JobState.FAILED,
    "NODE_FAIL": JobState.NODE_FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "BOOT_FAIL": JobState.NODE_FAILED,  # the node never came up: not the task's doing
    "DEADLINE": JobState.FAILED,
    "SPECIAL_EXIT": JobState.FAILED,
    # PREEMPTED with PreemptMode=CANCEL; with REQUEUE the job shows PENDING/REQUEUED
    # again and Slurm itself runs it anew (the worker's second run appends to its log)
    "PREEMPTED": JobState.PREEMPTED,
    "REVOKED": JobState.CANCELLED,
    "CANCELLED": JobState.CANCELLED,
}


# Pending reasons (squeue %r) of a job that will never start as submitted: the poll
# reports it UNRUNNABLE with the reason, and the reconciler cancels it (SYSTEM_ERROR).
# ReqNodeNotAvail and Resources are left out: nodes come back, jobs end.
UNRUNNABLE_REASONS = frozenset({
    "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
    "InvalidAccount", "InvalidQOS", "QOSMaxCpuPerJobLimit", "QOSMaxMemoryPerJob",
    "QOSMaxNodePerJobLimit", "QOSMaxWallDurationPerJobLimit", "AssocMaxCpuPerJobLimit",
    "AssocMaxNodesPerJobLimit", "AssocMaxWallDurationPerJobLimit", "DependencyNeverSatisfied",
    "JobHeldAdmin", "PartitionDown", "PartitionInactive",
})

# what Slurm's client commands print when slurmctld cannot be reached
UNREACHABLE = ("Unable to contact slurm controller", "Socket timed out",
               "Connection refused", "Zero Bytes were transmitted",
               "Communication connection failure")

SCRIPT_FILE = "slurm.sh"  # in the task dir, read by sbatch from standard input
WITHDRAW_COMMENT = "funnel-withdraw"  # set on an element being withdrawn (see withdraw)
# the shipped templates: a site's own `template` with the shipped array template turns
# arrays off (the site's edits would be missing from the arrays' scripts)
SHIPPED_TEMPLATE = "slurm.sh.j2"
SHIPPED_ARRAY_TEMPLATE = "slurm-array.sh.j2"

# squeue -j with one id slurmctld no longer knows (with several, it lists the known ones)
FORGOTTEN_ID = "Invalid job id specified"


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _id_order(job_id: str) -> tuple[int, int]:
    """123 before 123_0 before 123_10."""
    match = ELEMENT_ID.fullmatch(job_id)
    return (int(match.group(1)), int(match.group(2)) + 1) if match else (int(job_id), 0)


def _array_max(options: SlurmOptions, name: str) -> int:
    """backend.slurm.array_max, checked; 1 while a site's own template meets the shipped
    array template (its edits would be missing from arrays)."""
    if not 1 <= options.array_max <= 100_000:
        raise ConfigError(f"backend.slurm.array_max: expected 1 to 100000, "
                          f"got {options.array_max}")
    if options.array_max > 1 and options.template != SHIPPED_TEMPLATE \
            and options.array_template == SHIPPED_ARRAY_TEMPLATE:
        log.warning("%s: job arrays off: backend.slurm.template is the site's own (%s) and "
                    "array_template the shipped one; set array_template to turn them on",
                    name, options.template)
        return 1
    return options.array_max


def parse_job_id(text: str) -> str:
    """`sbatch --parsable` prints `jobid` or `jobid;cluster`."""
    job_id = text.strip().splitlines()[-1].split(";")[0].strip() if text.strip() else ""
    if not job_id.isdigit():
        raise BackendError(f"sbatch printed no job id: {text.strip()[:200]!r}")
    return job_id


def exit_code(raw: str) -> str:
    """squeue's exit_code is a wait status (768 = exit 3); show it as sacct does: code:signal."""
    try:
        status = int(raw)
    except ValueError:
        return raw
    return f"{status >> 8}:{status & 0x7F}"


def map_state(raw: str, reason: str = "") -> JobState:
    # sacct shows e.g. "CANCELLED by 0"
    state = STATE_MAP.get(raw.split()[0] if raw else "", JobState.UNKNOWN)
    if state is JobState.PENDING and reason.split(",")[0].strip() in UNRUNNABLE_REASONS:
        return JobState.UNRUNNABLE
    return state


class SlurmBackend(Backend):
    kind = "slurm"
    job_output_files = ("slurm.out", "slurm.err")  # the shipped template's output/error
    parallel_submit = True  # each submit is its own sbatch (over SSH: one at a time)

    options: SlurmOptions

    def __init__(self, options: SlurmOptions, work_dir: Path,
                 on_change: Callable[[], None] | None = None, name: str | None = None):
        super().__init__(options, work_dir, on_change, name)
        self.runner: Runner = make_runner(options.ssh, options.command_timeout)
        self.template = options.template
        self._accounting: bool | None = None
        self.as_owner = options.submit_as_owner
        self.owners = OwnerPolicy.from_options(options) if self.as_owner else None
        self.array_template = options.array_template
        self.array_max = _array_max(options, self.name)
        self.sweep = ListSweep(self.runner, work_dir, mine=not self.as_owner)
        self.lists = ListIndex(work_dir)

    # ---- submit / cancel ----

    def render_script(self, request: SubmitRequest) -> str:
        return render(self.template, script_variables(request, self.options))

    def _as_owner(self, request: SubmitRequest) -> list[str]:
        """`sudo -n -u OWNER --` when jobs are submitted as their owners, else nothing.
        The owner policy is asked again (an account may have changed since the POST)."""
        if self.owners is None:
            return []
        try:
            account = self.owners.account(request.owner)
        except OwnerRefused as exc:
            raise BackendError(f"cannot submit as owner: {exc}") from None
        try:  # the worker runs as the owner: its task dir must be the owner's
            files.give_to(request.task_dir, account.pw_uid, account.pw_gid,
                          (*request.gateway_files, SCRIPT_FILE))
        except OSError as exc:
            raise BackendError(f"cannot hand the task dir to {account.pw_name!r}: {exc}") from None
        return ["sudo", "-n", "-u", account.pw_name, "--"]

    def job_uid(self, owner: str | None) -> int | None:
        """With submit_as_owner the job (and its files) is the owner's."""
        if not self.as_owner:
            return super().job_uid(owner)
        if not owner or not UNIX_USER.fullmatch(owner):
            return None
        try:
            return pwd.getpwnam(owner).pw_uid
        except KeyError:
            return None

    def submit(self, request: SubmitRequest) -> str:
        try:
            script = self.render_script(request)
        except ValueError as exc:
            raise BackendError(f"cannot render the Slurm script: {exc}") from None
        files.write_private(request.task_dir, SCRIPT_FILE, script)
        prefix = self._as_owner(request)
        result = self.runner.run([*prefix, "sbatch", "--parsable"], input=script)
        if result.returncode != 0:
            raise failure("sbatch", result, UNREACHABLE)
        return parse_job_id(result.stdout)

    # ---- arrays ----

    def render_array_script(self, requests: list[SubmitRequest],
                            task_list: arrays.TaskList) -> str:
        """The script of one array job for these tasks (the first one's header: they
        share an array_key), element i running the task on line i of task_list."""
        first = requests[0]
        return render(self.array_template,
                      array_variables(script_variables(first, self.options), first,
                                      self.work_dir, task_list, len(requests)))

    def array_key(self, request: SubmitRequest) -> str | None:
        """The array script this task would share (rendered with placeholders for the
        list and size), and with submit_as_owner its owner."""
        if self.array_max <= 1:
            return None
        try:
            script = render(self.array_template,
                            array_variables(script_variables(request, self.options), request,
                                            self.work_dir, None, KEY_SIZE))
        except ValueError as exc:
            raise BackendError(f"cannot render the Slurm array script: {exc}") from None
        return key_of(script, request.owner if self.as_owner else None)

    def submit_array(self, requests: list[SubmitRequest]) -> list[str]:
        first = requests[0]
        words = element_words(first)
        for request in requests[1:]:
            if request.task_dir != Path(self.work_dir) / request.task_id:
                raise BackendError(f"task {request.task_id}: its dir {request.task_dir} is "
                                   f"not <work_dir>/<id>, where array elements look")
            if element_words(request) != words or \
                    (self.as_owner and request.owner != first.owner):
                raise BackendError(f"task {request.task_id} cannot share an array with "
                                   f"task {first.task_id}: another worker command or owner")
        prefix: list[str] = []
        for request in requests:  # each task dir handed to the owner, as for one job
            prefix = self._as_owner(request)
        try:
            task_list = arrays.write(self.work_dir, [r.task_id for r in requests],
                                     shared=self.as_owner)
            self.lists.add(task_list)
            script = self.render_array_script(requests, task_list)
        except ValueError as exc:
            raise BackendError(f"cannot render the Slurm array script: {exc}") from None
        # the list stays when sbatch fails: a timed-out sbatch may have submitted it
        result = self.runner.run([*prefix, "sbatch", "--parsable"], input=script)
        if result.returncode != 0:
            raise failure("sbatch --array", result, UNREACHABLE)
        return element_ids(parse_job_id(result.stdout), len(requests))

    def cancel(self, job_id: str) -> None:
        result = self.runner.run(["scancel", str(job_id)])
        if result.returncode != 0 and "already completing or completed" not in result.stderr \
                and "Invalid job id" not in result.stderr:
            raise failure(f"scancel {job_id}", result, UNREACHABLE)

    def withdraw(self, job_id: str) -> None:
        """scancel --state=PENDING: slurmctld cancels the job only while it waits. An
        element first gets its own record (scontrol update of its Comment): measured on
        Slurm 22.05, `scancel --state=PENDING 123_4` while elements 0-9 still wait as one
        record cancels all ten."""
        if ELEMENT_ID.fullmatch(str(job_id)):
            split = self.runner.run(["scontrol", "update", f"JobId={job_id}",
                                     f"Comment={WITHDRAW_COMMENT}"])
            said = split.stderr + split.stdout
            if split.returncode != 0:
                if any(words in said for words in ("Invalid job id", "already completing",
                                                   "already finished")):
                    return  # gone or ended: nothing waits to withdraw
                raise failure(f"scontrol update JobId={job_id}", split, UNREACHABLE)
        result = self.runner.run(["scancel", "--state=PENDING", str(job_id)])
        if result.returncode != 0 and "already completing or completed" not in result.stderr \
                and "Invalid job id" not in result.stderr:
            raise failure(f"scancel --state=PENDING {job_id}", result, UNREACHABLE)

    def recover(self, task_id: str, task_dir: Path, owner: str | None = None) -> str | None:
        """The task's element of the newest array named after the gateway's newest list
        holding it (backends/arrays.py, read once for many recovers), else the newest
        job named funnel-<task id>, that squeue still lists: among this account's jobs
        (--me), or with submit_as_owner among the task owner's (-u OWNER), each line's
        user checked again: another user's job of that name is never taken."""
        user = owner if self.as_owner else None
        if self.as_owner and not (owner and UNIX_USER.fullmatch(owner) and _exists(owner)):
            # no such account, no job of theirs (squeue -u would fail every tick); the
            # submission made next is refused
            return None
        listed = self.lists.find(task_id)
        if listed is not None:
            task_list, index = listed
            job = self._newest_job(task_list.job_name, user)
            if job is not None:
                return f"{job}_{index}"
        return self._newest_job(f"funnel-{task_id}", user)

    def _newest_job(self, job_name: str, user: str | None) -> str | None:
        """The newest job (an array's job id) of that name squeue lists for us or user."""
        whose = ["-u", user] if user else ["--me"]
        result = self.runner.run(["squeue", "-h", *whose, "-t", "all", "-n", job_name,
                                  "-o", "%F|%u"])
        if result.returncode != 0:  # not "no such job": we could not ask
            error = failure("squeue", result, UNREACHABLE)
            error.transient = True
            raise error
        ids = []
        for line in result.stdout.splitlines():
            job_id, _, job_user = (part.strip() for part in line.partition("|"))
            if job_id.isdigit() and (user is None or job_user == user):
                ids.append(job_id)
        return max(ids, key=int) if ids else None

    # ---- poll ----

    def _squeue(self, wanted: set[str]) -> Result:
        """One squeue over this account's jobs, or over the wanted ids when jobs run as
        their owners (not every user's jobs on the cluster)."""
        # -r: one array element a line (pending ranges too), JobArrayID 123_4 or 125
        columns = ["-r", "-O", "JobArrayID:|,State:|,exit_code:|,Reason:"]
        if not self.as_owner:
            return self.runner.run(["squeue", "-h", "--me", "-t", "all", *columns])
        ids = sorted((j for j in wanted if JOB_ID.fullmatch(j)), key=_id_order)
        if not ids:
            return Result(0, "", "")
        result = self.runner.run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), *columns])
        if result.returncode != 0 and len(ids) == 1 and FORGOTTEN_ID in result.stderr:
            return Result(0, "", "")  # the one job is gone: LOST or in sacct, below
        return result

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        wanted = {str(j) for j in job_ids}
        if not wanted:
            return {}
        result = self._squeue(wanted)
        if result.returncode != 0:
            reason = (f"squeue failed ({result.returncode}): "
                      f"{(result.stderr or result.stdout).strip()[:300]}")
            return {j: JobStatus(JobState.UNKNOWN, reason) for j in wanted}
        found: dict[str, JobStatus] = {}
        for line in result.stdout.splitlines():
            parts = [p.strip() for p in line.split("|", 3)]
            if len(parts) == 4 and parts[0] in wanted:
                job_id, state, code, reason = parts
                found[job_id] = JobStatus(map_state(state, reason), f"squeue: {state} "
                                          f"exit={exit_code(code)} reason={reason}")
        if self.sweep.due():  # old task lists whose arrays are gone (once an hour)
            self.sweep.run()
        missing = sorted(wanted - set(found))
        if missing and self.accounting_enabled():
            found.update(self._sacct(missing))
        where = "not in squeue, not in sacct" if self._accounting else \
            "not in squeue; no accounting"
        for job_id in wanted - set(found):
            found[job_id] = JobStatus(JobState.LOST, f"Slurm no longer knows this job ({where})")
        return found

    def accounting_enabled(self) -> bool:
        """Does sacct answer here? Probed once; an unclear answer is asked again later."""
        if self._accounting is None:
            probe = self.runner.run(["sacct", "-n", "-X", "-P", "-o", "JobID", "-j", "1"])
            text = probe.stderr + probe.stdout
            if "disabled" in text or probe.returncode == 127:
                self._accounting = False
            elif probe.returncode == 0:
                self._accounting = True
            else:
                return False
        return self._accounting

    def _sacct(self, job_ids: list[str]) -> dict[str, JobStatus]:
        result = self.runner.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State,ExitCode,Reason",
                                  "-j", ",".join(job_ids)])
        if result.returncode != 0:
            # not LOST: that would fail the tasks; ask again next poll
            reason = f"sacct failed: {(result.stderr or result.stdout).strip()[:300]}"
            return {j: JobStatus(JobState.UNKNOWN, reason) for j in job_ids}
        out: dict[str, JobStatus] = {}
        asked = set(job_ids)
        for line in result.stdout.splitlines():
            parts = line.split("|", 3)
            if len(parts) < 3:
                continue
            status = JobStatus(map_state(parts[1]), f"sacct: {parts[1]} exit={parts[2]} "
                                                    f"reason={parts[3] if len(parts) > 3 else ''}")
            for job_id in expand(parts[0]):  # a pending range: each of its elements
                if job_id in asked:
                    out[job_id] = status
        return out

    def close(self) -> None:
        self.runner.close()
