"""The small things an admin trips on (issue #27 item 6), through the real CLI: `admin du`
on a missing work dir, orphaned directories without a task.json, `render --backend
htcondor` without the bindings, and the shipped systemd units."""

from __future__ import annotations

import configparser
import json
import subprocess

import yaml

from funnel_hpc.core import config as config_mod
from funnel_hpc.core.config import PACKAGE_ROOT
from funnel_hpc.gateway.cli.server import private_state
from funnel_hpc.gateway.store.retention import disk_usage
from funnel_hpc.gateway.web.app import make_service
from tests.server_helpers import clean_env, funnel_argv


def funnel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(funnel_argv(*args), env=clean_env(), capture_output=True, text=True,
                          timeout=120)


def write_config(path, **values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_du_on_a_missing_work_dir_fails_in_one_line_and_creates_nothing(tmp_path):
    missing = tmp_path / "no-such-dir"
    config = write_config(tmp_path / "c.yaml", work_dir=str(missing))
    done = funnel("admin", "du", "--config", config)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "does not exist" in done.stderr, done.stderr
    assert not missing.exists()


def test_du_on_a_work_dir_without_its_database_creates_none(tmp_path):
    config = write_config(tmp_path / "c.yaml", work_dir=str(tmp_path))
    done = funnel("admin", "du", "--config", config)
    assert done.returncode == 1 and "does not exist" in done.stderr, done.stderr
    assert not (tmp_path / "funnel.db").exists()


def test_du_counts_task_dirs_without_task_json_as_orphans(tmp_path):
    config = config_mod.load(environ={}, overrides={"work_dir": str(tmp_path / "work")})
    private_state(config)
    service = make_service(config)
    task_id = service.create({"executors": [{"image": "busybox", "command": ["true"]}]})
    work = tmp_path / "work"
    (work / task_id).mkdir()
    (work / "0123456789abcdef0123").mkdir()  # an id this gateway made, row gone, no task.json
    (work / "0123456789abcdef0123" / "stdout").write_bytes(b"x" * 10)
    (work / "image-cache").mkdir()  # never a task dir
    usage = disk_usage(service.engine, work)
    assert usage["orphaned"] == {"tasks": 0, "dirs": 1, "bytes": 10}
    assert usage["QUEUED"]["dirs"] == 1 and usage["other"]["dirs"] == 1
    done = funnel("admin", "du", "-o", "json", "--config",
                  write_config(tmp_path / "c.yaml", work_dir=str(work)))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["usage"]["orphaned"]["dirs"] == 1


def test_render_htcondor_without_the_bindings_fails_in_one_line(tmp_path):
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"executors": [{"image": "busybox", "command": ["true"]}]}))
    config = write_config(tmp_path / "c.yaml", work_dir=str(tmp_path),
                          backend={"htcondor": {"bindings": "no_such_htcondor_module"}})
    done = funnel("render", "--backend", "htcondor", "--config", config, str(task))
    assert done.returncode == 1, done.stdout
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert "cannot import 'no_such_htcondor_module'" in done.stderr


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(PACKAGE_ROOT / "conf" / name)
    return parser


def test_units_may_write_only_the_state_dir_and_point_at_the_docs():
    for name in ("funnel-server.service", "funnel-reconcile.service"):
        parsed = unit(name)
        assert parsed["Service"]["ProtectSystem"] == "strict", name
        assert parsed["Service"]["ReadWritePaths"] == "/var/lib/funnel", name
        assert parsed["Unit"]["Documentation"].endswith("/docs"), name
        assert "ga4gh/task-execution-schemas" not in parsed["Unit"]["Documentation"]
        assert "funnel-hpc" in (PACKAGE_ROOT / "conf" / name).read_text()
