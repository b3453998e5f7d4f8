"""worker.keep_workdir (issue 18.3): what an ended task leaves in its directory."""

from __future__ import annotations

import os

KEPT = {"events.jsonl"}  # and whatever the backend wrote (task.json, token, local.pid)


def sh(script: str, **fields) -> dict:
    return {"image": "busybox", "command": ["sh", "-c", script], **fields}


def test_never_removes_the_files_of_a_complete_task_after_upload(harness):
    out = harness.data / "out.txt"
    task = harness.task(
        inputs=[{"path": "/in/in.txt", "content": "staged\n"}],
        outputs=[{"path": "/out/out.txt", "url": f"file://{out}"}],
        executors=[sh("mkdir -p /scratch/deep/er; chmod 0 /scratch/deep; "
                      "cat /in/in.txt > /out/out.txt")],
        volumes=["/scratch"])
    run = harness.run(task, harness.config(keep_workdir="never"))
    assert run.state == "COMPLETE", (run.stderr, run.system_logs)
    assert out.read_text() == "staged\n"  # uploaded before the removal
    assert not (run.task_dir / "files").exists()
    assert set(os.listdir(run.task_dir)) == KEPT
    assert "cannot remove" not in run.system_logs
    assert run.fold.task_log["outputs"][0]["size_bytes"] == "7"


def test_on_failure_keeps_a_failed_tasks_files(harness):
    task = harness.task(executors=[sh("echo data > /work/partial; exit 3")],
                        volumes=["/work"])
    run = harness.run(task, harness.config(keep_workdir="on_failure"))
    assert run.state == "EXECUTOR_ERROR", run.stderr
    assert run.host("/work/partial").read_text() == "data\n"


def test_on_failure_removes_a_complete_tasks_files(harness):
    task = harness.task(executors=[sh("echo x > /work/f")], volumes=["/work"])
    run = harness.run(task, harness.config(keep_workdir="on_failure"))
    assert run.state == "COMPLETE", run.stderr
    assert not (run.task_dir / "files").exists()


def test_always_keeps_everything(harness):
    task = harness.task(executors=[sh("echo x > /work/f")], volumes=["/work"])
    run = harness.run(task, harness.config(keep_workdir="always"))
    assert run.state == "COMPLETE", run.stderr
    assert run.host("/work/f").read_text() == "x\n"
