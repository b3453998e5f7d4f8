"""`funnel render --array N`: the script an array of N such tasks gets, through the real
CLI; refused where the instance has no arrays."""

from __future__ import annotations

import json
import subprocess

import yaml

from tests.cli_helpers import TASK, funnel


def test_render_shows_the_array_script(tmp_path):
    task_file = tmp_path / "t.json"
    task_file.write_text(json.dumps({**TASK, "name": "x\n#SBATCH --evil",
                                     "resources": {"cpu_cores": 2}}))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"work_dir": str(tmp_path / "work")}))
    args = [str(task_file), "--config", str(config), "--backend", "slurm"]
    rendered = funnel(None, "render", *args, "--array", "100", "--task-id", "abc123")
    assert rendered.returncode == 0, rendered.stderr
    script = rendered.stdout
    assert "#SBATCH --array=0-99" in script and "#SBATCH --cpus-per-task=2" in script
    assert "#SBATCH --job-name=funnel-array-0000000000000000" in script
    assert f"{tmp_path / 'work' / 'arrays' / ('0' * 16)}" in script
    assert "abc123" not in script and "evil" not in script
    checked = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    plain = funnel(None, "render", *args, "--task-id", "abc123")  # without --array: one job
    assert plain.returncode == 0 and "#SBATCH --job-name=funnel-abc123" in plain.stdout
    for size, needle in (("1", "2 to 1000"), ("1001", "2 to 1000")):
        bad = funnel(None, "render", *args, "--array", size)
        assert bad.returncode == 1 and needle in bad.stderr, bad.stderr
    config.write_text(yaml.safe_dump({"work_dir": str(tmp_path / "work"),
                                      "backend": {"slurm": {"array_max": 1}}}))
    off = funnel(None, "render", *args, "--array", "5")
    assert off.returncode == 1 and "submits no job arrays" in off.stderr, off.stderr


def test_render_shows_grid_engine_pbs_and_htcondor_arrays(tmp_path):
    task_file = tmp_path / "t.json"
    task_file.write_text(json.dumps({**TASK, "name": "x\n#$ -evil"}))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"work_dir": str(tmp_path / "work")}))
    expected = {"gridengine": "qsub -t 1-7", "pbs": "qsub -J 0-6",
                "htcondor": "one cluster of 7 procs"}
    for kind, needle in expected.items():
        rendered = funnel(None, "render", str(task_file), "--config", str(config),
                          "--backend", kind, "--array", "7", "--task-id", "abc123")
        assert rendered.returncode == 0, (kind, rendered.stderr)
        assert needle in rendered.stderr, (kind, rendered.stderr)
        script = rendered.stdout
        assert "abc123" not in script and "evil" not in script, kind
        assert f"{tmp_path / 'work' / 'arrays' / ('0' * 16)}" in script, kind  # its list
        assert "funnel-array-" + "0" * 16 in script, kind
