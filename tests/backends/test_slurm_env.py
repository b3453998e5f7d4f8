"""What a Slurm job inherits from the gateway: its environment without FUNNEL_ variables
(the gateway's configuration, secrets included, stays with the gateway)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from funnel_hpc.backends.base import SubmitRequest
from funnel_hpc.backends.slurm import SlurmBackend
from funnel_hpc.core import config as config_mod
from tests.components import SLURM, needs


@pytest.mark.slurm
@needs(SLURM, shutil.which("sbatch") is not None, "not installed (scripts/setup/30-slurm.sh)")
def test_jobs_do_not_inherit_the_gateways_funnel_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("FUNNEL_DATABASE__URL", "postgresql+psycopg://u:SECRET@db/funnel")
    monkeypatch.setenv("GATEWAY_SITE_VARIABLE", "kept")
    config = config_mod.load(environ={}, overrides={"work_dir": str(tmp_path)})
    backend = SlurmBackend(config.backend.slurm, Path(config.work_dir))
    task_dir = tmp_path / "envtask"
    task_dir.mkdir()
    out = task_dir / "env.txt"
    job_id = backend.submit(SubmitRequest(
        task_id="envtask", task={"id": "envtask"}, task_dir=task_dir,
        worker_argv=["/bin/sh", "-c", f"env > {out}.tmp && mv {out}.tmp {out}"]))
    deadline = time.monotonic() + 60
    while not out.exists():
        assert time.monotonic() < deadline, subprocess.run(
            ["squeue", "-j", job_id], capture_output=True, text=True).stdout
        time.sleep(0.2)
    seen = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert "SECRET" not in out.read_text()
    assert not [name for name in seen if name.startswith("FUNNEL_")]
    assert seen["GATEWAY_SITE_VARIABLE"] == "kept" and seen["SLURM_JOB_ID"] == job_id
