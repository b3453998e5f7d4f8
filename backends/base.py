"""The one small interface every compute backend implements, and its contract.

A backend turns a prepared task into a scheduler job (``submit``), stops a job
(``cancel``), reports the state of many jobs with one scheduler query
(``poll``) and finds the job of a submission the gateway died in the middle of
(``recover``). Scheduler-specific states are mapped onto :class:`JobState` by a
table kept as data in each backend module.

When each method may raise (the reconciler relies on it):

- ``submit`` and ``cancel`` raise :class:`BackendError`; ``transient=True`` when the
  scheduler could not be reached (retried next tick), else the request itself is
  wrong (the submission fails the task, with the message in its system logs).
- ``poll`` never raises: a failed query is UNKNOWN with the scheduler's words.
- ``recover`` returns None only when the scheduler said it has no such job, and
  raises ``BackendError(transient=True)`` when it could not ask.

The error rule of the command-line backends is ``commands.failure``.
"""

from __future__ import annotations

import abc
import enum
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from funnel_hpc.backends.files import read_tail
from funnel_hpc.core.config import BackendOptions


class JobState(str, enum.Enum):  # noqa: UP042 - str() of a state stays as logged
    """Common job states, whatever the scheduler."""

    PENDING = "PENDING"      # accepted, waiting for resources
    RUNNING = "RUNNING"      # started on a node
    COMPLETED = "COMPLETED"  # ended, scheduler saw success
    FAILED = "FAILED"        # ended, scheduler saw failure (non-zero, node fail, timeout)
    CANCELLED = "CANCELLED"  # removed by a cancel (ours or someone else's)
    # ended because the scheduler took the resources back (Slurm PREEMPTED, HTCondor
    # eviction, AWS Batch spot reclaim): the task did nothing wrong; TES PREEMPTED, or
    # another attempt when reconciler.retry_on lists "preempted"
    PREEMPTED = "PREEMPTED"
    # ended because its node failed (Slurm NODE_FAIL, BOOT_FAIL): retried when
    # reconciler.retry_on lists "node_fail", else SYSTEM_ERROR
    NODE_FAILED = "NODE_FAILED"
    # waiting, but the scheduler says it can never start as submitted (Slurm pending
    # reasons such as PartitionConfig, BadConstraints): the reconciler cancels the job
    # and the task ends SYSTEM_ERROR with the reason. Not finished: the job still exists.
    UNRUNNABLE = "UNRUNNABLE"
    LOST = "LOST"            # the scheduler no longer knows the job
    UNKNOWN = "UNKNOWN"      # could not be determined this time (retry next tick)

    @property
    def finished(self) -> bool:
        return self in FINISHED_JOB_STATES


FINISHED_JOB_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.LOST,
     JobState.PREEMPTED, JobState.NODE_FAILED}
)


@dataclass
class JobStatus:
    state: JobState
    # What the scheduler said, verbatim enough for a system log
    # (e.g. "squeue: FAILED exit=1:0 reason=NonZeroExitCode").
    reason: str = ""


@dataclass
class SubmitRequest:
    """Everything a backend needs to submit one task's worker."""

    task_id: str
    task: dict[str, Any]            # the FULL TES task document
    task_dir: Path                  # <work_dir>/<task_id>, holds task.json (made at
                                    # submission, or by a backend that makes_task_dir)
    worker_argv: list[str]          # the command line that runs the worker for this task
    backend_parameters: dict[str, str] = field(default_factory=dict)  # accepted, lower-cased keys
    owner: str | None = None        # the task's owner (auth on), for per-user submission
    # the worker's credential for its own task (auth on), for backends whose workers do
    # not share the task dir (AWS Batch passes it in the job's environment)
    worker_token: str | None = None
    # names of the files the gateway wrote in task_dir: what a backend that runs jobs as
    # their owners hands over with the dir (nothing else in it: files.give_to)
    gateway_files: tuple[str, ...] = ()
    # for a backend that makes_task_dir: those files' contents (name -> text), which it
    # writes (files.private_dir, files.write_private) in the task dir it makes at start
    files: dict[str, str] = field(default_factory=dict)


class BackendError(RuntimeError):
    """The scheduler refused or failed an operation; message says what it reported.

    transient: the scheduler could not be reached (daemon down, timeout, SSH
    trouble); the reconciler retries later instead of failing the task.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class Backend(abc.ABC):
    """Base class: one instance per server process, shared by the reconciler."""

    #: the kind of backend, as configured (backends.<name>.kind, or backend.name)
    kind: str = ""
    #: the instance name (backends.<name>): in task metadata, leases, health rows and
    #: metrics labels; the kind when the single `backend:` form is used
    name: str = ""
    #: TES backend_parameters keys this backend understands (lower case): the keys of
    #: backend.<name>.backend_parameters, the admin's allow-list (mapped by
    #: templating.map_backend_parameters)
    supported_parameters: frozenset[str] = frozenset()
    #: submit may be called from several threads at once (reconciler.submit_threads)
    parallel_submit: bool = False
    #: files in the task dir where the scheduler itself writes the job's output (as the
    #: shipped template sets it, e.g. Slurm's --output): their tails go into the system
    #: logs of a job that ended without its worker recording an end
    job_output_files: tuple[str, ...] = ()
    #: the backend makes the task dir itself when the job starts and writes the gateway's
    #: files there (SubmitRequest.files): a queued job then costs no directory
    makes_task_dir: bool = False
    #: the most tasks one scheduler job array may carry (backend.<kind>.array_max, set by
    #: a backend that has arrays); 1 = one job per task, as a backend without arrays
    array_max: int = 1

    def __init__(self, options: BackendOptions, work_dir: Path,
                 on_change: Callable[[], None] | None = None, name: str | None = None):
        # the instance's name (registry.load_backend); a backend made directly (tests) is
        # named after its kind, or keeps the name its class gives it
        self.name = name or self.name or self.kind
        self.options = options    # this backend's section of the configuration
        self.work_dir = work_dir  # the configuration's work_dir (absolute)
        # a backend that learns by itself that a job ended (the local backend) calls it:
        # the server passes its store's `changed.set`, so the reconciler ticks at once
        self.on_change = on_change
        self.supported_parameters = frozenset(key.lower() for key in options.backend_parameters)

    @abc.abstractmethod
    def submit(self, request: SubmitRequest) -> str:
        """Submit the task's worker; return the scheduler's job id.

        Raises BackendError: transient when the scheduler could not be reached (the
        reconciler gives the claim back and tries again), else the scheduler refused
        the job or the configuration is wrong (the task fails with the message).
        """

    def array_key(self, request: SubmitRequest) -> str | None:
        """The job header this task's job would get (everything that is not the task's
        own: partition, cpus, memory, time, account, qos, GPUs, site directives, the
        user it runs as). Tasks of one tick with equal keys are submitted together by
        submit_array, up to array_max at a time. None: this task goes alone through
        submit (the default: a backend without arrays, or array_max 1).

        The key may depend on nothing of the request but array_script.shared_inputs
        (its resources, backend_parameters, owner, worker argv less its own task dir):
        the submitter asks once per distinct inputs in a tick. Raises BackendError as
        submit does (the task fails, or waits when transient)."""
        return None

    def submit_array(self, requests: list[SubmitRequest]) -> list[str]:
        """Submit 2..array_max tasks with one array_key as ONE scheduler array job and
        return each task's element id, in order (Slurm "123_0", Grid Engine "123.1",
        HTCondor "123.0", PBS "123[0]"). Element ids are job ids like any other: poll
        reports them (from the same one query), cancel and withdraw stop that element
        only, recover returns them.

        Nothing of a task enters the script but its id: element i reads line i of a task
        list the backend writes first (backends/arrays.py). Raises BackendError for the
        whole array, as submit does for one task."""
        raise NotImplementedError(f"{self.kind} has no job arrays")

    @abc.abstractmethod
    def cancel(self, job_id: str) -> None:
        """Ask the scheduler to stop the job. Idempotent for finished and unknown jobs.

        Raises BackendError when the request failed (the reconciler asks again next tick).
        """

    def withdraw(self, job_id: str) -> None:
        """Stop the job only if it has not started, where the scheduler can say so in the
        same request (Slurm: scancel --state=PENDING; the local backend: its queue);
        elsewhere a plain cancel. Overflow uses it to move a waiting task to another
        instance: a job that started meanwhile is left running (the poll then shows it).

        Raises BackendError as cancel does."""
        self.cancel(job_id)

    @abc.abstractmethod
    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """State of every job in job_ids, from ONE batched scheduler query.

        Never raises. Every id in job_ids gets an entry; a job the scheduler no
        longer knows is LOST (or a finished state if accounting still has it); a
        query that failed makes its jobs UNKNOWN, the reason quoting the scheduler.
        """

    def recover(self, task_id: str, task_dir: Path,
                owner: str | None = None) -> str | None:
        """Find the job of a submission the gateway may have died in the middle of.

        Return its job id, or None only when the scheduler answered that it has no
        job for the task (the reconciler then submits the task again). Raises
        BackendError(transient=True) when the scheduler could not be asked: the claim
        is kept and the question asked again next tick, so an outage never makes a
        second job. owner: the task's owner (from the database), for backends whose
        jobs run as their owners: only that user's job may be returned. The default
        knows nothing; backends that can look jobs up by name do better. A task sent in
        an array is found through the gateway's own task lists (backends/arrays.py,
        never a file of the task dir): its element id is returned.
        """
        return None

    def job_uid(self, owner: str | None) -> int | None:
        """The uid the task's job runs as, so the files it writes in the task dir (its
        event log, the scheduler's output files) belong to it: the gateway's own here.
        None when it cannot be known (no file of the task dir is then trusted)."""
        return os.geteuid()

    def job_output(self, task_dir: Path, limit: int = 4096,
                   owner: str | None = None) -> list[tuple[str, str]]:
        """(file name, last `limit` bytes) of each job_output_files entry that exists, is not
        empty and is a regular file of the job's uid (job_uid(owner)); no link is
        followed and no FIFO opened (the task dir may be the user's)."""
        uid = self.job_uid(owner)
        if uid is None:
            return []
        out = []
        for name in self.job_output_files:
            text = read_tail(task_dir, name, uid, limit)
            if text:
                out.append((name, text))
        return out

    @classmethod
    def check_task(cls, task: dict[str, Any]) -> str | None:
        """What this kind of backend cannot run in a (validated) task, as "field: reason"
        for an HTTP 400 at POST, or None. Asked of the instance a task is routed to, before
        it is stored (the tes backend refuses file:// URLs its remote cannot reach)."""
        return None

    def close(self) -> None:  # noqa: B027 - an optional hook: nothing to release by default
        """Release connections (SSH sessions, threads)."""
