"""worker.writable_root for a worker that is NOT root (issue 25, item 2): with its
/etc/subuid range, each bwrap executor's `/` is an overlay mounted by a forked helper from
inside the sandbox's own user namespace (worker/overlay_root.py, _mount_as_owner). A real
`funnel worker run` as a real local user (runuser), over the Debian image of the local
registry: useradd -m and su, dpkg -i of a host-built .deb, rm /usr/bin/ls; the next
executor sees the image as pulled, the shared cache is unchanged (hashed before and
after); attacks from inside; kill -9 of the worker leaves no mount and no process."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from pathlib import Path

import pytest

from tests.components import need
from tests.owner_helpers import need_root
from tests.subids_helpers import DEBIAN, TESTIMAGE, Account, UserWorker
from tests.waiting import wait_for
from tests.worker.conftest import need as need_tool
from tests.worker.conftest import need_registry
from tests.worker_helpers import processes_with_argv
from tests.writable_root_helpers import (
    DEB_PACKAGE,
    DEB_SAYS,
    fingerprint,
    host_mounts,
    image_rootfs,
    tiny_deb,
)

pytestmark = pytest.mark.registry
COW = "image root: copy-on-write"
TOUCHED = ("/etc/passwd", "/etc/shadow", "/etc/group", "/usr/bin/ls", "/var/lib/dpkg/status")


@pytest.fixture(scope="module")
def bob():
    """A local user with a subordinate range and a worker set-up of his own."""
    need_root()
    need_tool("bwrap")
    need_registry()
    for path in ("/usr/bin/newuidmap", "/usr/bin/newgidmap"):
        need("uidmap", os.path.exists(path), f"{path} missing (scripts/setup/40-worker.sh)")
    account = Account.make("w")
    if account.first_uid is None or account.first_gid is None:
        account.drop()
        pytest.fail("useradd gave no /etc/subuid range (scripts/setup/40-worker.sh)")
    worker = UserWorker.make(account)
    yield worker
    worker.remove()
    account.drop()


def sh(script: str, image: str = DEBIAN) -> dict:
    return {"image": image, "command": ["sh", "-c", script]}


def ok(run) -> list[dict]:
    assert run.state == "COMPLETE", (run.system_logs, run.stderr[-3000:],
                                     run.fold.task_log["logs"])
    return run.fold.task_log["logs"]


def test_useradd_dpkg_and_rm_work_and_the_cache_stays_pristine(bob):
    """As root inside (the worker's uid): useradd -m and su, dpkg -i, rm /usr/bin/ls; the
    next executor sees the image as pulled; the cache's files are unchanged; the upper
    layers (with files of subordinate ids) are removed; no mount is left."""
    inputs = bob.outputs / "in"
    inputs.mkdir(exist_ok=True)
    deb = tiny_deb(inputs)
    os.chmod(deb, 0o644)
    install = ("set -e; useradd -m x; su x -c id; ls -d /home/x; stat -c '%u:%g' /home/x;"
               f" dpkg -i /in/tiny.deb >/dev/null; {DEB_PACKAGE};"
               f" dpkg -s {DEB_PACKAGE} | grep Status; rm /usr/bin/ls;"
               " test ! -e /usr/bin/ls && echo ls-gone; cat /proc/self/uid_map")
    pristine = ("grep -c '^x:' /etc/passwd || true; test -e /usr/bin/ls && echo ls-here;"
                f" dpkg -s {DEB_PACKAGE} >/dev/null 2>&1 || echo no-package; ls /usr/bin/ls")
    mounts = host_mounts(str(bob.base))
    config = bob.config()
    first = bob.run(bob.task(executors=[sh("true")]), config)
    ok(first)
    assert COW in first.system_logs, first.system_logs
    rootfs = image_rootfs(bob.base / "cache", first.system_logs, DEBIAN)
    before = fingerprint(rootfs, TOUCHED)
    task = bob.task(inputs=[{"path": "/in/tiny.deb", "url": f"file://{deb}"}],
                    executors=[sh(install), sh(pristine)])
    run = bob.run(task, config)
    logs = ok(run)
    out = logs[0]["stdout"].splitlines()
    assert out[0].startswith("uid=1000(x) gid=1000(x)"), out
    assert out[1:6] == ["/home/x", "1000:1000", DEB_SAYS, "Status: install ok installed",
                        "ls-gone"], out
    account = bob.account
    assert [line.split() for line in out[6:8]] == [
        ["0", str(account.uid), "1"], ["1", str(account.first_uid), "65535"]], out
    assert logs[1]["stdout"].splitlines() == ["0", "ls-here", "no-package", "/usr/bin/ls"]
    assert COW in run.system_logs, run.system_logs
    assert "cannot remove" not in run.system_logs, run.system_logs
    assert fingerprint(rootfs, TOUCHED) == before
    assert sorted(p.name for p in run.task_dir.iterdir()) == ["events.jsonl"]
    assert host_mounts(str(bob.base)) == mounts


def test_attacks_from_inside_are_denied(bob, tmp_path):
    """mount, umount, remount and mknod are denied (seccomp); no host path of the task
    shows in the sandbox's mountinfo; a host path written inside is the task's own copy."""
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("host file\n")
    os.chmod(tmp_path, 0o755)
    script = (f"cat {canary}/keep; echo read=$?; mkdir -p {canary}; echo mine > {canary}/keep;"
              " echo wrote=$?; mount -t tmpfs none /mnt; echo mount=$?; umount /;"
              " echo umount=$?; mount -o remount,rw /; echo remount=$?;"
              " mknod /dev-node c 1 3; echo mknod=$?; unshare -m true; echo unshare=$?;"
              " grep -c -e sandbox-root -e subids- /proc/self/mountinfo; true")
    run = bob.run(bob.task(executors=[sh(script, TESTIMAGE)]), bob.config())
    stdout = ok(run)[0]["stdout"]
    assert COW in run.system_logs, run.system_logs
    assert "host file" not in stdout and "read=1" in stdout, stdout
    assert "wrote=0" in stdout  # into the task's own upper layer
    for word in ("mount", "umount", "remount", "mknod", "unshare"):
        assert f"{word}=0" not in stdout and f"{word}=" in stdout, stdout
    assert stdout.rstrip().endswith("0"), stdout
    assert (canary / "keep").read_text() == "host file\n"


def test_the_clean_up_follows_no_link_and_opens_every_directory(bob):
    """An upper layer with 0000 directories (root's and a subordinate id's, nested), and
    links to a directory of the worker's on the host: all removed; the host directory's
    mode, owner and file unchanged (nothing followed a link)."""
    account = bob.account
    host = bob.base / "host-dir"
    host.mkdir()
    (host / "keep").write_text("host file\n")
    os.chown(host, account.uid, account.gid)
    os.chown(host / "keep", account.uid, account.gid)
    host.chmod(0o500)
    script = (f"ln -s {host} /victim; ln -s {host}/keep /victim-file;"
              " mkdir -p /locked/deeper /sub/inner /sub/other; echo s > /sub/inner/f;"
              " chmod 000 /locked/deeper /locked; chown -R 1234:1234 /sub;"
              " chown 0:0 /sub/other; chmod 000 /sub/other; chmod 700 /sub/inner; chmod 700 /sub;"
              " ln -s /sub/inner /sub/other-link; echo done")
    after = sh("test -e /sub || echo pristine", TESTIMAGE)
    run = bob.run(bob.task(executors=[sh(script, TESTIMAGE), after]), bob.config())
    logs = ok(run)
    assert (logs[0]["stdout"].strip(), logs[1]["stdout"].strip()) == ("done", "pristine")
    assert "cannot remove" not in run.system_logs, run.system_logs
    assert COW in run.system_logs, run.system_logs
    assert sorted(p.name for p in run.task_dir.iterdir()) == ["events.jsonl"]
    info = host.lstat()
    assert (oct(info.st_mode & 0o7777), info.st_uid) == (oct(0o500), account.uid)
    assert (host / "keep").read_text() == "host file\n"


def test_kill_9_of_the_worker_leaves_no_mount_and_no_process(bob):
    mark = str(5000 + secrets.randbelow(900))
    mounts = host_mounts(str(bob.base))
    task = bob.task(executors=[sh(f"echo x > /etc/mine; exec sleep {mark}", TESTIMAGE)])
    runuser = bob.start(task, bob.config())
    try:
        pid, = wait_for(lambda: processes_with_argv(["sleep", mark]), 300, "the executor",
                        detail=runuser.poll)
        inside = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        assert inside[0].split(" - ")[1].startswith("overlay "), inside[0]
        assert host_mounts(str(bob.base)) == mounts  # in the sandbox's namespace only
        children = Path(f"/proc/{runuser.pid}/task/{runuser.pid}/children").read_text()
        worker, = (int(child) for child in children.split())
        os.kill(worker, signal.SIGKILL)
        runuser.communicate(timeout=60)
    finally:
        if runuser.poll() is None:
            runuser.kill()
    wait_for(lambda: not processes_with_argv(["sleep", mark]), 120, "the executor to end")
    assert host_mounts(str(bob.base)) == mounts


def test_an_image_not_the_workers_is_refused_with_the_reason(bob):
    """The probe, run as the worker user over an image tree it does not own (a site-wide
    cache of another account's): refused before anything is mounted, saying why."""
    task_dir = bob.base / "probe-task"
    task_dir.mkdir()
    os.chown(task_dir, bob.account.uid, bob.account.gid)
    code = ("from funnel_hpc.worker import overlay_root, subids\n"
            "found = subids.find('auto')\n"
            "try:\n"
            f"    overlay_root.probe_own({str(task_dir)!r}, '/usr', found.write_maps)\n"
            "except overlay_root.Unusable as why:\n"
            "    print(why)\n")
    said = subprocess.run(["/usr/sbin/runuser", "-u", bob.account.name, "--",
                           str(bob.python), "-c", code], capture_output=True, text=True,
                          timeout=120, cwd="/")
    assert said.stdout.strip() == (
        f"the cached image belongs to uid 0, not the worker's {bob.account.uid}: its files "
        "would be nobody's inside and could not be copied up"), (said.stdout, said.stderr)
    assert os.listdir(task_dir) == []


def test_off_and_a_user_without_a_range_keep_the_image_read_only_and_say_why(bob):
    run = bob.run(bob.task(executors=[sh("touch /etc/x; echo $?", TESTIMAGE)]),
                  bob.config(writable_root="off"))
    assert ok(run)[0]["stdout"].strip() != "0"
    assert "image root: read-only (worker.writable_root is off)" in run.system_logs
    run = bob.run(bob.task(executors=[sh("touch /etc/x; echo $?", TESTIMAGE)]),
                  bob.config(sandbox_uids={"subordinate": "off"}))
    assert ok(run)[0]["stdout"].strip() != "0"
    why = ("image root: read-only (worker.writable_root needs a root worker with "
           "worker.sandbox_uids, or a worker with a subordinate id range")
    assert why in run.system_logs
