"""AWS Batch backend against a real moto server process on 127.0.0.1 (no in-process mocks).

What moto 5.x's Batch really does here, found by running it (no Docker engine on
these machines):

- Default mode (moto runs each job as a Docker container): the job is SUBMITTED
  at once and FAILED about one second later, because moto cannot reach a Docker
  daemon. It gives no statusReason and no exit code for that failure; the
  backend reports ``batch: FAILED exit=None reason=``.
- moto's documented switch ``POST /moto-api/config {"batch": {"use_docker": false}}``
  (its "simple" Batch) marks each job SUCCEEDED during submit_job, without
  running anything.
- A job is SUBMITTED only for a moment (about a second for the first job of a
  server, less later), so the cancel test holds jobs in SUBMITTED with moto's
  documented state manager (``/moto-api/state-manager/set-transition`` on
  ``batch::job``). terminate_job on that pending job records our reason as
  statusReason at once, but the job stays SUBMITTED while held; released, it
  ends FAILED with that reason, which the backend reports as CANCELLED.
- describe_jobs leaves out ids it does not know (the backend: LOST).
- moto does not echo containerOverrides.resourceRequirements in describe_jobs
  (it shows the job definition's vcpus/memory), so the tests read the
  submit_job request the backend sent with a botocore event hook.

No job's command runs inside moto in either mode; the worker test at the end
runs the submitted command itself, on this machine, as the container would.
"""

from __future__ import annotations

import math
import time

import pytest

from funnel_hpc.backends.awsbatch import (
    CANCEL_REASON,
    DESCRIBE_LIMIT,
    STATE_MAP,
    AwsBatchBackend,
    job_name,
    job_status,
)
from funnel_hpc.backends.base import BackendError, JobState
from funnel_hpc.backends.registry import backend_class
from tests.backend_helpers import (
    DEFINITION,
    NO_WORK_DIR,
    QUEUE,
    backend_options,
    make_request,
)
from tests.components import BWRAP, BWRAP_REASON, bwrap_ready, need

SERVER_URL = "http://gateway.example:8000"


def make_backend(moto, **extra) -> AwsBatchBackend:
    settings = {"endpoint_url": moto.url, "job_queue": QUEUE, "job_definition": DEFINITION,
                "server_url": SERVER_URL, **extra}
    options = backend_options("aws_batch", **settings)
    return AwsBatchBackend(options, NO_WORK_DIR)


class CallLog:
    """Records every Batch API call the backend's client makes, with its parameters
    (a botocore hook)."""

    def __init__(self, backend: AwsBatchBackend):
        self.calls: list[tuple[str, dict]] = []
        backend.client.meta.events.register("before-parameter-build.batch.*", self._record)

    def _record(self, model, params, **_kwargs) -> None:
        self.calls.append((model.name, params))

    def named(self, operation: str) -> list[dict]:
        return [params for name, params in self.calls if name == operation]


def task(task_id: str = "d0c0ffee", **resources) -> dict:
    return {"id": task_id, "name": "t", "resources": resources,
            "executors": [{"image": "busybox", "command": ["true"]}]}


def wait_finished(backend, job_ids, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        statuses = backend.poll(job_ids)
        if all(s.state.finished for s in statuses.values()) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.3)


def test_awsbatch_registry_and_default_options():
    assert backend_class("aws-batch") is AwsBatchBackend
    options = backend_options("aws_batch")
    assert options.job_definition == "funnel-hpc-worker"
    assert list(options.worker_command) == ["funnel", "worker", "run"]
    # the registry hands backend "aws-batch" its section backend.aws_batch
    from funnel_hpc.backends.registry import load_backend
    from funnel_hpc.core import config as config_mod

    config = config_mod.load(environ={}, overrides={"backend": {
        "name": "aws-batch", "aws_batch": {"region": "eu-west-1"}}})
    backend = load_backend(config.backend, config.work_dir)
    assert isinstance(backend, AwsBatchBackend)
    assert backend.client.meta.region_name == "eu-west-1"


def test_awsbatch_state_map_is_complete():
    assert set(STATE_MAP) == {"SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING",
                              "SUCCEEDED", "FAILED"}
    assert job_status({"status": "FAILED", "statusReason": CANCEL_REASON}).state \
        is JobState.CANCELLED
    failed = job_status({"status": "FAILED", "statusReason": "Essential container exited",
                         "attempts": [{"container": {"exitCode": 3}}]})
    assert failed.state is JobState.FAILED
    assert failed.reason == "batch: FAILED exit=3 reason=Essential container exited"
    assert job_status({"status": "SOMETHING_NEW"}).state is JobState.UNKNOWN


def test_awsbatch_job_name_is_sanitised():
    assert job_name("abc123") == "funnel-abc123"
    assert job_name("a b/c$(x)\n") == "funnel-a_b_c__x__"
    assert len(job_name("x" * 300)) == 128


def test_awsbatch_submit_poll_without_docker_fails(moto_batch, tmp_path):
    """moto's default (Docker) Batch with no Docker engine: the job goes FAILED."""
    backend = make_backend(moto_batch)
    log = CallLog(backend)
    request = make_request(tmp_path, task(cpu_cores=2, ram_gb=1.5),
                           argv=["python", "-m", "funnel_hpc.gateway.cli.main", "worker", "run",
                                 "--task-file", "x.json"])
    job_id = backend.submit(request)

    (sent,) = log.named("SubmitJob")
    assert sent["jobName"] == "funnel-d0c0ffee"
    assert sent["jobQueue"] == QUEUE and sent["jobDefinition"] == DEFINITION
    overrides = sent["containerOverrides"]
    assert overrides["command"] == ["funnel", "worker", "run", "--task-id", "d0c0ffee",
                                    "--server", SERVER_URL]
    assert overrides["resourceRequirements"] == [{"type": "VCPU", "value": "2"},
                                                 {"type": "MEMORY", "value": "1536"}]
    assert sent["tags"] == {"funnel-hpc:task-id": "d0c0ffee"}

    # what moto stored: the command override and our job name
    described = moto_batch.client("batch").describe_jobs(jobs=[job_id])["jobs"][0]
    assert described["jobName"] == "funnel-d0c0ffee"
    assert described["container"]["command"] == overrides["command"]

    first = backend.poll([job_id])[job_id]
    assert first.state in (JobState.PENDING, JobState.RUNNING, JobState.FAILED)
    final = wait_finished(backend, [job_id])[job_id]
    assert final.state is JobState.FAILED
    assert final.reason.startswith("batch: FAILED")


def test_awsbatch_worker_token_goes_in_the_job_environment(moto_batch, tmp_path):
    """Auth on: the reconciler puts the task's worker token in the SubmitRequest; a Batch
    job shares no file system with the gateway, so the token travels as
    FUNNEL_WORKER_TOKEN in the container overrides (and only then). The backend reads
    no token file: one in the task dir changes nothing."""
    from funnel_hpc.core import worker_tokens

    backend = make_backend(moto_batch, environment={"SITE": "x"})
    log = CallLog(backend)
    key = worker_tokens.load_key(tmp_path)
    plain = make_request(tmp_path, task("a0a0a0a0"))
    worker_tokens.write_token(key, plain.task_dir, "a0a0a0a0")  # ignored: not the channel
    backend.submit(plain)
    with_token = make_request(tmp_path, task("b1b1b1b1"))
    with_token.worker_token = worker_tokens.token_for(key, "b1b1b1b1")
    backend.submit(with_token)
    first, second = log.named("SubmitJob")
    assert first["containerOverrides"]["environment"] == [{"name": "SITE", "value": "x"}]
    assert worker_tokens.task_of(key, with_token.worker_token) == "b1b1b1b1"
    assert second["containerOverrides"]["environment"] == [
        {"name": "FUNNEL_WORKER_TOKEN", "value": with_token.worker_token},
        {"name": "SITE", "value": "x"}]


def test_awsbatch_simple_batch_succeeds(moto_batch, tmp_path):
    """moto's simple Batch (use_docker false) marks jobs SUCCEEDED: COMPLETED here."""
    moto_batch.use_docker(False)
    backend = make_backend(moto_batch)
    job_id = backend.submit(make_request(tmp_path, task()))
    status = backend.poll([job_id])[job_id]
    assert status.state is JobState.COMPLETED
    assert status.reason.startswith("batch: SUCCEEDED")


def test_awsbatch_no_resources_keeps_the_definition_values(moto_batch, tmp_path):
    backend = make_backend(moto_batch)
    log = CallLog(backend)
    backend.submit(make_request(tmp_path, task()))
    assert "resourceRequirements" not in log.named("SubmitJob")[0]["containerOverrides"]


def test_awsbatch_cancel_pending_job(moto_batch, tmp_path):
    backend = make_backend(moto_batch)
    log = CallLog(backend)
    moto_batch.hold_jobs(True)
    job_id = backend.submit(make_request(tmp_path, task()))
    before = backend.poll([job_id])[job_id]
    assert before.state is JobState.PENDING and "SUBMITTED" in before.reason
    backend.cancel(job_id)
    assert log.named("TerminateJob") == [{"jobId": job_id, "reason": CANCEL_REASON}]
    # moto records the reason at once; a held job stays SUBMITTED (AWS would end it)
    held = backend.poll([job_id])[job_id]
    assert held.state is JobState.PENDING and CANCEL_REASON in held.reason
    moto_batch.hold_jobs(False)
    final = wait_finished(backend, [job_id])[job_id]
    assert final.state is JobState.CANCELLED, final
    assert final.reason == f"batch: FAILED exit=None reason={CANCEL_REASON}"
    # cancel is idempotent: a finished job, and a job AWS never knew
    backend.cancel(job_id)
    backend.cancel("00000000-0000-0000-0000-000000000000")


def test_awsbatch_poll_batches_of_100(moto_batch, tmp_path):
    """203 ids -> ceil(203/100) = 3 describe_jobs calls; unknown ids are LOST."""
    moto_batch.use_docker(False)  # fast: jobs end during submit_job
    backend = make_backend(moto_batch)
    job_ids = [backend.submit(make_request(tmp_path, task(f"{i:08x}"))) for i in range(201)]
    unknown = ["11111111-2222-3333-4444-555555555555", "not-a-job"]
    log = CallLog(backend)
    statuses = backend.poll(job_ids + unknown)
    described = log.named("DescribeJobs")
    assert len(described) == math.ceil(203 / DESCRIBE_LIMIT) == 3
    assert all(len(params["jobs"]) <= DESCRIBE_LIMIT for params in described)
    assert sorted(j for params in described for j in params["jobs"]) == sorted(job_ids + unknown)
    assert set(statuses) == set(job_ids + unknown)
    assert all(statuses[j].state is JobState.COMPLETED for j in job_ids)
    assert all(statuses[j].state is JobState.LOST for j in unknown)
    assert backend.poll([]) == {}


IN_FLIGHT = 500


def test_awsbatch_poll_of_500_in_flight_jobs_is_5_describe_calls(moto_batch, tmp_path):
    """Issue #5: one call per tick per 100 jobs, at 500 in-flight jobs (held SUBMITTED by
    moto's state manager): ceil(500/100) = 5 describe_jobs calls, nothing else."""
    moto_batch.hold_jobs(True)
    backend = make_backend(moto_batch)
    job_ids: list[str] = []
    try:
        job_ids = [backend.submit(make_request(tmp_path, task(f"{i:08x}")))
                   for i in range(IN_FLIGHT)]
        log = CallLog(backend)
        statuses = backend.poll(job_ids)
        assert [name for name, _ in log.calls] == ["DescribeJobs"] * 5
        assert {s.state for s in statuses.values()} == {JobState.PENDING}
        assert len(statuses) == IN_FLIGHT
    finally:
        # released, moto fails each job (no Docker engine); its reset would otherwise
        # wait 0.2 s for every job thread still held
        moto_batch.hold_jobs(False)
        wait_finished(backend, job_ids, timeout=60)


def test_awsbatch_recover_finds_the_job_by_name(moto_batch, tmp_path):
    backend = make_backend(moto_batch)
    job_id = backend.submit(make_request(tmp_path, task("feedbeef")))
    backend.submit(make_request(tmp_path, task("0badf00d")))
    assert backend.recover("feedbeef", tmp_path) == job_id
    assert backend.recover("abababab", tmp_path) is None


def test_awsbatch_registers_the_worker_definition(moto_batch, tmp_path):
    backend = make_backend(moto_batch, job_definition="funnel-auto-def",
                           worker_image="ghcr.io/example/funnel-worker:1")
    job_id = backend.submit(make_request(tmp_path, task()))
    backend.submit(make_request(tmp_path, task("0000beef")))
    batch = moto_batch.client("batch")
    (definition,) = batch.describe_job_definitions(jobDefinitionName="funnel-auto-def",
                                                   status="ACTIVE")["jobDefinitions"]
    assert definition["containerProperties"]["image"] == "ghcr.io/example/funnel-worker:1"
    assert definition["revision"] == 1  # registered once
    assert batch.describe_jobs(jobs=[job_id])["jobs"][0]["jobDefinition"] \
        == definition["jobDefinitionArn"]


def test_awsbatch_backend_parameters_typed_and_validated(moto_batch, tmp_path):
    backend = make_backend(moto_batch)
    log = CallLog(backend)
    backend.submit(make_request(tmp_path, task(), params={"timeout": "600", "queue": QUEUE,
                                                          "unlisted": "x"}))
    sent = log.named("SubmitJob")[0]
    assert sent["timeout"] == {"attemptDurationSeconds": 600}
    assert sent["jobQueue"] == QUEUE
    assert "unlisted" not in str(sent)
    for hostile in ({"timeout": "60\n--x"}, {"timeout": "$(id)"}, {"queue": "q `id`"},
                    {"timeout": "ten"}):
        with pytest.raises(BackendError):
            backend.submit(make_request(tmp_path, task(), params=hostile))
    assert len(log.named("SubmitJob")) == 1


def test_awsbatch_hostile_task_values_change_nothing(moto_batch, tmp_path):
    """Name, tags, env of a task never reach the submit_job request."""
    backend = make_backend(moto_batch)
    log = CallLog(backend)
    benign = task("0000aaaa")
    hostile = {**task("0000aaaa"), "name": "x\n$(id)`id`\"'", "tags": {"k\n": "$(rm -rf /)"},
               "executors": [{"image": "busybox", "command": ["true"],
                              "env": {"A": "\"; injected"}}]}
    backend.submit(make_request(tmp_path / "a", benign))
    backend.submit(make_request(tmp_path / "b", hostile))
    first, second = log.named("SubmitJob")
    assert first == second


def test_awsbatch_needs_a_server_url(moto_batch, tmp_path):
    backend = AwsBatchBackend(backend_options("aws_batch", endpoint_url=moto_batch.url,
                                              job_queue=QUEUE, job_definition=DEFINITION,
                                              server_url=""), NO_WORK_DIR)
    with pytest.raises(BackendError, match="public_url"):
        backend.submit(make_request(tmp_path, task()))


def test_awsbatch_unreachable_endpoint_is_transient(moto_server, tmp_path):
    from tests.server_helpers import free_port

    backend = make_backend(moto_server, endpoint_url=f"http://127.0.0.1:{free_port()}",
                           max_attempts=1, timeout_seconds=2)
    with pytest.raises(BackendError) as caught:
        backend.submit(make_request(tmp_path, task()))
    assert caught.value.transient
    statuses = backend.poll(["a", "b"])
    assert {s.state for s in statuses.values()} == {JobState.UNKNOWN}
    with pytest.raises(BackendError) as caught:
        backend.cancel("a")
    assert caught.value.transient


def test_awsbatch_unknown_queue_is_not_transient(moto_batch, tmp_path):
    backend = make_backend(moto_batch, job_queue="no-such-queue")
    with pytest.raises(BackendError) as caught:
        backend.submit(make_request(tmp_path, task()))
    assert not caught.value.transient


def test_awsbatch_worker_runs_the_submitted_command_with_moto_s3(moto_batch, tmp_path):
    """The command and environment AWS Batch would start, run here (moto runs nothing).

    A real gateway (no reconciler) holds the task; the backend submits the job
    to moto; the job's command and environment are read back from moto's
    describe_jobs and run on this machine as the container would: the worker
    fetches the task by id from the gateway, stages its input from moto's S3,
    runs the executor (bwrap) and uploads the output to moto's S3.
    """
    import subprocess
    import sys

    import boto3
    import requests

    from tests.backend_helpers import FAKE_AWS_ENV
    from tests.server_helpers import REPO, ServerProcess, clean_env, worker_image_env

    need(BWRAP, bwrap_ready(), BWRAP_REASON)
    s3 = boto3.client("s3", endpoint_url=moto_batch.url, region_name="us-east-1")
    s3.create_bucket(Bucket="tes")
    s3.put_object(Bucket="tes", Key="in/a.txt", Body=b"hello batch\n")

    server = ServerProcess(tmp_path / "gateway", f"sqlite:///{tmp_path}/gateway/funnel.db")
    server.start()
    try:
        created = requests.post(server.api + "/tasks", timeout=10, json={
            "name": "batch-s3",
            "inputs": [{"path": "/in/a.txt", "url": "s3://tes/in/a.txt"}],
            "outputs": [{"path": "/out/b.txt", "url": "s3://tes/out/b.txt"}],
            "executors": [{"image": "busybox",
                           "command": ["sh", "-c", "tr a-z A-Z < /in/a.txt > /out/b.txt"]}]})
        created.raise_for_status()
        task_id = created.json()["id"]
        full = requests.get(f"{server.api}/tasks/{task_id}?view=FULL", timeout=10).json()

        job_work = tmp_path / "job-work"
        backend = make_backend(
            moto_batch, server_url=server.url,
            worker_command=[sys.executable, "-m", "funnel_hpc.gateway.cli.main", "worker", "run"],
            environment={"FUNNEL_STORAGE__S3__ENDPOINT_URL": moto_batch.url,
                         "FUNNEL_WORKER__CONTAINER_DRIVER": "bwrap",
                         "FUNNEL_WORK_DIR": str(job_work), **worker_image_env()})
        job_id = backend.submit(make_request(tmp_path / "dirs", full))

        job = moto_batch.client("batch").describe_jobs(jobs=[job_id])["jobs"][0]
        command = job["container"]["command"]
        assert command[-4:] == ["--task-id", task_id, "--server", server.url]
        job_env = {e["name"]: e["value"] for e in job["container"]["environment"]}
        assert job_env["FUNNEL_WORK_DIR"] == str(job_work)
        result = subprocess.run(command, cwd=REPO, env=clean_env(**FAKE_AWS_ENV, **job_env),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.strip() == "COMPLETE"
        body = s3.get_object(Bucket="tes", Key="out/b.txt")["Body"].read()
        assert body == b"HELLO BATCH\n"
    finally:
        server.stop()


def test_awsbatch_recover_denied_holds_back_no_other_task(moto_batch, tmp_path, monkeypatch):
    """Measured before: recover raising AccessDenied made three ticks in a row raise and a
    second QUEUED task was never submitted. Now the claimed task waits (recover could not
    ask: its claim is kept) and the other one is submitted on the first tick."""
    import botocore.exceptions

    from funnel_hpc.core import config as config_mod
    from funnel_hpc.gateway.reconcile.reconciler import Reconciler
    from funnel_hpc.gateway.web.app import make_service

    backend = make_backend(moto_batch)
    config = config_mod.load(environ={}, overrides={"work_dir": str(tmp_path)})
    service = make_service(config)
    reconciler = Reconciler(service, backend, config)
    spec = {"executors": [{"image": "busybox", "command": ["true"]}]}
    claimed = service.create(spec)
    # a gateway died here
    assert service.reconciler_queries.claim_with_tasks([(claimed, 1)]).keys() == {claimed}
    queued = service.create(spec)
    denied = botocore.exceptions.ClientError(
        {"Error": {"Code": "AccessDeniedException",
                   "Message": "not authorized to perform: batch:ListJobs"},
         "ResponseMetadata": {"HTTPStatusCode": 403}}, "ListJobs")

    def list_jobs(**_kwargs):
        raise denied

    original = backend.client.list_jobs
    monkeypatch.setattr(backend.client, "list_jobs", list_jobs)
    for _ in range(3):
        reconciler.tick()
    assert service.get_row(queued).job_id  # submitted to Batch
    assert service.get_row(claimed).job_id == ""  # still claimed, not submitted again
    monkeypatch.setattr(backend.client, "list_jobs", original)
    for _ in range(3):  # recover: no such job, the claim is given back; then submitted
        reconciler.tick()
    job_id = service.get_row(claimed).job_id
    assert job_id and service.get_row(claimed).attempt == 1
    named = backend.client.list_jobs(jobQueue=QUEUE, filters=[
        {"name": "JOB_NAME", "values": [job_name(claimed)]}])["jobSummaryList"]
    assert [job["jobId"] for job in named] == [job_id]
