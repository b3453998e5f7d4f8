"""A worker runs one task per scheduler job, so what it imports at start is paid by every
job (benchmarks: "what the worker costs a Slurm job"). These modules once cost a third of
a trivial task's CPU time; a worker that needs none of their features must not load them,
and it never loads the gateway's, the backends' or the gRPC stubs' modules."""

from __future__ import annotations

import json
import subprocess
import sys

from funnel_hpc.core import config as config_mod
from funnel_hpc.worker.images import ensure_rootfs
from funnel_hpc.worker.seccomp import filter_file
from tests.server_helpers import clean_env, worker_image_config

NOT_AT_START = ("typing", "dataclasses", "inspect", "hashlib", "hmac", "secrets", "socket",
                "datetime", "yaml", "click", "requests", "boto3")

# The worker runs alone on compute nodes: nothing of the gateway, backends or proto.
OTHER_LAYERS = ("funnel_hpc.gateway", "funnel_hpc.backends", "funnel_hpc.proto")

PROBE = f"""
import json, sys
from funnel_hpc.worker.main import main
code = main(sys.argv[1:])
loaded = [m for m in {NOT_AT_START!r} if m in sys.modules]
loaded += [m for m in sys.modules if m.startswith({OTHER_LAYERS!r})]
print(json.dumps({{"exit": code, "loaded": loaded}}))
"""


def test_a_trivial_task_runs_without_the_costly_imports(harness, tmp_path):
    image_config = worker_image_config()
    # What is measured is a start from a cached image: a cold pull needs hashlib and
    # http.client (socket, datetime), and the session's cache is empty if this runs first.
    ensure_rootfs("busybox", image_config["image_cache"], image_config["registries"])
    config = config_mod.load(environ={}, overrides={"worker": {
        "container_driver": "bwrap", **image_config}})
    # likewise the seccomp filter: built (pyseccomp imports typing) once per work dir
    filter_file(str(tmp_path / "work"), "default")
    config_file = tmp_path / "worker-config.json"  # as the reconciler writes it
    config_file.write_text(json.dumps(config_mod.worker_sections(config)))
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps({"id": "cheap1", "executors": [
        {"image": "busybox", "command": ["true"]}]}))
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "run", "--task-file", str(task_file),
         "--workdir", str(tmp_path / "work"), "--config", str(config_file)],
        capture_output=True, text=True, env=clean_env(), timeout=60)
    answer = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer == {"exit": 0, "loaded": []}, proc.stderr
