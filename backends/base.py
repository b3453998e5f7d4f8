"""The one small interface every compute backend implements.

A backend turns a prepared task into a scheduler job (``submit``), stops a job
(``cancel``) and reports the state of many jobs with one scheduler query
(``poll``). Scheduler-specific states are mapped onto :class:`JobState` by a
table kept as data in each backend module.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class JobState(str, enum.Enum):
    """Common job states, whatever the scheduler."""

    PENDING = "PENDING"      # accepted, waiting for resources
    RUNNING = "RUNNING"      # started on a node
    COMPLETED = "COMPLETED"  # ended, scheduler saw success
    FAILED = "FAILED"        # ended, scheduler saw failure (non-zero, node fail, timeout)
    CANCELLED = "CANCELLED"  # removed by a cancel (ours or someone else's)
    LOST = "LOST"            # the scheduler no longer knows the job
    UNKNOWN = "UNKNOWN"      # could not be determined this time (retry next tick)

    @property
    def finished(self) -> bool:
        return self in FINISHED_JOB_STATES


FINISHED_JOB_STATES = frozenset(
    {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.LOST}
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
    task_dir: Path                  # <work_dir>/<task_id>, already created, holds task.json
    worker_argv: list[str]          # the command line that runs the worker for this task
    backend_parameters: dict[str, str] = field(default_factory=dict)  # accepted, lower-cased keys
    owner: str | None = None        # the task's owner (auth on), for per-user submission


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

    #: name used in config (backend.name) and in task metadata
    name: str = ""
    #: TES backend_parameters keys this backend understands (lower case)
    supported_parameters: frozenset[str] = frozenset()
    #: submit may be called from several threads at once (reconciler.submit_threads)
    parallel_submit: bool = False
    #: set by the reconciler: a backend that learns by itself that a job ended (the local
    #: backend) calls it, and the reconciler ticks at once
    on_change: Callable[[], None] | None = None

    def __init__(self, options: dict[str, Any], config: dict[str, Any]):
        self.options = options  # this backend's section: config["backend"][name]
        self.config = config    # the whole configuration

    @abc.abstractmethod
    def submit(self, request: SubmitRequest) -> str:
        """Submit the task's worker; return the scheduler's job id."""

    @abc.abstractmethod
    def cancel(self, job_id: str) -> None:
        """Ask the scheduler to stop the job. Idempotent for finished jobs."""

    @abc.abstractmethod
    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """State of every job in job_ids, from ONE batched scheduler query.

        Every id in job_ids gets an entry; a job the scheduler no longer knows
        is JobState.LOST (or a finished state if accounting still has it).
        """

    def recover(self, task_id: str, task_dir: Path) -> str | None:
        """Find the job of a submission the gateway may have died in the middle of.

        Return its job id, or None if the scheduler has no job for the task.
        The default knows nothing; backends that can look jobs up by name do better.
        """
        return None

    def close(self) -> None:  # pragma: no cover - optional hook
        """Release connections (SSH sessions, threads)."""
