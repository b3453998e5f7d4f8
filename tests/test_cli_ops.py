"""`funnel run`, several ids per task command, list formats, `config show` and `render`,
each through the real CLI subprocess (and a real server where one is involved)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess

import pytest
import yaml

from tests.cli_helpers import TASK, create, funnel
from tests.components import (
    BWRAP,
    BWRAP_REASON,
    SLURM,
    SLURM_REASON,
    bwrap_ready,
    needs,
    slurm_ready,
)
from tests.e2e_helpers import make_server
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for, wait_for_state


@pytest.fixture(scope="module")
def queued_server(databases, tmp_path_factory):
    """No reconciler: tasks stay QUEUED until canceled."""
    server = ServerProcess(tmp_path_factory.mktemp("cli-ops"), databases.new("sqlite")).start()
    yield server
    server.stop()


def test_get_cancel_wait_take_several_ids(queued_server):
    first, second = create(queued_server), create(queued_server)
    got = funnel(queued_server, "task", "get", first, second, "--view", "MINIMAL")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == [{"id": first, "state": "QUEUED"},
                                      {"id": second, "state": "QUEUED"}]
    one = json.loads(funnel(queued_server, "task", "get", first, "--view", "MINIMAL").stdout)
    assert one == {"id": first, "state": "QUEUED"}  # one id: the task itself, as before
    as_yaml = funnel(queued_server, "task", "get", first, "-o", "yaml")
    assert yaml.safe_load(as_yaml.stdout)["name"] == "ops"

    partly = funnel(queued_server, "task", "get", first, "nosuchtask", "--view", "MINIMAL")
    assert partly.returncode == 1 and "nosuchtask" in partly.stderr
    assert json.loads(partly.stdout) == [{"id": first, "state": "QUEUED"}]

    canceled = funnel(queued_server, "task", "cancel", first, second)
    assert canceled.returncode == 0, canceled.stderr
    assert canceled.stdout.split("\n")[:2] == [f"{first} cancel requested",
                                               f"{second} cancel requested"]
    waited = funnel(queued_server, "task", "wait", first, second, "--interval", "0.1")
    assert waited.returncode == 1  # ended, but not COMPLETE
    assert waited.stdout.splitlines() == [f"{first} CANCELED", f"{second} CANCELED"]


def test_list_pages_and_formats(queued_server):
    ids = [create(queued_server, name=f"pages-{i}") for i in range(3)]
    page1 = funnel(queued_server, "task", "list", "--name-prefix", "pages-", "--page-size", "2")
    first = json.loads(page1.stdout)
    assert [t["id"] for t in first["tasks"]] == ids[::-1][:2]
    page2 = funnel(queued_server, "task", "list", "--name-prefix", "pages-", "--page-size", "2",
                   "--page-token", first["next_page_token"], "-o", "yaml")
    second = yaml.safe_load(page2.stdout)
    assert [t["id"] for t in second["tasks"]] == [ids[0]] and not second.get("next_page_token")

    shown = funnel(queued_server, "task", "list", "--name-prefix", "pages-", "--page-size", "2",
                   "-o", "table")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATE", "CREATED", "DURATION"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[2], r[-1]) for r in rows] == [
        (ids[2], "pages-2", "QUEUED", "-"), (ids[1], "pages-1", "QUEUED", "-")]
    assert rows[0][3].count("-") == 2 and ":" in rows[0][4]  # "YYYY-MM-DD HH:MM:SS"
    assert "--page-token" in shown.stderr  # the next page's token, for people

    bad = funnel(queued_server, "task", "list", "--page-token", "garbage!")
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert "page_token" in bad.stderr


def test_run_prints_the_task_it_would_create(tmp_path):
    data = tmp_path / "file.txt"
    data.write_text("x")
    shown = funnel(None, "run", "md5sum $in > $out", "--image", "busybox", "--in",
                   "in=./file.txt", "--out", "out=./out.txt", "--stdout", "./md5.txt",
                   "--cpu", "2", "--ram", "4", "--disk", "1.5", "--name", "n", "--tag", "k=v",
                   "--env", "A=b", "--print", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    task = json.loads(shown.stdout)
    executor = task["executors"][0]
    assert executor["command"] == ["sh", "-c", "md5sum $in > $out"]
    assert executor["env"] == {"in": "/inputs/in/file.txt", "out": "/outputs/out/out.txt",
                               "A": "b"}
    assert task["inputs"] == [{"name": "in", "url": data.as_uri(),
                               "path": "/inputs/in/file.txt", "type": "FILE"}]
    assert {o["url"] for o in task["outputs"]} == {(tmp_path / "out.txt").as_uri(),
                                                   (tmp_path / "md5.txt").as_uri()}
    assert task["resources"] == {"cpu_cores": 2, "ram_gb": 4.0, "disk_gb": 1.5}
    assert task["tags"] == {"k": "v"} and task["name"] == "n"
    for args, needle in ((["--in", "in=./missing.txt"], "no such file"),
                         (["--in", "1x=./file.txt"], "NAME=VALUE"),
                         (["--env", "novalue"], "NAME=VALUE")):
        bad = funnel(None, "run", "true", *args, "--print", cwd=tmp_path)
        assert bad.returncode == 1 and needle in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


@needs(BWRAP, bwrap_ready(), BWRAP_REASON)
def test_run_round_trips_a_file(databases, tmp_path):
    server = make_server("local", tmp_path / "srv", databases.new("sqlite"))
    server.overrides["worker"]["allowed_dirs"] = [str(tmp_path / "data")]
    server.start()
    try:
        data = tmp_path / "data"
        data.mkdir()
        (data / "file.txt").write_bytes(b"round trip\n")
        done = funnel(server, "run", "md5sum $in | tee $out", "--image", "busybox",
                      "--in", "in=./file.txt", "--out", "out=./out.txt", "--stdout",
                      "./md5.txt", "--name", "roundtrip", "--wait", "--interval", "0.2",
                      cwd=data, timeout=180)
        assert done.returncode == 0, (done.stderr, server.log()[-3000:])
        task_id = done.stdout.strip()
        digest = hashlib.md5(b"round trip\n").hexdigest()
        assert (data / "out.txt").read_text().split()[0] == digest
        assert (data / "md5.txt").read_text().split()[0] == digest
        assert wait_for_state(server.api, task_id, "COMPLETE", timeout=10)["state"] == "COMPLETE"
        shown = funnel(server, "task", "list", "-o", "table")
        (row,) = [line.split() for line in shown.stdout.splitlines() if task_id in line]
        assert row[1:3] == ["roundtrip", "COMPLETE"], row
        assert re.fullmatch(r"\d+:\d\d(:\d\d)?", row[-1]), row  # the run time

        failed = funnel(server, "run", "exit 3", "--image", "busybox", "--wait",
                        "--interval", "0.2", timeout=180)
        assert failed.returncode == 1
        assert failed.stderr.strip().splitlines()[-1].endswith("ended EXECUTOR_ERROR")
    finally:
        server.stop()


def test_config_show_masks_secrets(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "work_dir": str(tmp_path / "work"),
        "database": {"url": "postgresql+psycopg://funnel:pw-db-123@db.example/funnel"},
        "auth": {"tokens": {"tok-abc-123": "alice"}, "users": {"bob": "pbkdf2:hash-456"},
                 "session_secret": "cookie-secret-789"},
        "worker": {"registries": {"docker.io": {"username": "u", "password": "reg-pass-0"}}},
        "backend": {"aws_batch": {"environment": {"AWS_SECRET_ACCESS_KEY": "aws-key-1"}}},
    }))
    shown = funnel(None, "config", "show", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    for secret in ("pw-db-123", "tok-abc-123", "hash-456", "cookie-secret-789", "reg-pass-0",
                   "aws-key-1"):
        assert secret not in shown.stdout
    merged = yaml.safe_load(shown.stdout)
    assert merged["database"]["url"] == "postgresql+psycopg://funnel:********@db.example/funnel"
    assert merged["auth"]["users"] == {"bob": "********"}
    assert merged["work_dir"] == str(tmp_path / "work")
    assert merged["server"]["http_port"] == 8000  # the defaults are merged in
    assert merged["worker"]["registries"]["docker.io"]["username"] == "u"

    (tmp_path / "bad.yaml").write_text("nosuchsection: {}\n")
    bad = funnel(None, "config", "show", "--config", str(tmp_path / "bad.yaml"))
    assert bad.returncode == 1 and "nosuchsection" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_config_show_prints_the_checked_configuration_or_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "work_dir": str(tmp_path / "work"), "server": {"host": "0.0.0.0", "http_port": 8123},
        "storage": {"s3": {"endpoints": {"arch": {"endpoint_url": "http://s3.lab"}}}}}))
    shown = funnel(None, "config", "show", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    effective = yaml.safe_load(shown.stdout)
    assert effective["server"]["public_url"] == "http://127.0.0.1:8123"  # derived at load
    assert effective["backend"]["aws_batch"]["server_url"] == "http://127.0.0.1:8123"
    assert effective["database"]["url"] == f"sqlite:///{tmp_path / 'work' / 'funnel.db'}"
    assert effective["storage"]["s3"]["endpoints"]["arch"]["multipart_chunk_mb"] == 16
    assert effective["auth"]["session_cookie_secure"] is False  # a setting, not a secret
    for text, message in (
            ("backend:\n  slurm:\n    command_timeout: sixty\n",
             'backend.slurm.command_timeout: expected a number, got "sixty"'),
            ("events:\n  publish: yes\n", 'events.publish: expected true or false, got "yes"'),
            ("worker:\n  allowed_dirs: /data\n",
             'worker.allowed_dirs: expected a list, got "/data"')):
        config.write_text(text)
        bad = funnel(None, "config", "show", "--config", str(config))
        assert bad.returncode == 1 and bad.stdout == ""
        assert bad.stderr.strip().splitlines() == [f"Error: {message}"]


def test_render_refuses_what_it_cannot_render(tmp_path):
    task_file = tmp_path / "t.json"
    task_file.write_text(json.dumps(TASK))
    for args, needle in ((["--backend", "local"], "submits no script"),
                         (["--backend", "nosuch"], "nosuch")):
        bad = funnel(None, "render", str(task_file), *args)
        assert bad.returncode == 1 and needle in bad.stderr, bad.stderr
    hostile = {**TASK, "resources": {"zones": ["a\n#SBATCH --uid=0"]}}
    bad = funnel(None, "render", "-", "--backend", "slurm", stdin=json.dumps(hostile))
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    invalid = funnel(None, "render", "-", "--backend", "slurm", stdin="{}")
    assert invalid.returncode == 1 and "executors" in invalid.stderr


def test_render_for_grid_engine_and_htcondor(tmp_path):
    task_file = tmp_path / "t.json"
    task_file.write_text(json.dumps({**TASK, "resources": {"cpu_cores": 2}}))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"work_dir": str(tmp_path / "work")}))
    args = [str(task_file), "--config", str(config), "--task-id", "abc123"]
    gridengine = funnel(None, "render", *args, "--backend", "gridengine")
    assert gridengine.returncode == 0, gridengine.stderr
    assert "#$ -N funnel-abc123" in gridengine.stdout and "-pe smp 2" in gridengine.stdout
    htcondor = funnel(None, "render", *args, "--backend", "htcondor")
    assert htcondor.returncode == 0, htcondor.stderr
    description, wrapper = htcondor.stdout.split("==> htcondor.sh <==\n")
    assert description.startswith("==> htcondor.sub <==\n")
    assert f"{tmp_path / 'work' / 'abc123' / 'htcondor.sh'}" in description
    assert "funnel_hpc.worker" in wrapper


@pytest.mark.slurm
@needs(SLURM, slurm_ready(), SLURM_REASON)
def test_render_equals_the_script_sbatch_received(databases, tmp_path):
    server = make_server("slurm", tmp_path / "srv", databases.new("sqlite")).start()
    task = {"name": "render me", "executors": [{"image": "busybox",
                                                "command": ["sh", "-c", "sleep 60"]}],
            "resources": {"cpu_cores": 1, "ram_gb": 0.25}}
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(task))
    task_id = create(server, **task)
    try:
        job_id = wait_for(lambda: _job_id(server, task_id), 60, "a Slurm job for the task",
                          detail=server.log)
        received = subprocess.run(["scontrol", "write", "batch_script", job_id, "-"],
                                  capture_output=True, text=True, timeout=30)
        assert received.returncode == 0, received.stderr
        rendered = funnel(None, "render", str(task_file), "--config", str(server.config_path),
                          "--task-id", task_id)
        assert rendered.returncode == 0, rendered.stderr
        assert rendered.stdout == received.stdout
        assert rendered.stdout == (server.work_dir / task_id / "slurm.sh").read_text()
        assert f"#SBATCH --job-name=funnel-{task_id}" in rendered.stdout
    finally:
        funnel(server, "task", "cancel", task_id)
        server.stop()


def _job_id(server, task_id: str) -> str | None:
    got = funnel(server, "task", "get", task_id)
    assert got.returncode == 0, got.stderr
    logs = json.loads(got.stdout).get("logs") or []
    return (logs[-1].get("metadata") or {}).get("job_id") if logs else None
