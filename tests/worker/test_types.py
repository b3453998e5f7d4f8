"""Inputs and outputs without a `type` (issue 17.5): the worker finds out whether each is
a file or a directory, transfers it as such, and reports what it found as task metadata,
which the gateway shows as the item's `type`."""

from __future__ import annotations

import json

from funnel_hpc.gateway.store.task_views import full_task


def sh(script: str, **fields) -> dict:
    return {"image": "busybox", "command": ["sh", "-c", script], **fields}


def test_untyped_inputs_and_outputs_resolve_to_files_and_directories(harness):
    source = harness.data / "in-dir"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("a\n")
    (source / "sub" / "b.txt").write_text("b\n")
    (harness.data / "one.txt").write_text("one\n")
    out_dir, out_file = harness.data / "out-dir", harness.data / "out.txt"
    task = harness.task(
        inputs=[{"path": "/in/dir", "url": f"file://{source}"},
                {"path": "/in/one.txt", "url": f"file://{harness.data / 'one.txt'}"},
                {"path": "/in/inline.txt", "content": "x"},
                {"path": "/in/typed.txt", "url": f"file://{harness.data / 'one.txt'}",
                 "type": "FILE"}],
        outputs=[{"path": "/out/d2", "url": f"file://{out_dir}"},
                 {"path": "/out/f.txt", "url": f"file://{out_file}"}],
        executors=[sh("mkdir -p /out/d2/deep; cat /in/dir/sub/b.txt > /out/d2/deep/c.txt; "
                      "cat /in/dir/a.txt /in/one.txt > /out/f.txt")])
    run = harness.run(task)
    assert run.state == "COMPLETE", (run.stderr, run.system_logs)
    assert (out_dir / "deep" / "c.txt").read_text() == "b\n"
    assert out_file.read_text() == "a\none\n"
    metadata = run.fold.task_log["metadata"]
    assert json.loads(metadata["input_types"]) == {"0": "DIRECTORY", "1": "FILE", "2": "FILE"}
    assert json.loads(metadata["output_types"]) == {"0": "DIRECTORY", "1": "FILE"}
    # what GET shows: the types filled in, the typed one left as it was
    shown = full_task(task["id"], "COMPLETE", task, [{"metadata": metadata}], "now")
    assert [i.get("type") for i in shown["inputs"]] == ["DIRECTORY", "FILE", "FILE", "FILE"]
    assert [o["type"] for o in shown["outputs"]] == ["DIRECTORY", "FILE"]
    assert "type" not in task["outputs"][0]  # the stored spec is untouched


def test_an_untyped_output_that_is_missing_still_fails_by_name(harness):
    task = harness.task(outputs=[{"path": "/out/nothing", "url": f"file://{harness.data}/n"}],
                        executors=[sh("true")])
    run = harness.run(task)
    assert run.state == "SYSTEM_ERROR"
    assert "output file /out/nothing does not exist" in run.system_logs


def test_the_gateway_ignores_types_it_does_not_know():
    spec = {"inputs": [{"path": "/a", "url": "file:///a"}], "outputs": [{"path": "/b"}]}
    for found in ('{"0": "SOCKET"}', "not json", "[" * 100_000, '["FILE"]'):
        shown = full_task("t", "COMPLETE", spec, [{"metadata": {"input_types": found,
                                                                "output_types": found}}], "now")
        assert "type" not in shown["inputs"][0] and "type" not in shown["outputs"][0]
