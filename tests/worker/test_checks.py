"""Hostile or malformed tasks are refused before anything runs; the pieces the runner is
built of."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from funnel_hpc.core.events import EventFold, read_event_log
from funnel_hpc.worker.drivers import DriverError, Drivers
from funnel_hpc.worker.storage import StorageError, inside
from funnel_hpc.worker.storage.beneath import clone_or_copy
from tests.server_helpers import clean_env, funnel_argv
from tests.worker_helpers import sh


def refused(run, text: str) -> None:
    assert run.state == "SYSTEM_ERROR" and run.exit_code == 2, run.stderr
    assert text in run.system_logs
    assert run.fold.task_log["logs"] == []  # no executor started


@pytest.mark.parametrize("path", ["/in/../../../../tmp/escaped", "relative/x", "/in/a\nb"])
def test_container_paths_must_be_absolute_without_dotdot(harness, path):
    run = harness.run(harness.task(inputs=[{"path": path, "content": "x"}],
                                   executors=[sh("true")]))
    refused(run, "container path")
    assert not Path("/tmp/escaped").exists()


@pytest.mark.parametrize("name", ["A=B", "-e", "1ABC", "BAD NAME"])
def test_environment_variable_names_are_checked(harness, name):
    run = harness.run(harness.task(executors=[sh("true", env={name: "v"})]))
    refused(run, "invalid environment variable name")


def test_an_image_cannot_be_an_engine_option(harness):
    run = harness.run(harness.task(executors=[{"image": "--privileged", "command": ["true"]}]))
    refused(run, "invalid image name")


def test_wildcard_output_needs_a_matching_path_prefix(harness):
    url = f"file://{harness.data}/w"
    run = harness.run(harness.task(outputs=[{"path": "/out/*.txt", "url": url}],
                                   executors=[sh("true")]))
    refused(run, "needs path_prefix")
    run = harness.run(harness.task(outputs=[{"path": "/out/*.txt", "path_prefix": "/other",
                                             "url": url}], executors=[sh("true")]))
    refused(run, "is not a prefix")


def test_directory_input_with_a_symlink_out_of_allowed_dirs_is_refused(harness):
    (harness.data / "ref").mkdir()
    (harness.data / "ref" / "ok.txt").write_text("ok")
    (harness.data / "ref" / "shadow").symlink_to("/etc/hostname")
    run = harness.run(harness.task(
        inputs=[{"path": "/in/ref", "url": f"file://{harness.data / 'ref'}",
                 "type": "DIRECTORY"}],
        executors=[sh("cat /in/ref/shadow")]))
    refused(run, "outside the allowed directories")
    assert not run.host("/in/ref/shadow").exists()


def test_stdout_into_a_symlink_planted_by_an_earlier_executor_is_refused(harness):
    target = harness.data / "victim.txt"
    target.write_text("untouched")
    run = harness.run(harness.task(
        volumes=["/out"],
        executors=[sh(f"ln -s {target} /out/log"),
                   sh("echo overwritten", stdout="/out/log")]))
    assert run.state == "SYSTEM_ERROR"
    assert "outside the task directory" in run.system_logs
    assert target.read_text() == "untouched"
    assert len(run.fold.task_log["logs"]) == 1


@pytest.mark.parametrize("entry", [funnel_argv("worker", "run"),
                                   [sys.executable, "-m", "funnel_hpc.worker", "run"]],
                         ids=["funnel-worker-run", "python-m-worker"])
def test_task_id_cannot_name_a_directory_elsewhere(tmp_path, entry):
    task_file = tmp_path / "t.json"
    task_file.write_text(json.dumps({"id": "../escape", "executors": [sh("true")]}))
    proc = subprocess.run([*entry, "--task-file", str(task_file),
                           "--workdir", str(tmp_path / "work")],
                          env=clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "Error: invalid task id '../escape'"
    assert not (tmp_path / "escape").exists()
    proc = subprocess.run([*entry, "--task-id", "abc"], env=clean_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "Error: --task-id needs --server"


# ---- pieces ----

def drivers(**worker) -> Drivers:
    from funnel_hpc.core.config import load

    config = load(None, environ={}, overrides={"worker": worker} if worker else None)
    return Drivers(config.for_worker(), Path("/nonexistent"))


def test_engine_template_expands_to_one_argv(monkeypatch):
    monkeypatch.setattr("worker.drivers.shutil.which", lambda name: f"/usr/bin/{name}")
    inv = drivers().invocation("docker", "alpine:3", ["sh", "-c", "echo $X; rm -rf /"],
                               {"X": "a b"}, "/data", [("/w/t/files/data", "/data")])
    assert inv.argv == ["docker", "run", "--rm", "-i", "--network", "host",
                        "-v", "/w/t/files/data:/data", "-e", "X=a b", "-w", "/data",
                        "alpine:3", "sh", "-c", "echo $X; rm -rf /"]


def test_bind_syntax_separators_are_refused_for_engines_and_proot(monkeypatch):
    monkeypatch.setattr("worker.drivers.shutil.which", lambda name: f"/usr/bin/{name}")
    for name in ("apptainer", "proot"):
        with pytest.raises(DriverError, match="':' or ','"):
            drivers().invocation(name, "busybox", ["true"], {}, None,
                                 [("/w/t/files/a,/etc:/x", "/a,/etc:/x")])


def test_remote_listing_names_cannot_climb_out(tmp_path):
    assert inside(tmp_path, "a/b.txt", "s3://b/k") == tmp_path / "a" / "b.txt"
    for bad in ("../x", "a/../../x", "/etc/passwd", ""):
        with pytest.raises(StorageError, match="refusing"):
            inside(tmp_path, bad, "s3://b/k")


def test_clone_or_copy_keeps_the_bytes(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 4096)
    clone_or_copy(src, tmp_path / "dst.bin")
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()


def test_fold_ignores_repeats_and_keeps_the_first_terminal_state(tmp_path):
    fold = EventFold()
    events = [
        {"seq": 1, "type": "state", "state": "INITIALIZING"},
        {"seq": 2, "type": "executor_start", "index": 0, "start_time": "t0"},
        {"seq": 2, "type": "system_log", "message": "a repeat of seq 2"},
        {"seq": 3, "type": "executor_end", "index": 0, "end_time": "t1", "exit_code": 0,
         "stdout": "o", "stderr": ""},
        {"seq": 4, "type": "state", "state": "CANCELED"},
        {"seq": 5, "type": "state", "state": "COMPLETE"},
    ]
    for event in events:
        fold.apply(event)
    assert fold.state == "CANCELED" and fold.terminal and fold.last_seq == 5
    assert fold.task_log["system_logs"] == []
    assert fold.task_log["logs"] == [{"start_time": "t0", "end_time": "t1", "exit_code": 0,
                                      "stdout": "o", "stderr": ""}]
    missing = read_event_log(tmp_path / "none.jsonl")
    assert missing.state is None and missing.last_seq == 0 and not missing.terminal


def test_a_finished_task_is_not_run_again(harness):
    task = harness.task(executors=[sh("echo once")])
    first = harness.run(task)
    assert first.state == "COMPLETE"
    lines = (first.task_dir / "events.jsonl").read_text()
    again = harness.run(task)
    assert again.exit_code == 0 and again.state == "COMPLETE"
    assert (first.task_dir / "events.jsonl").read_text() == lines  # nothing appended
