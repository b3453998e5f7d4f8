"""worker.scratch_dir (issue 19.1): a task's files live in node-local scratch, outputs are
uploaded from there, scratch is emptied at the end whatever the outcome."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from funnel_hpc.worker.scratch import Scratch, ScratchError, Unset, expand
from tests.hostile_helpers import make_user, remove_user, start_swap_loop
from tests.waiting import wait_for
from tests.worker_helpers import need, sh

SCRATCH_VAR = "TEST_NODE_SCRATCH"  # not FUNNEL_...: those override config


def scratch_config(harness, **worker):
    return harness.config(scratch_dir=f"${{{SCRATCH_VAR}}}/node", **worker)


def test_a_task_runs_in_scratch_and_leaves_nothing_there(harness, tmp_path):
    scratch = tmp_path / "scratch"
    out = harness.data / "out.txt"
    task = harness.task(
        inputs=[{"path": "/in/in.txt", "content": "staged\n"}],
        outputs=[{"path": "/out/out.txt", "url": f"file://{out}"}],
        volumes=["/work"],
        executors=[sh("echo temporary > /work/tmp.dat; "
                      "while [ ! -e /work/go ]; do sleep 0.05; done; "
                      "cat /in/in.txt /work/tmp.dat > /out/out.txt", workdir="/work")])
    proc = harness.start(task, scratch_config(harness, keep_workdir="on_failure"),
                         extra_env={SCRATCH_VAR: str(scratch)})
    try:
        # the executor's temporary file is in scratch, and only there, while it runs
        task_dir = harness.workdir / task["id"]
        events = task_dir / "events.jsonl"
        work = wait_for(lambda: next((scratch / "node").glob("funnel-task1-*/files/work/tmp.dat"),
                                     None), 90, "the executor's file in scratch",
                        detail=lambda: events.read_text() if events.exists() else "").parent
        assert not (task_dir / "files").exists()
        assert not any(path.name == "tmp.dat" for path in task_dir.rglob("*"))
        (work / "go").touch()
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    from funnel_hpc.core.events import read_event_log

    fold = read_event_log(task_dir / "events.jsonl")
    assert fold.state == "COMPLETE", (err, fold.task_log["system_logs"])
    assert out.read_text() == "staged\ntemporary\n"
    assert fold.task_log["outputs"][0]["size_bytes"] == str(len("staged\ntemporary\n"))
    assert os.listdir(scratch / "node") == []
    assert not (task_dir / "files").exists()


def test_a_failed_task_is_removed_from_scratch_and_kept_in_the_task_dir(harness, tmp_path):
    scratch = tmp_path / "scratch"
    task = harness.task(volumes=["/work"],
                        executors=[sh("mkdir -p /work/deep; echo data > /work/deep/partial; "
                                      "chmod 0 /work/deep; exit 3")])
    run = harness.run(task, scratch_config(harness, keep_workdir="on_failure"),
                      extra_env={SCRATCH_VAR: str(scratch)})
    assert run.state == "EXECUTOR_ERROR", (run.stderr, run.system_logs)
    assert os.listdir(scratch / "node") == []
    assert "worker.scratch_dir" not in run.system_logs
    assert run.host("/work/deep/partial").read_text() == "data\n"  # copied back


def test_a_system_error_still_empties_scratch(harness, tmp_path):
    scratch = tmp_path / "scratch"
    task = harness.task(inputs=[{"path": "/in/x", "url": f"file://{harness.data}/missing"}],
                        executors=[sh("true")])
    run = harness.run(task, scratch_config(harness, keep_workdir="never"),
                      extra_env={SCRATCH_VAR: str(scratch)})
    assert run.state == "SYSTEM_ERROR", run.stderr
    assert os.listdir(scratch / "node") == []


def test_an_unset_variable_leaves_the_task_in_the_work_dir(harness):
    task = harness.task(executors=[sh("echo x > /work/f")], volumes=["/work"])
    run = harness.run(task, scratch_config(harness))  # keep_workdir: always
    assert run.state == "COMPLETE", run.stderr
    assert f"${SCRATCH_VAR} is not set on this node" in run.system_logs
    assert run.host("/work/f").read_text() == "x\n"


def test_a_malformed_setting_is_a_system_error(harness):
    run = harness.run(harness.task(executors=[sh("true")]),
                      harness.config(scratch_dir="relative/dir"))
    assert run.state == "SYSTEM_ERROR"
    assert "is not an absolute path" in run.system_logs


@pytest.mark.parametrize(("setting", "environ", "expected"), [
    ("$TMPDIR", {"TMPDIR": "/local/job7"}, "/local/job7"),
    ("${TMPDIR}/funnel", {"TMPDIR": "/local/job7/"}, "/local/job7/funnel"),
    ("/scratch/$USER/x", {"USER": "ann"}, "/scratch/ann/x"),
    ("/plain", {}, "/plain"),
])
def test_expand_takes_only_environment_variables(setting, environ, expected):
    assert expand(setting, environ) == expected


@pytest.mark.parametrize(("setting", "environ", "words"), [
    ("$HOME/../etc", {"HOME": "/home/ann"}, "must not contain '..'"),
    ("$(id -u)", {}, "'$' must start"),
    ("/x/${bad-name}", {}, "'$' must start"),
    ("/x/$", {}, "'$' must start"),
    ("$REL", {"REL": "relative"}, "not an absolute path"),
    ("~/scratch", {}, "not an absolute path"),
    ("$TMPDIR", {"TMPDIR": "/a\nb"}, "control characters"),
])
def test_expand_refuses_what_it_cannot_trust(setting, environ, words):
    with pytest.raises(ScratchError, match=words.replace("(", r"\(").replace("$", r"\$")):
        expand(setting, environ)


def test_expand_names_an_unset_variable():
    with pytest.raises(Unset, match=r"\$TMPDIR is not set"):
        expand("$TMPDIR/x", {"TMPDIR": ""})


@pytest.mark.parametrize(("engine", "binary"), [("proot", "proot"), ("charliecloud", "ch-run")])
def test_the_sandboxs_own_files_are_in_scratch_too(harness, tmp_path, engine, binary):
    """proot's /tmp and ch-run's root of symlinks live beside files/ in scratch."""
    need(binary)
    scratch = tmp_path / "scratch"
    task = harness.task(volumes=["/work"],
                        executors=[sh("echo t > /tmp/t && echo x > /work/f")])
    run = harness.run(task, scratch_config(harness, container_driver=engine),  # kept: always
                      extra_env={SCRATCH_VAR: str(scratch)})
    assert run.state == "COMPLETE", (run.stderr, run.system_logs)
    assert os.listdir(scratch / "node") == []
    assert run.host("/work/f").read_text() == "x\n"  # copied back: keep_workdir always
    left = os.listdir(run.task_dir)
    assert "sandbox-tmp" not in left and not any(name.startswith("ch-root-") for name in left)


def test_a_canceled_task_is_removed_from_scratch(harness, tmp_path):
    import signal

    from funnel_hpc.core.events import read_event_log

    scratch = tmp_path / "scratch"
    task = harness.task(volumes=["/work"],
                        executors=[sh("echo started > /work/started; sleep 600")])
    proc = harness.start(task, scratch_config(harness, keep_workdir="never"),
                         extra_env={SCRATCH_VAR: str(scratch)})
    try:
        wait_for(lambda: next((scratch / "node").glob("funnel-*/files/work/started"), None),
                 90, "the executor to start in scratch")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert read_event_log(harness.workdir / task["id"] / "events.jsonl").state == "CANCELED"
    assert os.listdir(scratch / "node") == []


# ---- a hostile local user against the scratch base (issue 25) ----

@pytest.fixture
def mallory():
    """A real local user, and a root-only directory she would like the worker to write in."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a user")
    user = make_user("m")
    target = Path(tempfile.mkdtemp(prefix="funnel-root-only-", dir="/var/tmp"))
    target.chmod(0o700)
    yield user, target
    shutil.rmtree(target)
    remove_user(user)


def swap_while(harness, user: str, base: Path, target: Path, task: dict, config):
    """Run `task` while `user` loops replacing new funnel-* dirs in `base` with symlinks
    to `target`; the run and what the loop said."""
    stop = base.parent / f"{base.name}.stop"
    loop = start_swap_loop(user, base, target, stop)
    try:
        wait_for(lambda: (base / "funnel-task1-9").is_symlink() or loop.poll() is not None,
                 60, "the swap loop to start")
        run = harness.run(task, config)
    finally:
        stop.touch()
        said, _ = loop.communicate(timeout=180)
        stop.unlink()
    return run, said


def test_a_base_owned_by_a_user_is_refused(harness, mallory):
    user, target = mallory
    base = Path(tempfile.mkdtemp(prefix="funnel-scratch-", dir="/var/tmp"))
    shutil.chown(base, user, user)
    base.chmod(0o755)
    try:
        task = harness.task(inputs=[{"path": "/in/in.txt", "content": "planted?\n"}],
                            executors=[sh("cat /in/in.txt")])
        run, said = swap_while(harness, user, base, target, task,
                               harness.config(scratch_dir=str(base)))
    finally:
        shutil.rmtree(base)
    assert run.state == "SYSTEM_ERROR", run.system_logs
    assert f"worker.scratch_dir {base}: {base} is owned by uid" in run.system_logs
    assert os.listdir(target) == [], said


def test_a_sticky_base_never_lets_a_planted_link_redirect_writes(harness, mallory):
    user, target = mallory
    base = Path(tempfile.mkdtemp(prefix="funnel-scratch-", dir="/var/tmp"))
    base.chmod(0o1777)  # root's, sticky: a shared /tmp-like scratch
    out = harness.data / "out.txt"
    try:
        task = harness.task(inputs=[{"path": "/in/in.txt", "content": "staged\n"}],
                            outputs=[{"path": "/out/out.txt", "url": f"file://{out}"}],
                            executors=[sh("cat /in/in.txt > /out/out.txt")])
        run, said = swap_while(harness, user, base, target, task,
                               harness.config(scratch_dir=str(base), keep_workdir="never"))
        left = sorted(entry.name for entry in base.iterdir() if not entry.is_symlink())
    finally:
        shutil.rmtree(base)
    assert run.state == "COMPLETE", (run.system_logs, said)
    assert out.read_text() == "staged\n"
    assert os.listdir(target) == [], said
    assert said.strip() == "swapped=0"  # sticky: her mv of root's directory failed each time
    assert left == []  # the task's directory is gone; only her links stay


@pytest.mark.parametrize("kind", ["symlink", "group-writable", "other-owned-parent"])
def test_an_unsafe_base_is_refused_before_anything_is_made(tmp_path, kind):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    if kind == "symlink":
        base = tmp_path / "link"
        base.symlink_to(real)
        words = "is a symlink"
    elif kind == "group-writable":
        base = real
        base.chmod(0o770)
        words = "writable by group or others"
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give a directory away")
        os.chown(real, 65534, 65534)
        base = real / "below"
        words = "is owned by uid 65534"
    with pytest.raises(ScratchError, match=words):
        Scratch.make(str(base), "task1", {})
    assert not (real / "below").exists() or kind != "other-owned-parent"
    assert [p.name for p in real.iterdir()] == []
