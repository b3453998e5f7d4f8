"""One host identity per task (issue 25): with worker.sandbox_uids each running task's
sandbox is its own host uid with a whole id range inside bwrap, and every driver's task
dies whole with its executor. Attacked for real with two real local users' tasks running at
once under bwrap, proot and charliecloud, by a root worker."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
import yaml
from werkzeug.security import generate_password_hash

from funnel_hpc.core.config import ConfigError, WorkerSection
from funnel_hpc.core.events import read_event_log
from funnel_hpc.worker import identity, sandbox
from funnel_hpc.worker.identity import BLOCK
from funnel_hpc.worker.sandbox import SandboxError
from tests.server_helpers import TEST_REGISTRIES, ServerProcess, clean_env, funnel_argv
from tests.waiting import wait_for, wait_for_state
from tests.worker.conftest import need, need_registry
from tests.worker_helpers import worker_section

pytestmark = [pytest.mark.registry,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: users, uid slots")]

TESTIMAGE = "127.0.0.1:5055/funnel/testimage:1"  # busybox-like (scripts/setup/45-registry.sh)
DEBIAN = "127.0.0.1:5055/funnel/snakemake:1"  # Debian 12 with GNU tar (46-workflow-image.sh)
FIRST = 1_500_000_000  # far from any account and from /etc/subuid ranges
SLOTS = 4
ENGINES = {"bwrap": "bwrap", "proot": "proot", "charliecloud": "ch-run"}
TERMINAL = ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED")


def in_image(script: str, image: str = TESTIMAGE) -> dict:
    return {"image": image, "command": ["sh", "-c", script]}


def ok(run) -> list[dict]:
    assert run.state == "COMPLETE", (run.system_logs, run.stderr, run.fold.task_log["logs"])
    return run.fold.task_log["logs"]


def in_range(uid: int) -> bool:
    return FIRST <= uid < FIRST + SLOTS * BLOCK


def processes() -> dict[int, tuple[int, str]]:
    """Host pid -> (real uid, command line) of every process now."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields["State"].split()[0] in ("Z", "X"):
            continue  # a zombie runs nothing, and its parent may not have reaped it yet
        found[int(name)] = (int(fields["Uid"].split()[0]), cmdline.strip())
    return found


def with_command(text: str) -> list[tuple[int, int]]:
    """(pid, uid) of the processes whose command line is `text`."""
    return [(pid, uid) for pid, (uid, cmdline) in processes().items() if cmdline == text]


def as_uid(uid: int, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                           *argv], capture_output=True, text=True, timeout=60)


@pytest.fixture
def slots(tmp_path):
    """worker.sandbox_uids for the test's workers, with its own lock directory."""
    return {"first": FIRST, "count": SLOTS, "lock_dir": str(tmp_path / "uid-locks")}


@pytest.fixture(params=list(ENGINES))
def driver(request, harness):
    need(ENGINES[request.param])
    return request.param


@pytest.fixture
def people():
    """Two real local users (like alice and bob), each with a 700 directory of their own
    under a shared 755 one that allowed_dirs names."""
    names = [f"fh{who}{secrets.token_hex(3)}" for who in ("a", "b")]
    for name in names:
        subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", name], check=True)
    shared = Path(tempfile.mkdtemp(prefix="identity-", dir="/tmp"))
    shared.chmod(0o755)
    for name in names:
        (shared / name).mkdir(mode=0o700)
        shutil.chown(shared / name, name, name)
    yield names[0], names[1], shared
    shutil.rmtree(shared)
    for name in names:
        subprocess.run(["userdel", name], check=True)


def test_two_tasks_get_their_own_uids_and_cannot_reach_each_other(harness, driver, slots,
                                                                    people):
    alice, bob, shared = people
    config = harness.config(container_driver=driver, sandbox_uids=slots,
                            allowed_dirs=[str(shared)])
    alices = harness.task(owner=alice, volumes=["/data"], executors=[in_image(
        "echo alice-secret > /data/secret.txt; chmod 600 /data/secret.txt; exec sleep 3001")])
    worker_a = harness.start(alices, config)
    try:
        (pid_a, uid_a), = wait_for(lambda: with_command("sleep 3001"), 120,
                                   "alice's executor", detail=lambda: worker_a.poll())
        secret = harness.workdir / alices["id"] / "files" / "data" / "secret.txt"
        wait_for(secret.exists, 30, "alice's secret file")
        attack = (f"kill -9 {pid_a}; echo kill=$?; cat /proc/{pid_a}/environ; echo environ=$?;"
                  f" cat /proc/{pid_a}/root/data/secret.txt; echo root=$?;"
                  f" cat {secret}; echo read=$?; echo done > /data/result; exec sleep 3002")
        bobs = harness.task(owner=bob, volumes=["/data"], executors=[in_image(attack)])
        worker_b = harness.start(bobs, config)
        try:
            (_pid_b, uid_b), = wait_for(lambda: with_command("sleep 3002"), 120,
                                        "bob's executor", detail=lambda: worker_b.poll())
            assert in_range(uid_a) and in_range(uid_b) and uid_a != uid_b
            assert (uid_a - FIRST) % BLOCK == 0 and (uid_b - FIRST) % BLOCK == 0
            assert with_command("sleep 3001") == [(pid_a, uid_a)]  # alice's survived
            # and were bob's sandbox escaped to the host, his uid still could not
            assert "Operation not permitted" in as_uid(uid_b, "kill", "-9", str(pid_a)).stderr
            for path in (f"/proc/{pid_a}/environ", str(secret)):
                assert as_uid(uid_b, "cat", path).returncode != 0, path
            assert with_command("sleep 3001") == [(pid_a, uid_a)]
        finally:
            worker_b.terminate()
            out_b = worker_b.communicate(timeout=120)
    finally:
        worker_a.terminate()
        worker_a.communicate(timeout=120)
    logs = harness.workdir / bobs["id"] / "events.jsonl"
    stdout = read_event_log(logs).task_log["logs"][0]["stdout"]
    for word in ("kill=", "environ=", "root=", "read="):
        assert f"{word}0" not in stdout and word in stdout, (stdout, out_b)
    assert "alice-secret" not in stdout
    assert not with_command("sleep 3001") and not with_command("sleep 3002")


def test_root_inside_unpacks_archives_and_outputs_leave_the_block(harness, slots, people):
    """GNU tar x as root of entries owned by 1001 and 0, chown 1001:1001, a set-user-ID file:
    all work inside; the outputs arrive the owner's, the kept files the worker's."""
    alice, _bob, shared = people
    script = ("set -e; cd /work; mkdir -p src/deep; echo a > src/deep/a; echo b > src/b;"
              " chown -R 1001:1001 src/deep; tar --numeric-owner -cf t.tar src; rm -rf src;"
              " mkdir -p /out/x; tar -C /out/x -xf t.tar; echo f > /out/f;"
              " chown 1001:1001 /out/f; cp /bin/true /out/suid; chmod 4755 /out/suid;"
              " stat -c '%u:%g %n' /out/f /out/x/src/deep/a /out/x/src/b; id -u;"
              " head -1 /proc/self/uid_map")
    task = harness.task(owner=alice, inputs=[{"path": "/work/keep", "content": "k"}],
                        outputs=[{"path": "/out", "type": "DIRECTORY",
                                  "url": f"file://{shared}/{alice}/out"}],
                        executors=[in_image(script, image=DEBIAN)])
    run = harness.run(task, harness.config(sandbox_uids=slots, allowed_dirs=[str(shared)]),
                      timeout=300)
    stdout = ok(run)[0]["stdout"].split("\n")
    assert stdout[:4] == ["1001:1001 /out/f", "1001:1001 /out/x/src/deep/a",
                          "0:0 /out/x/src/b", "0"], stdout
    assert stdout[4].split()[0::2] == ["0", str(BLOCK)] and in_range(int(stdout[4].split()[1]))
    alice_uid = int(subprocess.run(["id", "-u", alice], capture_output=True, check=True,
                                   text=True).stdout)
    out = shared / alice / "out"
    uploaded = [out / "f", out / "x" / "src" / "deep" / "a", out / "x" / "src" / "b",
                out / "suid"]
    for path in uploaded:
        assert path.stat().st_uid == alice_uid, path
    assert not out.joinpath("suid").stat().st_mode & 0o6000
    kept = [run.task_dir / "files"] + list((run.task_dir / "files").rglob("*"))
    assert len(kept) > 8
    for path in kept:
        info = path.lstat()
        assert (info.st_uid, info.st_gid) == (0, 0), (path, info.st_uid)
        assert not info.st_mode & 0o6000 or path.is_dir(), path


@pytest.mark.parametrize("mode", ["slot", "shared"])
def test_nothing_of_a_task_survives_it_and_dev_shm_is_its_own(harness, driver, slots, mode):
    marker = f"shm-{secrets.token_hex(4)}"
    script = (f"echo x > /dev/shm/{marker} && echo shm-written; ls /dev/shm;"
              " setsid sleep 4001 </dev/null >/dev/null 2>&1 &"
              " (sh -c 'sleep 4002 </dev/null >/dev/null 2>&1 &' &); sleep 1; echo started")
    settings = {"sandbox_uids": slots} if mode == "slot" else {}
    config = harness.config(container_driver=driver, **settings)
    # one executor per task: every pytest session that starts meanwhile (other suites on
    # this machine) chmods /tmp/pytest-of-root, dropping the ACL mask the worker granted
    exits = harness.run(harness.task(executors=[
        in_image("setsid sleep 4003 </dev/null >/dev/null 2>&1 & exit 3")]), config)
    assert exits.state == "EXECUTOR_ERROR", (exits.system_logs, exits.executor(0))
    assert exits.executor(0)["exit_code"] == 3  # the executor's own status, daemon or not
    run = harness.run(harness.task(executors=[in_image(script)]), config)
    stdout = ok(run)[0]["stdout"]
    assert "shm-written" in stdout and stdout.endswith("started\n"), stdout
    assert stdout.split("\n")[1] == marker, stdout  # nothing of the host's /dev/shm
    assert not Path("/dev/shm", marker).exists()
    for command in ("sleep 4001", "sleep 4002", "sleep 4003"):
        assert not with_command(command), command
    assert not [pid for pid, (uid, _cmd) in processes().items() if in_range(uid)]


def take(worker: WorkerSection) -> identity.Identity:
    taken = identity.acquire(worker)
    assert taken is not None  # a root worker always gets one
    return taken


def test_slots_are_taken_in_turn_and_a_dead_workers_slot_is_free_again(tmp_path):
    locks = tmp_path / "locks"
    worker = worker_section(sandbox_uids={"first": FIRST, "count": 2, "lock_dir": str(locks)})
    one, two = take(worker), take(worker)
    assert (one.ids, two.ids) == ((FIRST, FIRST), (FIRST + BLOCK, FIRST + BLOCK))
    assert one.block and two.block and (locks.stat().st_mode & 0o777) == 0o700
    with pytest.raises(SandboxError, match="all 2 slots"):
        identity.acquire(worker)
    one.release()
    two.release()
    # a worker killed while it holds slot 0, and a process its task left behind
    hold = ("import fcntl, os, time\n"
            f"fd = os.open({str(locks / str(FIRST))!r}, os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    left = subprocess.Popen(["setpriv", f"--reuid={FIRST + 7}", f"--regid={FIRST + 7}",
                             "--clear-groups", "sleep", "4100"], start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        taken = take(worker)
        assert taken.uid == FIRST + BLOCK and left.poll() is None  # slot 0 is still held
        taken.release()
        holder.kill()
        holder.wait(60)
        again = take(worker)
        assert again.uid == FIRST
        assert left.wait(60) == -9  # killed before the slot was handed out again
        again.release()
    finally:
        for proc in (holder, left):
            if proc.poll() is None:
                proc.kill()
                proc.wait(60)


def test_a_range_that_is_wrong_or_a_lock_dir_not_roots_is_refused(tmp_path):
    def acquire(**uids):
        return identity.acquire(worker_section(sandbox_uids={"lock_dir": str(tmp_path / "l"),
                                                             **uids}))

    for bad in ({"first": 1000, "count": 1}, {"first": FIRST, "count": 0},
                {"first": 0xFFFF0000, "count": 2}, {"first": "x", "count": 1}):
        with pytest.raises((SandboxError, ConfigError), match="sandbox_uids"):
            acquire(**bad)  # a value of the wrong type: refused as the configuration loads
    (tmp_path / "l").mkdir(mode=0o700)
    os.chown(tmp_path / "l", 65534, 65534)
    with pytest.raises(SandboxError, match="owned by root"):
        acquire(first=FIRST, count=1)
    nobody = identity.acquire(worker_section(sandbox_user="nobody", sandbox_uids={"first": 0}))
    assert nobody is not None and not nobody.block and nobody.ids == (65534, 65534)


@pytest.mark.parametrize("engine", ["proot", "charliecloud"])
def test_a_worker_that_is_not_root_still_runs_them_in_a_pid_namespace(engine, people):
    """submit_as_owner: the worker is the owner itself; ch-run and proot then run in a user
    namespace of the owner's own uid with a pid namespace, and die whole all the same."""
    need(ENGINES[engine])
    need_registry()
    alice, _bob, shared = people
    home = shared / alice
    config = home / "config.yaml"
    config.write_text(yaml.safe_dump({"worker": {
        "registries": TEST_REGISTRIES, "image_cache": str(home / "cache"),
        "container_driver": engine, "keep_workdir": "always"}}))
    marker = f"shm-{secrets.token_hex(4)}"
    task = {"id": "own1", "executors": [in_image(
        f"echo x > /dev/shm/{marker}; ls /dev/shm; echo pid=$$;"
        " setsid sleep 4201 </dev/null >/dev/null 2>&1 &"
        " (sh -c 'sleep 4202 </dev/null >/dev/null 2>&1 &' &); echo started")]}
    (home / "own1.json").write_text(json.dumps(task))
    for path in (config, home / "own1.json"):
        shutil.chown(path, alice, alice)
    account = pwd.getpwnam(alice)
    with python_reachable_by(account.pw_uid, account.pw_gid):
        worker = run_as(account, home, config)
    fold = read_event_log(home / "work" / "own1" / "events.jsonl")
    assert fold.state == "COMPLETE", (worker.stderr, fold.task_log)
    stdout = fold.task_log["logs"][0]["stdout"]
    # charliecloud: the host's sh is init (1), the executor 2; proot: proot is 1, the
    # image's sh waiting for the command (exit codes) 2, the command 3
    assert stdout.split("\n")[:2] == [marker, "pid=2" if engine == "charliecloud" else "pid=3"]
    assert not Path("/dev/shm", marker).exists()
    assert not with_command("sleep 4201") and not with_command("sleep 4202")


def run_as(account: pwd.struct_passwd, home: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        funnel_argv("worker", "run", "--task-file", str(home / "own1.json"), "--workdir",
                    str(home / "work"), "--config", str(config)),
        env=clean_env(HOME=str(home)), cwd=home, user=account.pw_uid,
        group=account.pw_gid, extra_groups=[], capture_output=True, text=True, timeout=300)


@contextlib.contextmanager
def python_reachable_by(uid: int, gid: int):
    """This test's Python may live under a 700 directory (pyenv in /root): let uid search
    the directories above it for the test's length (ACL entries, as the worker grants),
    then put their ACLs back as they were."""
    interpreter = os.path.realpath(sys.executable)
    parts = interpreter.split("/")[1:-1]
    above = ["/" + "/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    saved: dict[str, tuple[int, bytes | None]] = {}
    for path in above:
        try:
            saved[path] = (os.stat(path).st_mode, os.getxattr(path, sandbox.ACL_XATTR))
        except OSError:
            saved[path] = (os.stat(path).st_mode, None)
    sandbox.grant_traverse(interpreter, uid, gid)
    try:
        yield
    finally:
        for path, (mode, acl) in saved.items():
            if acl is None:
                with contextlib.suppress(OSError):
                    os.removexattr(path, sandbox.ACL_XATTR)
            else:
                os.setxattr(path, sandbox.ACL_XATTR, acl)
            os.chmod(path, stat.S_IMODE(mode))  # an ACL's mask shows in the group bits


def test_through_the_server_bobs_task_cannot_touch_alices(people, tmp_path):
    """The real server as root, auth on, local backend, two real users: each task is its own
    slot, and bob's task cannot kill alice's running executor or read her files."""
    need("bwrap")
    need_registry()
    alice, bob, _shared = people
    users = {name: generate_password_hash("pw") for name in (alice, bob)}
    srv = ServerProcess(tmp_path / "srv", f"sqlite:///{tmp_path}/funnel.db", reconcile=True,
                        overrides={"auth": {"mode": "basic", "users": users},
                                   "backend": {"name": "local"},
                                   "reconciler": {"interval_seconds": 0.3},
                                   "worker": {"container_driver": "bwrap",
                                              "sandbox_uids": {
                                                  "first": FIRST, "count": SLOTS,
                                                  "lock_dir": str(tmp_path / "locks")}}}).start()
    try:
        hers = requests.post(srv.api + "/tasks", auth=(alice, "pw"), timeout=10, json={
            "volumes": ["/data"], "executors": [in_image(
                "echo alice-secret > /data/secret; chmod 600 /data/secret; exec sleep 3201")]})
        assert hers.status_code == 200, hers.text
        (pid_a, uid_a), = wait_for(lambda: with_command("sleep 3201"), 120, "alice's executor",
                                   detail=lambda: srv.log()[-2000:])
        secret = next((tmp_path / "srv").rglob(f"{hers.json()['id']}/files/data/secret"))
        attack = (f"kill -9 {pid_a}; echo kill=$?; cat /proc/{pid_a}/environ; echo env=$?;"
                  f" cat {secret}; echo read=$?; cat /proc/self/uid_map")
        his = requests.post(srv.api + "/tasks", auth=(bob, "pw"), timeout=10,
                            json={"executors": [in_image(attack)]})
        assert his.status_code == 200, his.text
        task = wait_for_state(srv.api, his.json()["id"], TERMINAL, 120, auth=(bob, "pw"),
                              detail=lambda: srv.log()[-2000:])
        assert with_command("sleep 3201") == [(pid_a, uid_a)]  # alice's still runs
        canceled = requests.post(f"{srv.api}/tasks/{hers.json()['id']}:cancel",
                                 auth=(alice, "pw"), timeout=10)
        assert canceled.status_code == 200, canceled.text
        wait_for_state(srv.api, hers.json()["id"], "CANCELED", 120, auth=(alice, "pw"))
    finally:
        srv.stop()
    assert task["state"] == "COMPLETE", task["logs"]
    stdout = task["logs"][0]["logs"][0]["stdout"]
    for word in ("kill=", "env=", "read="):
        assert word in stdout and f"{word}0" not in stdout, stdout
    assert "alice-secret" not in stdout
    uid_map = stdout.strip().split("\n")[-1].split()  # root inside is bob's slot outside
    assert uid_map[0] == "0" and uid_map[2] == str(BLOCK) and int(uid_map[1]) != uid_a
    assert in_range(uid_a) and in_range(int(uid_map[1]))
    wait_for(lambda: not [p for p, (uid, _c) in processes().items() if in_range(uid)], 60,
             "no process left with a slot's ids")
