"""Helpers shared by the backend tests (tests/backends*, tests/worker, tests/test_e2e.py):
backend options from conf/default.yaml, SubmitRequests, a fake command runner and a real moto
server process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import requests

from funnel_hpc.backends.base import SubmitRequest
from funnel_hpc.backends.commands import Result
from funnel_hpc.core import config as config_mod

FAKE_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
QUEUE = "funnel-queue"
DEFINITION = "funnel-worker-def"


def set_environ(values: dict[str, str]) -> Callable[[], None]:
    """Set values in os.environ (servers started later inherit them); returns the undo."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)

    def restore() -> None:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    return restore


# the work dir of a backend that has none to use (every one but local)
NO_WORK_DIR = Path("/nonexistent")


def backend_options(name: str, **extra: object) -> Any:
    """backend.<name> from conf/default.yaml (aws-batch or aws_batch), with some keys
    replaced (plain values, converted and checked as the loader does)."""
    base = config_mod.load(environ={}).backend.options(name)
    assert base is not None, name
    return config_mod.replace(base, f"backend.{name.replace('-', '_')}", **extra)


def double_options() -> Any:
    """The options of a test double backend: no backend_parameters at all."""
    return backend_options("local", backend_parameters={})


def ssh_options(**extra: object) -> config_mod.SshOptions:
    """backend.slurm.ssh from conf/default.yaml with some keys replaced."""
    ssh = config_mod.replace(config_mod.load(environ={}).backend.slurm.ssh,
                             "backend.slurm.ssh", **extra)
    assert isinstance(ssh, config_mod.SshOptions)
    return ssh


def make_request(tmp_path: Path, task: dict, argv: list[str] | None = None,
                 params: dict | None = None) -> SubmitRequest:
    """A SubmitRequest for task, its task dir created under tmp_path."""
    task_dir = tmp_path / task["id"]
    task_dir.mkdir(parents=True, exist_ok=True)
    return SubmitRequest(task_id=task["id"], task=task, task_dir=task_dir,
                         worker_argv=argv or ["/bin/true"], backend_parameters=params or {})


class MotoServer:
    """A `moto_server -H 127.0.0.1 -p PORT` process (AWS APIs over real HTTP)."""

    def __init__(self, url: str, proc: subprocess.Popen):
        self.url = url
        self.proc = proc

    @classmethod
    def start(cls, env: dict[str, str] | None = None) -> MotoServer:
        """Start one; env is added to the process's environment (e.g. DOCKER_HOST)."""
        from tests.server_helpers import free_port

        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        if not Path(exe).exists():
            raise RuntimeError("moto_server missing: pip install 'moto[server]' "
                               "(setup.cfg test extra)")
        port = free_port()
        proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                                env={**os.environ, **FAKE_AWS_ENV, **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        for _ in range(150):
            try:
                requests.get(url, timeout=1)
                return cls(url, proc)
            except requests.RequestException:
                time.sleep(0.1)
        proc.kill()
        raise RuntimeError("moto_server did not start in 15 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    def client(self, service: str):
        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def use_docker(self, value: bool) -> None:
        """moto's documented switch between its Docker-running Batch and the simple one."""
        answer = requests.post(f"{self.url}/moto-api/config",
                               json={"batch": {"use_docker": value}}, timeout=10)
        answer.raise_for_status()

    def hold_jobs(self, hold: bool) -> None:
        """moto's documented state manager: a 'manual' transition needing a million ticks
        keeps Batch jobs in their current pre-run state (SUBMITTED for new ones); unset,
        jobs move on one state per tick (moto's default)."""
        if hold:
            requests.post(f"{self.url}/moto-api/state-manager/set-transition", timeout=10,
                          json={"model_name": "batch::job",
                                "transition": {"progression": "manual", "times": 1_000_000}}
                          ).raise_for_status()
        else:
            requests.post(f"{self.url}/moto-api/state-manager/unset-transition", timeout=10,
                          json={"model_name": "batch::job"}).raise_for_status()

    def reset(self) -> None:
        self.hold_jobs(False)
        requests.post(f"{self.url}/moto-api/reset", timeout=60).raise_for_status()
        self.use_docker(True)

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
                                   {"order": 1,
                                    "computeEnvironment": env["computeEnvironmentArn"]}])
        batch.register_job_definition(
            jobDefinitionName=DEFINITION, type="container",
            containerProperties={"image": "funnel-hpc-worker:test",
                                 "command": ["funnel", "worker", "run"],
                                 "resourceRequirements": [{"type": "VCPU", "value": "1"},
                                                          {"type": "MEMORY", "value": "512"}]})


class FakeRunner:
    """Answers commands from a table {first words: Result}; records what was run."""

    def __init__(self, answers: dict[tuple[str, ...], Result]):
        self.answers = answers
        self.calls = 0
        self.commands: list[list[str]] = []

    def run(self, argv: list[str], input: str | None = None) -> Result:
        self.calls += 1
        self.commands.append(list(argv))
        for words, result in self.answers.items():
            if tuple(argv[:len(words)]) == words:
                return result
        return Result(127, "", f"{argv[0]}: not faked")

    def close(self) -> None:
        pass
