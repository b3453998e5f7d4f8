"""worker.bind_inputs, through a real worker under bwrap over the test registry's image: a
file:// input is bound read-only by descriptor, never copied, and every way out of that
tried from inside the task fails; what may not be bound is copied (or refused) as today."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from tests.image_helpers import ANONYMOUS

pytestmark = pytest.mark.registry

TESTIMAGE = f"{ANONYMOUS}/funnel/testimage:1"


def in_image(script: str) -> dict:
    return {"image": TESTIMAGE, "command": ["sh", "-c", script]}


@pytest.fixture
def shared():
    """A data directory every user may reach (pytest's own tmp dirs are 0700): the rule
    binds only what every user may read."""
    base = Path(tempfile.mkdtemp(prefix="funnel-bind-", dir="/var/tmp"))
    base.chmod(0o755)
    for parent in base.parents:
        assert os.stat(parent).st_mode & stat.S_IXOTH, f"{parent} is not searchable by all"
    yield base
    shutil.rmtree(base)


def configured(harness, shared: Path, **worker):
    return harness.config(allowed_dirs=[str(shared)], bind_inputs=True, **worker)


BIND_FIRST_UID = 1_700_000_000  # worker.sandbox_uids: a range no account and no other test uses


@pytest.fixture(params=["shared-user", "own-uid-block"])
def identity(request, tmp_path) -> dict:
    """The executor's host identity: the one shared sandbox user, or a slot's block of ids
    (root inside with CAP_DAC_OVERRIDE, CAP_FOWNER...: still no mount rights)."""
    if request.param == "shared-user":
        return {}
    return {"sandbox_uids": {"first": BIND_FIRST_UID, "count": 2,
                             "lock_dir": str(tmp_path / "uid-locks")}}


def test_a_bound_input_is_read_in_place_read_only_and_never_copied(harness, shared,
                                                                    identity):
    ref = shared / "ref.txt"
    ref.write_text("reference\n")
    ref.chmod(0o666)  # writable by all on the host: only the read-only mount stops a write
    tree = shared / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("a\n")
    tree.chmod(0o755)
    run = harness.run(harness.task(
        inputs=[{"path": "/in/ref.txt", "url": f"file://{ref}"},
                {"path": "/tree", "url": f"file://{tree}", "type": "DIRECTORY"}],
        executors=[in_image(
            "cat /in/ref.txt /tree/sub/a.txt;"
            " echo x >> /in/ref.txt 2>/dev/null || echo write-refused;"
            " touch /tree/new 2>/dev/null || echo create-refused;"
            " chmod 0600 /in/ref.txt 2>/dev/null || echo chmod-refused;"
            " umount /in/ref.txt 2>/dev/null || echo umount-refused;"
            " mount -o remount,rw /in/ref.txt 2>/dev/null || echo remount-refused;"
            " mv /in/ref.txt /in/moved 2>/dev/null || echo rename-refused;"
            " echo evil > /in/other && mv /in/other /in/ref.txt 2>/dev/null"
            " || echo rename-over-refused;"
            " rm -f /in/ref.txt 2>/dev/null; test -e /in/ref.txt && echo still-there;"
            # no descriptor of the input (which names the host's writable mount) is left
            # to the task or to bwrap's pid 1: reopening it would bypass the read-only bind
            " echo held=$(ls -l /proc/1/fd/ /proc/self/fd/ 2>&1 | grep -c -e ref -e tree);"
            " echo mounts=$(grep -c ' /in/ref.txt ' /proc/self/mountinfo);"
            " grep ' /in/ref.txt ' /proc/self/mountinfo | cut -d' ' -f6")]),
        config=configured(harness, shared, **identity))
    assert run.state == "COMPLETE", (run.system_logs, run.stderr)
    out = run.executor(0)["stdout"].split("\n")
    assert out[:2] == ["reference", "a"]
    for refused in ("write-refused", "create-refused", "chmod-refused", "umount-refused",
                    "remount-refused",
                    "rename-refused", "rename-over-refused", "still-there"):
        assert refused in out, (refused, out)
    assert "held=0" in out and "mounts=1" in out, out
    assert {"ro", "nosuid", "nodev"} <= set(out[-2].split(",")), out  # devices stay dead
    assert ref.read_text() == "reference\n" and sorted(os.listdir(tree)) == ["sub"]
    # the task's files hold only the empty mount points, no copy
    assert run.host("/in/ref.txt").stat().st_size == 0
    assert run.host("/tree").is_dir() and not any(run.host("/tree").iterdir())
    assert "bound read-only in place" in run.system_logs
    assert ("(ids 0-65535 inside)" in run.system_logs) == bool(identity)
    assert stat.S_IMODE(ref.stat().st_mode) == 0o666


def test_inputs_directly_under_the_root_are_bound_for_every_executor(harness, shared):
    """A file or directory at /name has its own placeholder bind under the read-only one;
    each executor's bwrap gets its own copies of the descriptors."""
    ref = shared / "ref.txt"
    ref.write_text("top\n")
    ref.chmod(0o644)
    tree = shared / "tree"
    tree.mkdir(mode=0o755)
    (tree / "a.txt").write_text("a\n")
    run = harness.run(harness.task(
        inputs=[{"path": "/ref.txt", "url": f"file://{ref}"},
                {"path": "/tree", "url": f"file://{tree}"}],
        executors=[in_image("cat /ref.txt /tree/a.txt"),
                   in_image("cat /ref.txt; echo x > /ref.txt || echo refused")]),
        config=configured(harness, shared))
    assert run.state == "COMPLETE", (run.system_logs, run.stderr)
    assert run.executor(0)["stdout"] == "top\na\n"
    assert run.executor(1)["stdout"] == "top\nrefused\n"
    assert ref.read_text() == "top\n" and run.host("/ref.txt").stat().st_size == 0
    assert "2 input(s) bound read-only in place" in run.system_logs
    assert '"1":"DIRECTORY"' in run.fold.task_log["metadata"]["input_types"]


def test_an_input_others_cannot_read_is_copied_and_says_why(harness, shared):
    private = shared / "private.txt"
    private.write_text("mine\n")
    private.chmod(0o600)
    closed = shared / "closed"
    closed.mkdir(mode=0o711)
    closed.chmod(0o700)
    (closed / "inner.txt").write_text("inner\n")
    (closed / "inner.txt").chmod(0o644)
    run = harness.run(harness.task(
        inputs=[{"path": "/in/private.txt", "url": f"file://{private}"},
                {"path": "/in/inner.txt", "url": f"file://{closed}/inner.txt"}],
        executors=[in_image("cat /in/private.txt /in/inner.txt")]),
        config=configured(harness, shared))
    assert run.state == "COMPLETE", (run.system_logs, run.stderr)
    assert run.executor(0)["stdout"] == "mine\ninner\n"
    assert run.host("/in/private.txt").read_text() == "mine\n"  # a copy, as before
    copied = "copied, not bound (worker.bind_inputs)"
    assert f"input /in/private.txt: {copied}: not readable by every user" in run.system_logs
    closed_words = f"{closed} above it is not searchable by every user"
    assert f"input /in/inner.txt: {copied}: {closed_words}" in run.system_logs


def test_a_symlink_in_the_inputs_path_is_refused_as_today(harness, shared):
    (shared / "real").mkdir(mode=0o755)
    (shared / "real" / "f.txt").write_text("f\n")
    (shared / "link").symlink_to(shared / "real")
    (shared / "leaf.txt").symlink_to(shared / "real" / "f.txt")
    for url in (f"file://{shared}/link/f.txt", f"file://{shared}/leaf.txt"):
        run = harness.run(harness.task(inputs=[{"path": "/in/f.txt", "url": url}],
                                       executors=[in_image("cat /in/f.txt")]),
                          config=configured(harness, shared))
        assert run.state == "SYSTEM_ERROR", run.system_logs
        assert "symbolic link" in run.system_logs


def test_an_input_of_the_wrong_type_is_refused(harness, shared):
    ref = shared / "ref.txt"
    ref.write_text("ref\n")
    ref.chmod(0o644)
    run = harness.run(harness.task(
        inputs=[{"path": "/in", "url": f"file://{ref}", "type": "DIRECTORY"}],
        executors=[in_image("ls /in")]), config=configured(harness, shared))
    assert run.state == "SYSTEM_ERROR", run.system_logs
    assert "not a directory (the input's type is DIRECTORY)" in run.system_logs


def test_inputs_that_meet_an_output_are_copied_so_the_output_holds_them(harness, shared):
    ref = shared / "ref.txt"
    ref.write_text("ref\n")
    ref.chmod(0o644)
    out = shared / "out"
    run = harness.run(harness.task(
        inputs=[{"path": "/data/ref.txt", "url": f"file://{ref}"}],
        outputs=[{"path": "/data", "url": f"file://{out}", "type": "DIRECTORY"}],
        executors=[in_image("echo new > /data/new.txt")]),
        config=configured(harness, shared))
    assert run.state == "COMPLETE", (run.system_logs, run.stderr)
    assert (out / "ref.txt").read_text() == "ref\n" and (out / "new.txt").read_text() == "new\n"
    assert "input /data/ref.txt: copied, not bound" in run.system_logs


def test_bind_inputs_off_copies_as_today(harness, shared):
    ref = shared / "ref.txt"
    ref.write_text("ref\n")
    ref.chmod(0o644)
    task = harness.task(inputs=[{"path": "/in/ref.txt", "url": f"file://{ref}"}],
                        executors=[in_image("cat /in/ref.txt; echo x >> /in/ref.txt")])
    run = harness.run(task, config=harness.config(allowed_dirs=[str(shared)]))
    assert run.state == "COMPLETE", (run.system_logs, run.stderr)
    assert run.executor(0)["stdout"] == "ref\n"
    assert run.host("/in/ref.txt").read_text() == "ref\nx\n"  # the task's own copy
    assert ref.read_text() == "ref\n" and "bind" not in run.system_logs


def test_other_drivers_copy_and_say_so(harness, shared):
    from tests.worker_helpers import need

    need("proot")
    ref = shared / "ref.txt"
    ref.write_text("ref\n")
    ref.chmod(0o644)
    run = harness.run(harness.task(inputs=[{"path": "/in/ref.txt", "url": f"file://{ref}"}],
                                   executors=[in_image("cat /in/ref.txt")]),
                      config=configured(harness, shared, container_driver="proot"))
    assert run.state == "COMPLETE", (run.system_logs, run.stderr)
    assert run.host("/in/ref.txt").read_text() == "ref\n"
    assert "worker.bind_inputs: driver proot cannot bind by descriptor" in run.system_logs


@pytest.fixture
def alice(shared):
    """A real local user owning a 755 directory of the shared data directory."""
    from tests.owner_helpers import drop_user, make_user, need_root

    need_root()
    name = make_user("bind")
    (shared / name).mkdir(mode=0o755)
    shutil.chown(shared / name, name, name)
    yield name
    drop_user(name)


def test_through_the_server_the_owner_opens_and_only_what_all_may_read_is_bound(
        alice, shared, tmp_path):
    """The real server as root, auth on, local backend: the input is opened as its owner
    (a file only others may read is refused, as a copy would be), bound when all may read
    it, copied when only she may."""
    import requests
    from werkzeug.security import generate_password_hash

    from tests.server_helpers import ServerProcess
    from tests.waiting import wait_for_state
    from tests.worker_helpers import need

    need("bwrap")
    home = shared / alice
    for name, mode in (("open.txt", 0o644), ("hers.txt", 0o600), ("not-hers.txt", 0o004)):
        (home / name).write_text(f"{name}\n")
        (home / name).chmod(mode)
        shutil.chown(home / name, alice, alice)
    server = ServerProcess(tmp_path / "srv", f"sqlite:///{tmp_path}/funnel.db", reconcile=True,
                           overrides={
                               "auth": {"mode": "basic",
                                        "users": {alice: generate_password_hash("pw")}},
                               "backend": {"name": "local"},
                               "reconciler": {"interval_seconds": 0.3},
                               "worker": {"container_driver": "bwrap", "bind_inputs": True,
                                          "allowed_dirs": [str(shared)],
                                          "keep_workdir": "always"}}).start()
    try:
        def run(name: str) -> dict:
            resp = requests.post(server.api + "/tasks", auth=(alice, "pw"), timeout=10, json={
                "inputs": [{"path": "/in/f", "url": f"file://{home}/{name}"}],
                "executors": [in_image("cat /in/f")]})
            assert resp.status_code == 200, resp.text
            return wait_for_state(server.api, resp.json()["id"],
                                  ("COMPLETE", "SYSTEM_ERROR", "EXECUTOR_ERROR"), 120,
                                  auth=(alice, "pw"), detail=lambda: server.log()[-2000:])

        def logs(task: dict) -> str:
            return "\n".join(task["logs"][-1]["system_logs"])

        bound, copied, refused = run("open.txt"), run("hers.txt"), run("not-hers.txt")
    finally:
        server.stop()
    assert bound["state"] == "COMPLETE", logs(bound)
    assert bound["logs"][-1]["logs"][0]["stdout"] == "open.txt\n"
    assert "1 input(s) bound read-only in place" in logs(bound)
    assert copied["state"] == "COMPLETE", logs(copied)
    assert copied["logs"][-1]["logs"][0]["stdout"] == "hers.txt\n"
    assert "copied, not bound (worker.bind_inputs): not readable by every user" in logs(copied)
    assert refused["state"] == "SYSTEM_ERROR", logs(refused)
    assert f"as the task's owner {alice}" in logs(refused)


@pytest.mark.parametrize("keep", ["never", "on_failure"])
def test_scratch_and_clean_up_leave_the_original_alone(harness, shared, tmp_path, keep):
    """In worker.scratch_dir, a failed task's files copied back and a finished one's
    removed: only the empty placeholder is ever touched, never the bound original."""
    ref = shared / "ref.txt"
    ref.write_text("ref\n")
    ref.chmod(0o644)
    tree = shared / "tree"
    tree.mkdir(mode=0o755)
    (tree / "a.txt").write_text("a\n")
    scratch = tmp_path / "scratch"
    run = harness.run(harness.task(
        inputs=[{"path": "/in/ref.txt", "url": f"file://{ref}"},
                {"path": "/tree", "url": f"file://{tree}", "type": "DIRECTORY"}],
        volumes=["/work"],
        executors=[in_image("cat /in/ref.txt /tree/a.txt > /work/both; exit 3")]),
        configured(harness, shared, scratch_dir="${BIND_SCRATCH}/node", keep_workdir=keep),
        extra_env={"BIND_SCRATCH": str(scratch)})
    assert run.state == "EXECUTOR_ERROR", (run.stderr, run.system_logs)
    assert os.listdir(scratch / "node") == []
    assert ref.read_text() == "ref\n" and os.listdir(tree) == ["a.txt"]
    if keep == "never":
        assert not (run.task_dir / "files").exists()
    else:  # copied back: the task's own file, and the empty mount points
        assert run.host("/work/both").read_text() == "ref\na\n"
        assert run.host("/in/ref.txt").stat().st_size == 0
        assert os.listdir(run.host("/tree")) == []
