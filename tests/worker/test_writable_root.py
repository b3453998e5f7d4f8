"""worker.writable_root (issue 25, item 2): a copy-on-write image root for bwrap executors
with a worker.sandbox_uids slot. Through the real worker (and once a real server with auth
and a real local user), in the Debian image of the local registry: useradd and su, dpkg -i
of a .deb built on the host, tar x of other owners' files into /opt, rm /bin/ls; the shared
image cache unchanged after it, another executor and another task see the image pristine,
two tasks at once see only their own changes, the upper layer counts against disk_gb and
goes with its executor; attacks from inside (mount, writes below, host symlinks, a
symlink for the worker's clean-up); kill -9 of the worker leaves no mount and no process."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from pathlib import Path

import pytest
import requests

from tests.waiting import wait_for, wait_for_state
from tests.worker_helpers import processes_with_argv
from tests.writable_root_helpers import (
    DEB_PACKAGE,
    DEB_SAYS,
    fingerprint,
    host_mounts,
    image_rootfs,
    owners_tar,
    tiny_deb,
)

pytestmark = [pytest.mark.registry,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: uid slots, mounts")]

DEBIAN = "127.0.0.1:5055/funnel/snakemake:1"  # Debian 12 (scripts/setup/46-workflow-image.sh)
TESTIMAGE = "127.0.0.1:5055/funnel/testimage:1"  # busybox-like (45-registry.sh)
FIRST = 1_700_000_000  # far from any account, /etc/subuid and the other tests' ranges
COW = "image root: copy-on-write"
TERMINAL = ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED")
# what the Debian task rewrites, removes or installs: hashed before and after
TOUCHED = ("/etc/passwd", "/etc/shadow", "/etc/group", "/usr/bin/ls", "/var/lib/dpkg/status")


def sh(script: str, image: str = DEBIAN) -> dict:
    return {"image": image, "command": ["sh", "-c", script]}


@pytest.fixture
def slots(tmp_path):
    return {"first": FIRST, "count": 4, "lock_dir": str(tmp_path / "uid-locks")}


def ok(run) -> list[dict]:
    assert run.state == "COMPLETE", (run.system_logs, run.stderr[-3000:],
                                     run.fold.task_log["logs"])
    return run.fold.task_log["logs"]


def roots_left(task_dir: Path) -> list[str]:
    roots = task_dir / "sandbox-root"
    return sorted(os.listdir(roots)) if roots.exists() else []


def test_package_tools_work_and_the_cache_stays_pristine(harness, slots, test_image_cache):
    """useradd -m and su, dpkg -i of a host-built .deb, tar x of other owners into /opt,
    rm /usr/bin/ls, all as root inside; the next executor sees the image as pulled, the
    cache's files are unchanged, the upper layers are gone and no mount is left."""
    deb = tiny_deb(harness.data)
    archive = owners_tar(harness.data / "owners.tar")
    install = ("set -e; useradd -m alice2; su alice2 -c id; ls -d /home/alice2;"
               f" dpkg -i /in/tiny.deb >/dev/null; {DEB_PACKAGE};"
               f" dpkg -s {DEB_PACKAGE} | grep Status; cat /etc/{DEB_PACKAGE}.conf;"
               " mkdir -p /opt/vendor; tar -C /opt/vendor -xf /in/owners.tar;"
               " stat -c '%u:%g %n' /opt/vendor/pkg/bin/tool /opt/vendor/pkg/share/doc"
               " /opt/vendor/pkg/root-owned;"
               " rm /usr/bin/ls; test ! -e /usr/bin/ls && echo ls-gone;"
               " echo changed >> /etc/shadow; stat -c '%u:%g %n' / /etc /etc/passwd")
    pristine = ("grep -c alice2 /etc/passwd || true; test -e /usr/bin/ls && echo ls-here;"
                f" dpkg -s {DEB_PACKAGE} >/dev/null 2>&1 || echo no-package;"
                " test -e /opt/vendor || echo no-vendor")
    task = harness.task(
        inputs=[{"path": "/in/tiny.deb", "url": f"file://{deb}"},
                {"path": "/in/owners.tar", "url": f"file://{archive}"}],
        executors=[sh(install), sh(pristine)])
    mounts = host_mounts(str(harness.tmp))
    config = harness.config(sandbox_uids=slots)
    # the image in the cache first: fingerprinted before the task that writes
    first = harness.run(harness.task(executors=[sh("true")]), config, timeout=600)
    ok(first)
    rootfs = image_rootfs(test_image_cache, first.system_logs, DEBIAN)
    before = fingerprint(rootfs, TOUCHED)
    run = harness.run(task, config, timeout=600)
    logs = ok(run)
    out = logs[0]["stdout"].splitlines()
    assert out[0].startswith("uid=1000(alice2) gid=1000(alice2)"), out
    assert out[1:5] == ["/home/alice2", DEB_SAYS, "Status: install ok installed",
                        "setting=1"], out
    assert out[5:8] == ["1234:2345 /opt/vendor/pkg/bin/tool",
                        "40000:40001 /opt/vendor/pkg/share/doc",
                        "0:0 /opt/vendor/pkg/root-owned"], out
    assert out[8:] == ["ls-gone", "0:0 /", "0:0 /etc", "0:0 /etc/passwd"], out
    assert logs[1]["stdout"].splitlines() == ["0", "ls-here", "no-package", "no-vendor"]
    assert COW in run.system_logs, run.system_logs
    assert fingerprint(rootfs, TOUCHED) == before
    assert roots_left(run.task_dir) == []
    assert host_mounts(str(harness.tmp)) == mounts


def test_two_tasks_at_once_see_only_their_own_changes(harness, slots):
    config = harness.config(sandbox_uids=slots)
    script = ("echo {name} > /etc/who; touch /bin/made-by-{name}; touch /data/ready;"
              " while [ ! -e /data/go ]; do sleep 0.1; done;"
              " cat /etc/who; ls /bin | grep made-by-; grep -c {name} /etc/who")
    tasks = [harness.task(volumes=["/data"], executors=[sh(script.format(name=name),
                                                          TESTIMAGE)])
             for name in ("one", "two")]
    workers = [harness.start(task, config) for task in tasks]
    try:
        for task, worker in zip(tasks, workers, strict=True):
            ready = harness.workdir / task["id"] / "files" / "data" / "ready"
            wait_for(ready.exists, 300, f"{task['id']} to run", detail=worker.poll)
        for task in tasks:
            (harness.workdir / task["id"] / "files" / "data" / "go").touch()
        for worker in workers:
            worker.communicate(timeout=300)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for task, name in zip(tasks, ("one", "two"), strict=True):
        from funnel_hpc.core.events import read_event_log

        fold = read_event_log(harness.workdir / task["id"] / "events.jsonl")
        assert fold.state == "COMPLETE", fold.task_log["system_logs"]
        stdout = fold.task_log["logs"][0]["stdout"].splitlines()
        assert stdout == [name, f"made-by-{name}", "1"], stdout
        assert any(COW in line for line in fold.task_log["system_logs"])
    after = harness.run(harness.task(executors=[sh(
        "test -e /etc/who || echo no-who; ls /bin | grep -c made-by-; true", TESTIMAGE)]),
        config, timeout=300)
    assert ok(after)[0]["stdout"].splitlines() == ["no-who", "0"]


def test_roots_made_ahead_start_pristine_over_each_image(harness, slots):
    """The next executor's root is made ahead over the last one's image (Spares): five
    executors over two images in turn each see their own image pristine, writable, with
    nothing of the others; no spare, upper or mount is left after the task."""
    mounts = host_mounts(str(harness.tmp))
    check = ("test -e /marker && echo seen-marker; test -e /bin/busybox && echo busybox;"
             " test -e /usr/bin/dpkg && echo debian; echo {name} > /marker; cat /marker")
    images = [DEBIAN, DEBIAN, TESTIMAGE, TESTIMAGE, DEBIAN]
    task = harness.task(executors=[sh(check.format(name=f"e{index}"), image)
                                   for index, image in enumerate(images)])
    run = harness.run(task, harness.config(sandbox_uids=slots), timeout=600)
    logs = ok(run)
    for index, image in enumerate(images):
        kind = "debian" if image == DEBIAN else "busybox"
        assert logs[index]["stdout"].splitlines() == [kind, f"e{index}"], (index, logs)
    assert COW in run.system_logs, run.system_logs
    assert roots_left(run.task_dir) == []
    assert host_mounts(str(harness.tmp)) == mounts


def test_attacks_from_inside_reach_nothing_of_the_host(harness, slots, tmp_path):
    """mount and umount are denied; a symlink to a host path resolves inside the sandbox;
    the worker's clean-up of the upper layer follows no link the task planted there."""
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("host file\n")
    host_secret = tmp_path / "host-secret"
    host_secret.write_text("HOST-SECRET\n")
    script = (f"ln -s {canary} /victim; ln -s {canary}/keep /victim-file;"
              f" ln -s {host_secret} /leak; cat /leak; echo leak=$?;"
              f" mkdir -p {canary}; echo mine > {canary}/keep; echo wrote=$?;"
              " mount -t tmpfs none /mnt; echo mount=$?; umount /; echo umount=$?;"
              " mount -o remount,rw /; echo remount=$?;"
              " mknod /dev-node c 1 3; echo mknod=$?;"
              " grep -c sandbox-root /proc/self/mountinfo; true")
    run = harness.run(harness.task(executors=[sh(script, TESTIMAGE)]),
                      harness.config(sandbox_uids=slots), timeout=300)
    stdout = ok(run)[0]["stdout"]
    assert "HOST-SECRET" not in stdout and "leak=1" in stdout, stdout
    assert "wrote=0" in stdout  # into the task's own copy of that path, not the host's
    for word in ("mount", "umount", "remount", "mknod"):
        assert f"{word}=0" not in stdout and f"{word}=" in stdout, stdout
    assert stdout.rstrip().endswith("0"), stdout  # no host path of the task in mountinfo
    assert (canary / "keep").read_text() == "host file\n"
    assert host_secret.read_text() == "HOST-SECRET\n"
    assert roots_left(run.task_dir) == []


def test_a_swapped_directory_is_refused_before_anything_is_mounted(tmp_path):
    """Were the executor's directory replaced by a symlink (to a directory of the same
    owner and mode) between its making and the mount, the worker refuses at the inode
    check: nothing is mounted there, the target is untouched, bwrap is killed."""
    from funnel_hpc.worker import sandbox
    from funnel_hpc.worker.drivers import switch_user
    from funnel_hpc.worker.identity import BLOCK, Identity, NamespaceMap
    from funnel_hpc.worker.overlay_root import OverlayRoot
    from funnel_hpc.worker.sandbox import SandboxError

    task_dir = tmp_path / "task"
    task_dir.mkdir(mode=0o700)
    image = tmp_path / "image"
    (image / "bin").mkdir(parents=True)
    slot = Identity(FIRST + 3 * BLOCK, FIRST + 3 * BLOCK, BLOCK)
    root = OverlayRoot.make(str(task_dir), str(image), slot.ids)
    elsewhere = tmp_path / "elsewhere"
    os.rename(root.path, elsewhere)  # the worker's own directory, moved away...
    decoy = tmp_path / "decoy"
    for layer in ("lower", "merged", "upper", "work"):
        (decoy / layer).mkdir(parents=True, mode=0o700)
    decoy.chmod(0o700)
    os.symlink(decoy, root.path)  # ...and a link to a look-alike in its place
    mounts = host_mounts(str(tmp_path))
    userns = NamespaceMap(slot, root)
    argv = sandbox.bwrap_argv(str(image), [], {}, None, ["/bin/true"], "host",
                              userns=userns.argv(), root=root.merged)
    proc = subprocess.Popen(argv, pass_fds=userns.pass_fds, cwd="/",
                            **switch_user(slot.ids))
    with pytest.raises(SandboxError, match="a symlink or not a directory"):
        userns.started(proc)
    assert proc.wait(60) != 0
    assert host_mounts(str(tmp_path)) == mounts == []
    assert sorted(os.listdir(decoy / "merged")) == [] and \
        sorted(os.listdir(decoy / "upper")) == []
    os.unlink(root.path)
    os.rename(elsewhere, root.path)
    assert root.remove() == []


def test_off_and_a_shared_user_keep_the_image_read_only_and_say_why(harness, slots):
    script = "echo x >> /etc/passwd; echo write=$?; true"
    shared = "worker.writable_root needs a root worker with worker.sandbox_uids"
    for settings, why in (({"sandbox_uids": slots, "writable_root": "off"},
                           "worker.writable_root is off"), ({}, shared)):
        run = harness.run(harness.task(executors=[sh(script, TESTIMAGE)]),
                          harness.config(**settings), timeout=300)
        assert "write=0" not in ok(run)[0]["stdout"]
        assert f"image root: read-only ({why}" in run.system_logs, run.system_logs
    bad = harness.run(harness.task(executors=[sh("true", TESTIMAGE)]),
                      harness.config(sandbox_uids=slots, writable_root="always"))
    assert bad.state == "SYSTEM_ERROR"
    assert "worker.writable_root must be one of auto, off, not 'always'" in bad.system_logs


def test_kill_9_of_the_worker_leaves_no_mount_and_no_process(harness, slots):
    mark = str(5000 + secrets.randbelow(900))
    mounts = host_mounts(str(harness.tmp))
    task = harness.task(executors=[sh(f"echo x > /etc/mine; exec sleep {mark}", TESTIMAGE)])
    worker = harness.start(task, harness.config(sandbox_uids=slots))
    try:
        pid, = wait_for(lambda: processes_with_argv(["sleep", mark]), 300, "the executor",
                        detail=worker.poll)
        inside = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        assert inside[0].split(" - ")[1].startswith("overlay "), inside[0]
        assert host_mounts(str(harness.tmp)) == mounts  # in the sandbox's namespace only
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    wait_for(lambda: not processes_with_argv(["sleep", mark]), 120, "the executor to end")
    assert host_mounts(str(harness.tmp)) == mounts == []


def test_through_the_server_the_upper_layer_counts_against_disk_gb(limits_servers):
    """A real server as root, auth on, a real local user: a task writing 300 MB into its
    image root (not a volume) with disk_gb 0.1 ends EXECUTOR_ERROR naming the limit; a
    useradd task COMPLETEs on a copy-on-write root."""
    server, auth = limits_servers("bwrap")

    def run(**task) -> dict:
        resp = requests.post(server.api + "/tasks", auth=auth, json=task, timeout=10)
        assert resp.status_code == 200, resp.text
        return wait_for_state(server.api, resp.json()["id"], TERMINAL, 600, auth=auth,
                              detail=lambda: server.log()[-3000:])

    def system_logs(task: dict) -> str:
        return "\n".join(line for log in task.get("logs") or [] for line in log["system_logs"])

    grown = run(resources={"disk_gb": 0.1}, executors=[
        sh("for i in 1 2 3; do head -c 100000000 /dev/zero > /opt/f$i; done; sleep 30",
           TESTIMAGE), sh("echo never", TESTIMAGE)])
    assert grown["state"] == "EXECUTOR_ERROR", system_logs(grown)
    assert "(resources.disk_gb)" in system_logs(grown)
    assert len(grown["logs"][-1]["logs"]) == 1
    added = run(executors=[sh("useradd -m bob2 && id bob2 && tail -1 /etc/passwd")])
    assert added["state"] == "COMPLETE", system_logs(added)
    assert added["logs"][-1]["logs"][0]["stdout"].startswith("uid=1000(bob2)")
    assert COW in system_logs(added)
