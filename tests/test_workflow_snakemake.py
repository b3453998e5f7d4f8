"""Snakemake end to end: the latest Snakemake with snakemake-executor-plugin-tes and
snakemake-storage-plugin-s3 runs a 2-rule workflow against a real server (local backend,
reconciler on), each job a TES task whose executor runs in the workflow image of
scripts/setup/46-workflow-image.sh, pulled from the test registry and run under bwrap;
inputs, outputs and the workflow's sources live on a real moto S3 server.

The client runs in its own virtualenv (made once per session under pytest's tmp): the
plugin pins py-tes 0.4.2, which needs `six` without declaring it, and the client's
Snakemake must be the image's (the jobs run the client's command line with the image's
Snakemake), read from the image's label. Cost, measured on 2 cores: ~75 s, of which ~40 s
make the venv and 40 s are the plugin's wait before it first asks about its jobs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.components import need
from tests.image_helpers import registry_answers
from tests.server_helpers import TEST_REGISTRY, TEST_REGISTRY_CA, ServerProcess, clean_env

pytestmark = [pytest.mark.registry, pytest.mark.slow]

IMAGE_REPOSITORY = "funnel/snakemake"
IMAGE_TAG = "1"
IMAGE = f"{TEST_REGISTRY}/{IMAGE_REPOSITORY}:{IMAGE_TAG}"
SNAKEMAKE_LABEL = "org.funnel-hpc.snakemake.version"
S3_PLUGIN_LABEL = "org.funnel-hpc.snakemake-storage-plugin-s3.version"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
BUCKET = "workflow"
# Longest a whole workflow run may take before the test gives up on it (a bound, not a
# wait: the run normally ends in under a minute, a cold image pull included).
RUN_TIMEOUT = 1500

# hello checks it runs in the image (/opt/snakemake is not on the host), asking 1 GB
# (ram_gb 1: on the local backend an address-space limit around the job's Snakemake);
# shout is Python code of the Snakefile run by the image's Snakemake.
SNAKEFILE = """\
rule all:
    input: "shout.txt"

rule hello:
    output: "hello.txt"
    resources: mem_mb=1000
    shell: "test -x /opt/snakemake/bin/snakemake && echo hello from the image > {output}"

rule shout:
    input: "hello.txt"
    output: "shout.txt"
    run:
        with open(input[0]) as source, open(output[0], "w") as target:
            target.write(source.read().upper())
"""


def unavailable(reason: str) -> None:
    """Skip here, fail under CI (scripts/test.sh sets everything up)."""
    need("the Snakemake workflow set-up", False, reason)


def image_labels() -> dict[str, str]:
    """The workflow image's config labels, read from the registry (empty: not pushed)."""
    # verify per request: a session's verify loses to $REQUESTS_CA_BUNDLE
    base = f"https://{TEST_REGISTRY}/v2/{IMAGE_REPOSITORY}"
    manifest = requests.get(f"{base}/manifests/{IMAGE_TAG}", headers={"Accept": OCI_MANIFEST},
                            verify=TEST_REGISTRY_CA, timeout=30)
    if manifest.status_code == 404:
        return {}
    manifest.raise_for_status()
    config = requests.get(f"{base}/blobs/{manifest.json()['config']['digest']}",
                          verify=TEST_REGISTRY_CA, timeout=30)
    config.raise_for_status()
    return config.json().get("config", {}).get("Labels") or {}


@pytest.fixture(scope="session")
def workflow_image() -> dict[str, str]:
    """The labels of the pushed workflow image (skipped, or failed under CI, without it)."""
    if not registry_answers(TEST_REGISTRY) or not Path(TEST_REGISTRY_CA).exists():
        unavailable(f"no registry on {TEST_REGISTRY} (scripts/setup/45-registry.sh)")
    labels = image_labels()
    if SNAKEMAKE_LABEL not in labels:
        unavailable(f"{IMAGE} not pushed (scripts/setup/46-workflow-image.sh)")
    return labels


@pytest.fixture(scope="session")
def snakemake_bin(workflow_image, tmp_path_factory) -> Path:
    """bin/ of a virtualenv with the image's Snakemake and S3 plugin, the latest TES
    executor plugin, and six."""
    venv = tmp_path_factory.mktemp("snakemake-client") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    packages = [f"snakemake=={workflow_image[SNAKEMAKE_LABEL]}",
                f"snakemake-storage-plugin-s3=={workflow_image[S3_PLUGIN_LABEL]}",
                "snakemake-executor-plugin-tes", "six"]
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                           *packages], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        unavailable(f"cannot install {packages}: {done.stderr[-1500:]}")
    return venv / "bin"


def make_bucket(moto_url: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing",
                 ).create_bucket(Bucket=BUCKET)


def read_object(moto_url: str, key: str) -> str:
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()


def start_server(work: Path, db_url: str, moto_url: str) -> ServerProcess:
    """Local backend, reconciler on, bwrap executors; S3 set for the worker too (the
    plugin's tasks move no files themselves: the jobs' Snakemake does)."""
    return ServerProcess(work, db_url, reconcile=True, overrides={
        "reconciler": {"interval_seconds": 0.5},
        "worker": {"container_driver": "bwrap", "poll_server_seconds": 1},
        "storage": {"s3": {"endpoint_url": moto_url, "access_key_id": "testing",
                           "secret_access_key": "testing"}},
    }).start()


def snakemake_argv(bin_dir: Path, server: ServerProcess, moto_url: str) -> list[str]:
    return [str(bin_dir / "snakemake"), "--executor", "tes", "--tes-url", server.url,
            "--jobs", "2", "--container-image", IMAGE,
            "--default-storage-provider", "s3", "--default-storage-prefix", f"s3://{BUCKET}/run",
            "--storage-s3-endpoint-url", moto_url, "--storage-s3-access-key", "testing",
            "--storage-s3-secret-key", "testing",
            "--seconds-between-status-checks", "2", "--printshellcmds", "--nocolor"]


def test_snakemake_two_rules_on_s3(workflow_image, snakemake_bin, moto_server, databases,
                                   tmp_path):
    moto_server.reset()
    make_bucket(moto_server.url)
    server = start_server(tmp_path / "srv", databases.new("sqlite"), moto_server.url)
    workflow = tmp_path / "workflow"
    workflow.mkdir()
    (workflow / "Snakefile").write_text(SNAKEFILE)
    # The plugin prints $GITHUB_WORKSPACE/funnel.log when a task ends in an error state
    # (and crashes without it): point it at the server's log.
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (workspace / "funnel.log").symlink_to(server.log_path)
    env = clean_env(PATH=f"{snakemake_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                    GITHUB_WORKSPACE=str(workspace),
                    XDG_CACHE_HOME=str(tmp_path / "cache"))
    try:
        done = subprocess.run(snakemake_argv(snakemake_bin, server, moto_server.url),
                              cwd=workflow, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT)
        tasks = requests.get(server.api + "/tasks", params={"view": "FULL"},
                             timeout=30).json()["tasks"]
    finally:
        server.stop()
    report = f"snakemake said:\n{done.stderr[-6000:]}\nserver log:\n{server.log()[-4000:]}"
    assert done.returncode == 0, report
    by_name = {task["name"].split(".")[1]: task for task in tasks}
    assert sorted(by_name) == ["hello", "shout"], tasks
    assert {task["state"] for task in tasks} == {"COMPLETE"}
    assert by_name["hello"]["resources"]["ram_gb"] == 1
    assert by_name["hello"]["executors"][0]["image"] == IMAGE
    assert read_object(moto_server.url, "run/shout.txt") == "HELLO FROM THE IMAGE\n", report
    assert read_object(moto_server.url, "run/hello.txt") == "hello from the image\n"
