"""Fixtures for the cloud backends: a real moto server process for AWS Batch (and S3),
task requests, and the HTCondor fake schedd built from recorded ClassAds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest
import requests

from backends.base import SubmitRequest
from gateway import config as config_mod
from tests.conftest import free_port

FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
QUEUE = "funnel-queue"
DEFINITION = "funnel-worker-def"


def backend_options(name: str, **extra) -> dict:
    """backend.<name> from conf/default.yaml, with overrides."""
    base = config_mod.load(environ={})["backend"][name]
    return {**base, **extra}


def make_request(tmp_path: Path, task: dict, argv: list[str] | None = None,
                 params: dict | None = None) -> SubmitRequest:
    task_dir = tmp_path / task["id"]
    task_dir.mkdir(parents=True, exist_ok=True)
    return SubmitRequest(task_id=task["id"], task=task, task_dir=task_dir,
                         worker_argv=argv or ["/bin/true"], backend_parameters=params or {})


class MotoServer:
    def __init__(self, url: str):
        self.url = url

    def client(self, service: str):
        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1")

    def use_docker(self, value: bool) -> None:
        """moto's documented switch between its Docker-running Batch and the simple one."""
        answer = requests.post(f"{self.url}/moto-api/config",
                               json={"batch": {"use_docker": value}}, timeout=10)
        answer.raise_for_status()

    def hold_jobs(self, hold: bool) -> None:
        """moto's documented state manager: a 'manual' transition needing a million ticks
        keeps new Batch jobs SUBMITTED; unset, jobs move on (moto's default)."""
        if hold:
            requests.post(f"{self.url}/moto-api/state-manager/set-transition", timeout=10,
                          json={"model_name": "batch::job",
                                "transition": {"progression": "manual", "times": 1_000_000}}
                          ).raise_for_status()
        else:
            requests.post(f"{self.url}/moto-api/state-manager/unset-transition", timeout=10,
                          json={"model_name": "batch::job"}).raise_for_status()

    def reset(self) -> None:
        requests.post(f"{self.url}/moto-api/reset", timeout=10).raise_for_status()
        self.use_docker(True)
        self.hold_jobs(False)

    def create_batch_environment(self) -> None:
        """Compute environment, job queue and the worker's job definition, through boto3."""
        iam, ec2, batch = self.client("iam"), self.client("ec2"), self.client("batch")
        role = iam.create_role(RoleName="funnel-batch-service",
                               AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24")["Subnet"]["SubnetId"]
        group = ec2.create_security_group(GroupName="funnel-batch", Description="funnel",
                                          VpcId=vpc)["GroupId"]
        env = batch.create_compute_environment(
            computeEnvironmentName="funnel-ce", type="MANAGED", state="ENABLED",
            computeResources={"type": "FARGATE", "maxvCpus": 16, "subnets": [subnet],
                              "securityGroupIds": [group]},
            serviceRole=role)
        batch.create_job_queue(jobQueueName=QUEUE, state="ENABLED", priority=1,
                               computeEnvironmentOrder=[
                                   {"order": 1, "computeEnvironment": env["computeEnvironmentArn"]}])
        batch.register_job_definition(
            jobDefinitionName=DEFINITION, type="container",
            containerProperties={"image": "funnel-hpc-worker:test",
                                 "command": ["funnel", "worker", "run"],
                                 "resourceRequirements": [{"type": "VCPU", "value": "1"},
                                                          {"type": "MEMORY", "value": "512"}]})


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    """`moto_server -H 127.0.0.1 -p PORT` as a real process, with fake credentials in os.environ."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(exe).exists():
        pytest.fail("moto_server missing: pip install 'moto[server]' (setup.cfg test extra)")
    saved = {k: os.environ.get(k) for k in FAKE_AWS_ENV}
    os.environ.update(FAKE_AWS_ENV)
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            requests.get(url, timeout=1)
            break
        except requests.RequestException:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto_server did not start")
    yield MotoServer(url)
    proc.terminate()
    proc.wait(10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def moto_batch(moto_server: MotoServer) -> MotoServer:
    """A fresh moto state with a compute environment, queue and job definition."""
    moto_server.reset()
    moto_server.create_batch_environment()
    return moto_server


# ---- HTCondor ----

RECORDED = Path(__file__).resolve().parent / "recorded"


class FakeSubmitResult:
    def __init__(self, cluster: int):
        self._cluster = cluster

    def cluster(self) -> int:
        return self._cluster


class FakeSchedd:
    """Answers like htcondor2.Schedd from the ClassAds in recorded/ (see recorded/README.md).

    Constraints are evaluated by the real ClassAd library (classad2), submit
    descriptions must be real htcondor2.Submit objects, actions real JobAction
    members; every call is recorded.
    """

    def __init__(self, fail: Exception | None = None):
        import classad2
        import htcondor2

        self.classad = classad2
        self.htcondor = htcondor2
        self.fail = fail
        self.queue = [classad2.ClassAd(ad) for ad in
                      json.loads((RECORDED / "queue.json").read_text())]
        self.past = [classad2.ClassAd(ad) for ad in
                     json.loads((RECORDED / "history.json").read_text())]
        self.calls: list[tuple[str, dict]] = []
        self.next_cluster = 200

    def _matching(self, ads: list, constraint: str) -> list:
        expression = self.classad.ExprTree(str(constraint))
        return [ad for ad in ads if expression.eval(ad) is True]

    def _project(self, ad: Any, projection: list[str]) -> Any:
        if not projection:
            return ad
        return self.classad.ClassAd({k: ad[k] for k in projection if k in ad})

    def query(self, constraint: str = "True", projection: list[str] | None = None, **_kw):
        self.calls.append(("query", {"constraint": constraint, "projection": projection}))
        if self.fail:
            raise self.fail
        return [self._project(ad, projection or []) for ad in self._matching(self.queue, constraint)]

    def history(self, constraint=None, projection=None, match: int = -1, **_kw):
        self.calls.append(("history", {"constraint": constraint, "projection": projection,
                                       "match": match}))
        if self.fail:
            raise self.fail
        ads = self._matching(self.past, constraint or "True")
        ads = ads[:match] if match >= 0 else ads
        return iter([self._project(ad, projection or []) for ad in ads])

    def submit(self, description: Any, count: int = 0, **_kw) -> FakeSubmitResult:
        assert isinstance(description, self.htcondor.Submit)
        self.calls.append(("submit", {"description": dict(description), "count": count}))
        if self.fail:
            raise self.fail
        cluster = self.next_cluster
        self.next_cluster += 1
        task_id = self.classad.ExprTree(description["MY.FunnelTaskId"]).eval()
        self.queue.append(self.classad.ClassAd({"ClusterId": cluster, "ProcId": 0,
                                                "JobStatus": 1, "FunnelTaskId": task_id}))
        return FakeSubmitResult(cluster)

    def act(self, action: Any, job_spec: Any, reason: str | None = None) -> Any:
        assert isinstance(action, self.htcondor.JobAction)
        self.calls.append(("act", {"action": action, "job_spec": job_spec, "reason": reason}))
        if self.fail:
            raise self.fail
        hits = self._matching(self.queue, job_spec)
        for ad in hits:  # condor_rm: Removed, then out of the queue into history
            ad["JobStatus"] = 3
            ad["RemoveReason"] = reason or ""
            self.queue.remove(ad)
            self.past.insert(0, ad)
        return self.classad.ClassAd({"TotalSuccess": len(hits), "TotalNotFound": 0,
                                     "TotalJobAds": len(hits)})

    def named(self, name: str) -> list[dict]:
        return [params for call, params in self.calls if call == name]
