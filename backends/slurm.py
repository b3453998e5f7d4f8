"""Slurm: sbatch to submit, scancel to cancel, one squeue (and at most one sacct) per poll;
or the same through slurmrestd, one HTTP request per poll and no process (mode rest).

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

``backend.slurm.mode`` picks how those questions reach slurmctld (backends/slurm_link.py):
``CliLink`` runs the commands above, ``RestLink`` asks slurmrestd (backends/slurm_rest.py):
the same scripts (their #SBATCH header mapped to job properties), the same ids and rows,
ONE GET of the jobs list per poll, no sacct (a job gone from the list is LOST), and no
fork but, with ``submit_as_owner`` (over ``rest_auth/jwt`` only), one ``scontrol token``
per owner every 15 minutes (backends/slurm_rest_tokens.py): each owner's jobs are
submitted with the owner's token. What this module decides (scripts, arrays, states,
recover) is the same for both.

``JobStatus.reason`` carries what Slurm said, e.g.
``squeue: FAILED exit=3:0 reason=NonZeroExitCode`` (``slurmrestd: ...`` in REST mode).
"""

from __future__ import annotations

import logging
import pwd
from collections.abc import Callable
from pathlib import Path

from funnel_hpc.backends import arrays, files
from funnel_hpc.backends.array_script import check_same_command
from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.commands import Runner, make_runner
from funnel_hpc.backends.owners import UNIX_USER, OwnerPolicy, OwnerRefused
from funnel_hpc.backends.slurm_arrays import (
    KEY_SIZE,
    ListSweep,
    array_variables,
    element_ids,
    key_of,
)
from funnel_hpc.backends.slurm_link import (
    UNREACHABLE,
    CliLink,
    RestLink,
    SlurmLink,
    parse_job_id,
)
from funnel_hpc.backends.slurm_rest import SlurmRestClient
from funnel_hpc.backends.slurm_rest_jobs import JobRow, wait_status
from funnel_hpc.backends.slurm_rest_tokens import OwnerTokens
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

# the pending reason of a job requeued held after slurmd failed to launch it (a node
# too busy to confirm the launch, a prolog that failed)
LAUNCH_FAILED_HELD = "launch failed requeued held"
SCRIPT_FILE = "slurm.sh"  # in the task dir, read by sbatch from standard input
# the shipped templates: a site's own `template` with the shipped array template turns
# arrays off (the site's edits would be missing from the arrays' scripts)
SHIPPED_TEMPLATE = "slurm.sh.j2"
SHIPPED_ARRAY_TEMPLATE = "slurm-array.sh.j2"


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


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


# squeue's exit_code is a wait status (768 = exit 3), shown as sacct does: code:signal
exit_code = wait_status
__all__ = ["STATE_MAP", "UNREACHABLE", "SlurmBackend", "exit_code", "map_state",
           "parse_job_id"]


def map_state(raw: str, reason: str = "") -> JobState:
    # sacct shows e.g. "CANCELLED by 0"
    state = STATE_MAP.get(raw.split()[0] if raw else "", JobState.UNKNOWN)
    if state is JobState.PENDING:
        if reason.split(",")[0].strip() in UNRUNNABLE_REASONS:
            return JobState.UNRUNNABLE
        if reason.strip().lower() == LAUNCH_FAILED_HELD:
            # slurmd could not start it and slurmctld requeued it held: it waits for an
            # admin forever; ended as its node's failure (canceled, retried on node_fail)
            return JobState.NODE_FAILED
    return state


class SlurmBackend(Backend):
    kind = "slurm"
    job_output_files = ("slurm.out", "slurm.err")  # the shipped template's output/error

    options: SlurmOptions

    def __init__(self, options: SlurmOptions, work_dir: Path,
                 on_change: Callable[[], None] | None = None, name: str | None = None):
        super().__init__(options, work_dir, on_change, name)
        self.template = options.template
        self.as_owner = options.submit_as_owner
        self.owners = OwnerPolicy.from_options(options) if self.as_owner else None
        self.array_template = options.array_template
        self.array_max = _array_max(options, self.name)
        runner = make_runner(options.ssh, options.command_timeout)
        # how slurmctld is asked (core/config.py refused ssh with rest, and
        # submit_as_owner with rest over a unix socket)
        self.link: SlurmLink
        if options.mode == "rest":
            tokens = OwnerTokens(runner) if self.as_owner else None
            self.link = RestLink(SlurmRestClient.from_options(options.rest, tokens), runner)
        else:
            self.link = CliLink(runner, self.as_owner)
        # each sbatch is its own process (over SSH: one at a time); slurmrestd's one
        # connection takes one request at a time, so REST mode submits from one thread
        self.parallel_submit = options.mode != "rest"
        self.sweep = ListSweep(lambda names: self.link.live_names(names), work_dir)
        self.lists = arrays.ListIndex(work_dir)

    @property
    def runner(self) -> Runner:
        """The scheduler commands' runner (its `calls` count the forks: none in REST mode)."""
        return self.link.runner

    @runner.setter
    def runner(self, runner: Runner) -> None:  # tests give CLI mode canned command output
        self.link.runner = runner

    # ---- submit / cancel ----

    def render_script(self, request: SubmitRequest) -> str:
        return render(self.template, script_variables(request, self.options))

    def _as_owner(self, request: SubmitRequest) -> pwd.struct_passwd | None:
        """The account the job is submitted as when jobs are submitted as their owners
        (its task dir handed to it), else None. The owner policy is asked again (an
        account may have changed since the POST)."""
        if self.owners is None:
            return None
        try:
            account = self.owners.account(request.owner)
        except OwnerRefused as exc:
            raise BackendError(f"cannot submit as owner: {exc}") from None
        try:  # the worker runs as the owner: its task dir must be the owner's
            files.give_to(request.task_dir, account.pw_uid, account.pw_gid,
                          (*request.gateway_files, SCRIPT_FILE))
        except OSError as exc:
            raise BackendError(f"cannot hand the task dir to {account.pw_name!r}: {exc}") from None
        return account

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
        return self.link.submit(script, self._as_owner(request), "sbatch")

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
        check_same_command(requests, self.work_dir)  # each dir <work_dir>/<id>, one argv
        for request in requests[1:]:
            if self.as_owner and request.owner != first.owner:
                raise BackendError(f"task {request.task_id} cannot share an array with "
                                   f"task {first.task_id}: another owner")
        owner = None
        for request in requests:  # each task dir handed to the owner, as for one job
            owner = self._as_owner(request)
        try:
            task_list = arrays.write(self.work_dir, [r.task_id for r in requests],
                                     shared=self.as_owner)
            self.lists.add(task_list)
            script = self.render_array_script(requests, task_list)
        except ValueError as exc:
            raise BackendError(f"cannot render the Slurm array script: {exc}") from None
        # the list stays when sbatch fails: a timed-out sbatch may have submitted it
        job = self.link.submit(script, owner, "sbatch --array")
        return element_ids(job, len(requests))

    def cancel(self, job_id: str) -> None:
        self.link.cancel(str(job_id))

    def withdraw(self, job_id: str) -> None:
        """Cancel the job (one element: never its siblings) only while it waits
        (SlurmLink.withdraw: scancel --state=PENDING, or hold/read/cancel over REST)."""
        self.link.withdraw(str(job_id))

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
        """The newest job (an array's job id) of that name slurmctld lists for us or user."""
        ids = self.link.job_ids_named(job_name, user)
        return max(ids, key=int) if ids else None

    # ---- poll ----

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        wanted = {str(j) for j in job_ids}
        if not wanted:
            return {}
        try:
            rows = self.link.rows(wanted)
        except BackendError as exc:
            return {j: JobStatus(JobState.UNKNOWN, str(exc)) for j in wanted}
        found = _statuses(rows, wanted, self.link.source)
        if self.sweep.due():  # old task lists whose arrays are gone (once an hour)
            self.sweep.run()
        missing = sorted(wanted - set(found))
        where = "not listed"
        if missing:
            try:
                finished, where = self.link.finished(missing)
            except BackendError as exc:  # not LOST: that would fail the tasks; ask again
                return {**found, **{j: JobStatus(JobState.UNKNOWN, str(exc)) for j in missing}}
            found.update(_statuses(finished, set(missing), "sacct"))
        for job_id in wanted - set(found):
            found[job_id] = JobStatus(JobState.LOST, f"Slurm no longer knows this job ({where})")
        return found

    def accounting_enabled(self) -> bool:
        """Does sacct answer here? (CLI mode; REST mode has no accounting to ask)"""
        return isinstance(self.link, CliLink) and self.link.accounting_enabled()

    def close(self) -> None:
        self.link.close()


def _statuses(rows: list[JobRow], wanted: set[str], source: str) -> dict[str, JobStatus]:
    """The wanted jobs' statuses from a link's rows, the reason saying what Slurm said."""
    return {row.job_id: JobStatus(map_state(row.state, row.reason),
                                  f"{source}: {row.state} exit={row.exit_code} "
                                  f"reason={row.reason}")
            for row in rows if row.job_id in wanted}
