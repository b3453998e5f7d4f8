"""AWS Batch: submit_job to submit, terminate_job to cancel, describe_jobs to poll.

Design: one generic job definition (``backend.aws_batch.job_definition``)
runs the funnel worker image; each job gets its task by id from the gateway,
so the container command is ``<worker_command> --task-id ID --server URL``
(the worker fetches the FULL task over HTTP, reports its events there and
stages inputs/outputs itself, e.g. from S3). The executors' own images are
run by the worker's container driver, not by AWS Batch. When ``worker_image``
is set, the backend registers the job definition itself the first time it is
missing (a container definition running that image); otherwise the definition
must exist.

Resources: ``cpu_cores`` becomes the VCPU and ``ram_gb`` the MEMORY (MiB)
``resourceRequirements`` container overrides; unset ones keep the job
definition's values. The job name is ``funnel-<task id>`` reduced to the
characters AWS allows (letters, digits, ``-`` and ``_``, at most 128), and the
job carries the tag ``funnel-hpc:task-id``.

Polling: ``describe_jobs`` accepts at most 100 job ids, so a poll of N jobs
makes ceil(N/100) calls (one per 100 jobs) -- the batched query of the
backend interface, cut to the API's limit. Ids AWS does not return are LOST
(AWS forgets jobs some days after they end). A chunk whose call fails is
UNKNOWN, so the reconciler asks again next tick.

Cancel: ``terminate_job`` (stops RUNNING/STARTING jobs and removes
SUBMITTED/PENDING/RUNNABLE ones). AWS then reports the job FAILED with our
reason as ``statusReason``; a FAILED job with that reason is CANCELLED.

Credentials come from the usual boto3 chain (environment, profile, instance
role); ``region`` and ``endpoint_url`` are configurable (a moto server in tests).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config as BotoConfig

from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.backends.templating import TemplateValueError, map_backend_parameters
from funnel_hpc.core import worker_tokens
from funnel_hpc.core.config import AwsBatchOptions

# AWS Batch job status -> common job state
STATE_MAP: dict[str, JobState] = {
    "SUBMITTED": JobState.PENDING,
    "PENDING": JobState.PENDING,
    "RUNNABLE": JobState.PENDING,
    "STARTING": JobState.RUNNING,
    "RUNNING": JobState.RUNNING,
    "SUCCEEDED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
}

#: statusReason prefixes of a job whose host was taken away (a Spot reclaim): PREEMPTED
PREEMPTION_REASONS = ("Host EC2",)

#: describe_jobs takes at most this many job ids per call
DESCRIBE_LIMIT = 100

#: statusReason given to terminate_job; a FAILED job with it was canceled by us
CANCEL_REASON = "Canceled by funnel-hpc (TES CancelTask)"

TASK_TAG = "funnel-hpc:task-id"

# submit_job fields a backend_parameters key may map to, and how its value is typed
SUBMIT_FIELDS: dict[str, type] = {
    "jobQueue": str,
    "attemptDurationSeconds": int,
    "schedulingPriorityOverride": int,
    "shareIdentifier": str,
    "retryAttempts": int,
}
SUBMIT_FIELD_NAME = re.compile("|".join(SUBMIT_FIELDS))

# ClientError codes that mean "try again later", not "this request is wrong"
TRANSIENT_CODES = {"Throttling", "ThrottlingException", "TooManyRequestsException",
                   "ServiceUnavailable", "ServiceUnavailableException", "ServerException",
                   "InternalError", "RequestTimeout", "RequestLimitExceeded"}

_NOT_JOB_NAME = re.compile(r"[^A-Za-z0-9_-]")


def job_name(task_id: str) -> str:
    """funnel-<task id> in AWS Batch's job name alphabet: [A-Za-z0-9_-], 1..128 chars."""
    return _NOT_JOB_NAME.sub("_", f"funnel-{task_id}")[:128]


def is_transient(exc: Exception) -> bool:
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.get("Code") in TRANSIENT_CODES or int(status or 0) >= 500
    # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, NoCredentialsError...
    return isinstance(exc, botocore.exceptions.BotoCoreError)


def exit_code(job: dict[str, Any]) -> Any:
    """The container's exit code: on the job, else on its last attempt, else None."""
    code = (job.get("container") or {}).get("exitCode")
    if code is None and job.get("attempts"):
        code = (job["attempts"][-1].get("container") or {}).get("exitCode")
    return code


def job_status(job: dict[str, Any]) -> JobStatus:
    status = str(job.get("status") or "")
    reason = job.get("statusReason") or ""
    state = STATE_MAP.get(status, JobState.UNKNOWN)
    if state is JobState.FAILED and reason == CANCEL_REASON:
        state = JobState.CANCELLED
    elif state is JobState.FAILED and reason.startswith(PREEMPTION_REASONS):
        state = JobState.PREEMPTED
    return JobStatus(state, f"batch: {status} exit={exit_code(job)} reason={reason}")


class AwsBatchBackend(Backend):
    kind = "aws-batch"

    options: AwsBatchOptions

    def __init__(self, options: AwsBatchOptions, work_dir: Path,
                 on_change: Callable[[], None] | None = None, name: str | None = None):
        super().__init__(options, work_dir, on_change, name)
        self.job_queue = options.job_queue
        self.job_definition = options.job_definition
        self.worker_image = options.worker_image
        self.worker_command = list(options.worker_command)
        self.server_url = options.server_url  # server.public_url when not set
        self._definition_checked = False
        self._lock = threading.Lock()
        self.client = boto3.client(
            "batch", region_name=options.region or None,
            endpoint_url=options.endpoint_url or None,
            config=BotoConfig(retries={"max_attempts": options.max_attempts,
                                       "mode": "standard"},
                              connect_timeout=options.timeout_seconds,
                              read_timeout=options.timeout_seconds))

    # ---- submit ----

    def command(self, request: SubmitRequest) -> list[str]:
        """The container command: the worker fetching its task by id from the gateway."""
        if not self.server_url:
            raise BackendError("aws-batch needs the gateway's URL for its workers: set "
                               "server.public_url or backend.aws_batch.server_url")
        if not self.worker_command:
            raise BackendError("backend.aws_batch.worker_command is empty")
        return [*self.worker_command, "--task-id", request.task_id, "--server", self.server_url]

    def resource_requirements(self, request: SubmitRequest) -> list[dict[str, str]]:
        resources = request.task.get("resources") or {}
        out = []
        if resources.get("cpu_cores"):
            out.append({"type": "VCPU", "value": str(int(resources["cpu_cores"]))})
        if resources.get("ram_gb"):
            mib = math.ceil(float(resources["ram_gb"]) * 1024)
            out.append({"type": "MEMORY", "value": str(mib)})
        return out

    def submit_arguments(self, request: SubmitRequest) -> dict[str, Any]:
        """The keyword arguments of submit_job for this task (no call made)."""
        if not self.job_queue or not self.job_definition:
            raise BackendError("backend.aws_batch.job_queue and job_definition must be set")
        overrides: dict[str, Any] = {"command": self.command(request)}
        requirements = self.resource_requirements(request)
        if requirements:
            overrides["resourceRequirements"] = requirements
        environment = dict(self.options.environment)
        if request.worker_token:  # auth on: the worker's only credential (no shared task dir)
            environment[worker_tokens.ENV_VAR] = request.worker_token
        if environment:
            overrides["environment"] = [{"name": k, "value": v}
                                        for k, v in sorted(environment.items())]
        args: dict[str, Any] = {
            "jobName": job_name(request.task_id),
            "jobQueue": self.job_queue,
            "jobDefinition": self.job_definition,
            "containerOverrides": overrides,
            "tags": {TASK_TAG: request.task_id},
        }
        for field_name, value in self.mapped_parameters(request.backend_parameters).items():
            if field_name == "attemptDurationSeconds":
                args["timeout"] = {"attemptDurationSeconds": value}
            elif field_name == "retryAttempts":
                args["retryStrategy"] = {"attempts": value}
            else:
                args[field_name] = value
        return args

    def mapped_parameters(self, params: dict[str, str]) -> dict[str, Any]:
        """backend_parameters -> {submit_job field: typed value}, through the allow-list."""
        try:
            mapped = map_backend_parameters(params, self.options.backend_parameters,
                                            SUBMIT_FIELD_NAME,
                                            f"one of {', '.join(SUBMIT_FIELDS)}")
        except TemplateValueError as exc:
            raise BackendError(str(exc)) from None
        out: dict[str, Any] = {}
        for field_name, value in mapped:
            try:
                out[field_name] = SUBMIT_FIELDS[field_name](value)
            except ValueError as exc:
                raise BackendError(f"backend_parameters for {field_name}: {exc}") from None
        return out

    def ensure_job_definition(self) -> None:
        """Register the worker's job definition once if worker_image is set and it is missing."""
        if self._definition_checked or not self.worker_image:
            return
        with self._lock:
            if self._definition_checked:
                return
            found = self.client.describe_job_definitions(
                jobDefinitionName=self.job_definition, status="ACTIVE")
            if not found.get("jobDefinitions"):
                self.client.register_job_definition(
                    jobDefinitionName=self.job_definition, type="container",
                    containerProperties={
                        "image": self.worker_image,
                        "command": list(self.worker_command),
                        "resourceRequirements": [
                            {"type": "VCPU", "value": "1"},
                            {"type": "MEMORY", "value": str(
                                self.options.default_memory_mib)}],
                    },
                    tags={"funnel-hpc": "worker"})
            self._definition_checked = True

    def submit(self, request: SubmitRequest) -> str:
        args = self.submit_arguments(request)
        try:
            self.ensure_job_definition()
            answer = self.client.submit_job(**args)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise BackendError(f"submit_job failed: {exc}", transient=is_transient(exc)) from None
        job_id = answer.get("jobId")
        if not job_id:
            raise BackendError(f"submit_job returned no jobId: {answer!r:.300}")
        return str(job_id)

    # ---- cancel ----

    def cancel(self, job_id: str) -> None:
        try:
            self.client.terminate_job(jobId=str(job_id), reason=CANCEL_REASON)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            if is_transient(exc):
                raise BackendError(f"terminate_job {job_id} failed: {exc}", transient=True) \
                    from None
            # a job AWS no longer knows, or one already finished: nothing to stop
            message = str(exc).lower()
            if "not found" in message or "does not exist" in message or "invalid" in message:
                return
            raise BackendError(f"terminate_job {job_id} failed: {exc}") from None

    # ---- poll ----

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """One describe_jobs call per 100 ids (the API's limit), so ceil(N/100) calls."""
        wanted = sorted({str(j) for j in job_ids})
        found: dict[str, JobStatus] = {}
        for start in range(0, len(wanted), DESCRIBE_LIMIT):
            chunk = wanted[start:start + DESCRIBE_LIMIT]
            try:
                answer = self.client.describe_jobs(jobs=chunk)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
                for job_id in chunk:
                    found[job_id] = JobStatus(JobState.UNKNOWN, f"describe_jobs failed: {exc}")
                continue
            for job in answer.get("jobs") or []:
                if job.get("jobId") in chunk:
                    found[job["jobId"]] = job_status(job)
            for job_id in chunk:
                found.setdefault(job_id, JobStatus(
                    JobState.LOST, "AWS Batch no longer knows this job (not in describe_jobs)"))
        return found

    # ---- recover ----

    def recover(self, task_id: str, task_dir: Any,
                owner: str | None = None) -> str | None:
        """The newest job named funnel-<task id> in the queue (list_jobs by JOB_NAME)."""
        if not self.job_queue:
            return None
        jobs: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"jobQueue": self.job_queue,
                                  "filters": [{"name": "JOB_NAME",
                                               "values": [job_name(task_id)]}]}
        try:
            while True:
                answer = self.client.list_jobs(**kwargs)
                jobs += answer.get("jobSummaryList") or []
                if not answer.get("nextToken"):
                    break
                kwargs["nextToken"] = answer["nextToken"]
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            # could not ask (AccessDenied included): not "no such job" (base.py)
            raise BackendError(f"list_jobs failed: {exc}", transient=True) from None
        jobs = [j for j in jobs if j.get("jobName") == job_name(task_id)]
        if not jobs:
            return None
        return str(max(jobs, key=lambda j: j.get("createdAt") or 0)["jobId"])

    def close(self) -> None:
        self.client.close()
