"""The built wheel, installed alone in a clean virtualenv, serves a task to COMPLETE.

Nothing of the checkout is on that venv's path: the default config, the templates, the
migrations and the dashboard come from the wheel. google-cloud-storage is installed beside
it because it pulls proto-plus, whose import name is the top-level `proto` that
funnel-hpc's own stubs once used.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.server_helpers import REPO, ServerProcess
from tests.waiting import wait_for_state

pytestmark = pytest.mark.slow


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist", REPO)
    wheels = list((tmp / "dist").glob("funnel_hpc-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "pip", "install", "-q", wheels[0], "google-cloud-storage")
    return venv


def test_wheel_holds_package_data_and_no_top_level_clash(wheel_venv: Path, tmp_path: Path):
    python = wheel_venv / "bin" / "python"
    out = run(python, "-c", "\n".join([
        "import proto, funnel_hpc.proto.tes_pb2 as pb",  # proto-plus and our stubs, side by side
        "from funnel_hpc.core import config",
        "import funnel_hpc.gateway.store.db as db",
        "print(proto.__file__); print(config.DEFAULT_CONFIG); print(config.TEMPLATES_DIR)",
        "print(db.MIGRATIONS_DIR)",
        "print(pb.Task.DESCRIPTOR.full_name)",
    ]), cwd=tmp_path)
    proto_file, default_config, templates, migrations, task_type = out.split()
    assert "proto_plus" in proto_file or "/proto/" in proto_file
    site = str(wheel_venv)
    for path in (default_config, templates, migrations):
        assert path.startswith(site), f"{path} is not from the installed wheel"
    assert Path(default_config).is_file()
    assert (Path(templates) / "slurm.sh.j2").is_file()
    assert (Path(templates) / "dashboard" / "tasks.html").is_file()
    assert list(Path(migrations).glob("versions/0001_*.py"))
    assert task_type == "tes.Task"
    for top in ("gateway", "backends", "worker", "core"):
        assert not (Path(default_config).parents[2] / top).exists(), f"top-level {top} installed"


def test_task_completes_from_the_installed_wheel(wheel_venv: Path, tmp_path: Path):
    server = ServerProcess(tmp_path / "work", "", reconcile=True,
                           funnel=[str(wheel_venv / "bin" / "funnel")], cwd=tmp_path,
                           overrides={"reconciler": {"interval_seconds": 0.2}}).start()
    try:
        task = {"name": "from-the-wheel",
                "executors": [{"image": "busybox", "command": ["echo", "hello wheel"]}]}
        task_id = requests.post(server.api + "/tasks", json=task, timeout=10).json()["id"]
        got = wait_for_state(server.api, task_id, ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"),
                             timeout=120, detail=server.log)
        assert got["state"] == "COMPLETE", (got, server.log())
        assert got["logs"][-1]["logs"][0]["stdout"] == "hello wheel\n"
        assert requests.get(server.url + "/", timeout=10).status_code in (200, 302)
    finally:
        server.stop()
