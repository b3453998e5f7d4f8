"""Paths directly under `/` (issue 17.2): a file there is bound alone (the root itself is
never bound), with every driver's sandbox over a real image (bwrap here)."""

from __future__ import annotations

import json

import pytest

from funnel_hpc.worker.paths import check_container_path


def sh(script: str, **fields) -> dict:
    return {"image": "busybox", "command": ["sh", "-c", script], **fields}


def test_inputs_outputs_and_streams_directly_under_root(harness):
    (harness.data / "in.txt").write_text("from a url\n")
    tree = harness.data / "tree"
    tree.mkdir()
    (tree / "leaf.txt").write_text("leaf\n")
    out, log = harness.data / "out.txt", harness.data / "log.txt"
    task = harness.task(
        inputs=[{"path": "/in.txt", "url": f"file://{harness.data / 'in.txt'}"},
                {"path": "/inline.txt", "content": "inline\n"},
                {"path": "/tree", "url": f"file://{tree}"}],  # untyped: a directory
        outputs=[{"path": "/out.txt", "url": f"file://{out}"},
                 {"path": "/log.txt", "url": f"file://{log}"}],
        executors=[sh("cat /in.txt /inline.txt /tree/leaf.txt > /out.txt; echo to-stdout",
                      stdout="/log.txt")])
    run = harness.run(task)
    assert run.state == "COMPLETE", (run.stderr, run.system_logs)
    assert out.read_text() == "from a url\ninline\nleaf\n"
    assert log.read_text() == "to-stdout\n"
    assert json.loads(run.fold.task_log["metadata"]["input_types"])["2"] == "DIRECTORY"
    # the image's own root entries are still there beside the bound files
    assert run.executor(0)["exit_code"] == 0


def test_an_output_under_root_nobody_wrote_does_not_exist(harness):
    task = harness.task(outputs=[{"path": "/never.txt", "url": f"file://{harness.data}/n"}],
                        executors=[sh("ls / > /dev/null")])
    run = harness.run(task)
    assert run.state == "SYSTEM_ERROR"
    assert "output file /never.txt does not exist" in run.system_logs
    assert not (harness.data / "n").exists()


def test_an_empty_output_under_root_that_was_written_is_uploaded(harness):
    target = harness.data / "empty.txt"
    task = harness.task(outputs=[{"path": "/empty.txt", "url": f"file://{target}"}],
                        executors=[sh("sleep 0.05; : > /empty.txt")])
    run = harness.run(task)
    assert run.state == "COMPLETE", run.system_logs
    assert target.read_text() == ""


@pytest.mark.parametrize("volume", ["/", "//", "/./"])
def test_a_volume_at_root_is_refused_by_name(harness, volume):
    run = harness.run(harness.task(volumes=[volume], executors=[sh("true")]))
    assert run.state == "SYSTEM_ERROR"
    assert "root directory" in run.system_logs


def test_a_leading_double_slash_is_one_slash():
    assert check_container_path("//data/x") == "/data/x"
    assert check_container_path("//") == "/"
