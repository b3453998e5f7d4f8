"""The executors' seccomp filters, attacked for real (issue 25): static programs compiled at
test time run as tasks under bwrap, proot and ch-run in the test registry's image.

- openat2 and the i386 ABI (int 0x80), which proot does not translate, read the host's
  files and listed the host's /proc from inside proot: now ENOSYS there, and never a host
  file anywhere;
- killing proot (its tracer) let a tracee go on untraced: now EPERM;
- new namespaces, keyrings, bpf, perf_event_open, userfaultfd, mount, setns: EPERM;
  clone3 ENOSYS (libc falls back to clone, whose flags the filter sees);
- proot without a filter (libseccomp missing) is refused unless the admin allows it, and
  `auto` says what it chose and why it skipped the others.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
from werkzeug.security import generate_password_hash

from funnel_hpc.worker import seccomp
from tests.image_helpers import ANONYMOUS
from tests.seccomp_helpers import compile_programs, parse
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for_state
from tests.worker.conftest import need

pytestmark = pytest.mark.registry

TESTIMAGE = f"{ANONYMOUS}/funnel/testimage:1"
ENGINES = {"bwrap": "bwrap", "proot": "proot", "charliecloud": "ch-run"}
ENOSYS, EPERM = "38", "1"
TERMINAL = ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED")
# what pyseccomp itself raises where libseccomp2 is not installed
NO_LIBSECCOMP = 'raise RuntimeError("Unable to find libseccomp")\n'


@pytest.fixture(scope="module")
def programs():
    """The attacker programs, in a directory any user may run them from."""
    directory = Path(tempfile.mkdtemp(prefix="funnel-attackers-", dir="/var/tmp"))
    directory.chmod(0o755)
    yield compile_programs(directory)
    shutil.rmtree(directory)


@pytest.fixture
def host_secret():
    """A world-readable file on the host, outside every bind: no task may read it."""
    directory = Path(f"/var/tmp/funnel-seccomp-{secrets.token_hex(4)}")
    directory.mkdir(mode=0o755)
    secret = directory / "secret.txt"
    secret.write_text(f"host-secret-{secrets.token_hex(8)}")
    secret.chmod(0o644)
    yield secret
    shutil.rmtree(directory)


@pytest.fixture(params=list(ENGINES))
def driver(request, harness):
    need(ENGINES[request.param])
    return request.param


def attack(harness, programs: dict[str, Path], name: str, *args: str) -> dict:
    """A task that runs attacker program `name` with `args` (staged as an input)."""
    for program in programs.values():
        shutil.copy(program, harness.data / program.name)
    return harness.task(
        inputs=[{"url": f"file://{harness.data / name}", "path": f"/attack/{name}"}],
        executors=[{"image": TESTIMAGE, "command": [
            "sh", "-c", (f'cp /attack/{name} /tmp/{name} && chmod 755 /tmp/{name} && '
                         f'exec /tmp/{name} "$@"'), name, *args]}])


def completed(run) -> dict[str, str]:
    logs = run.fold.task_log["logs"]
    assert run.state == "COMPLETE", (run.system_logs, run.stderr,
                                     [log.get("stderr") for log in logs], logs)
    return parse(run.executor(0)["stdout"])


def test_openat2_never_reads_the_host(harness, programs, driver, host_secret):
    hostname = Path("/etc/hostname").read_text().strip()
    run = harness.run(attack(harness, programs, "escape", str(host_secret), "/etc/hostname",
                             "/proc"), config=harness.config(container_driver=driver))
    found = completed(run)
    out = run.executor(0)["stdout"]
    assert host_secret.read_text() not in out, out
    if driver == "proot":  # untranslated: the filter answers ENOSYS before any path is used
        if os.uname().machine == "x86_64":  # the i386 ABI from a 64-bit process too
            assert found["int80 errno"] == ENOSYS, out
        assert found[f"{host_secret} errno"] == found["/etc/hostname errno"] == ENOSYS, out
        assert found["/proc errno"] == ENOSYS, out
        assert "seccomp proot" in run.system_logs
    else:  # the kernel resolves it in the sandbox's own mount namespace
        assert f"{host_secret} errno" in found, out
        assert found.get("/etc/hostname read", "").strip() != hostname or \
            hostname == "funnel-task", out
        if driver == "bwrap":  # ch-run has no pid namespace (SECURITY.md's driver table)
            assert int(found["/proc processes"]) < 5, out  # the sandbox's own
        assert f"seccomp {seccomp.POLICIES[0] if driver == 'bwrap' else driver}" in \
            run.system_logs


def test_a_tracee_cannot_kill_proot_to_go_untraced(harness, programs, host_secret):
    need("proot")
    run = harness.run(attack(harness, programs, "killer", str(host_secret)),
                      config=harness.config(container_driver="proot"))
    found = completed(run)
    for call in ("fcntl_setsig", "prlimit", "tgkill", "kill_group", "kill"):
        assert found[call] == EPERM, (call, run.executor(0))
    assert found[f"{host_secret} errno"] == "2", run.executor(0)  # ENOENT: the image's view


@pytest.mark.parametrize("engine", ["bwrap", "charliecloud"])
def test_namespaces_keyrings_bpf_and_perf_are_denied(harness, programs, engine):
    need(ENGINES[engine])
    control = subprocess.run([str(programs["calls"])], capture_output=True, text=True,
                             user=65534, group=65534, extra_groups=[], cwd="/", check=True)
    allowed_on_host = parse(control.stdout)
    assert allowed_on_host["keyctl"] == "0" and allowed_on_host["unshare"] == "0", \
        control.stdout  # so an EPERM below is the filter's
    run = harness.run(attack(harness, programs, "calls"),
                      config=harness.config(container_driver=engine))
    found = completed(run)
    denied = ["keyctl", "bpf", "perf_event_open", "userfaultfd"]
    if engine == "bwrap":  # ch-run's own set-up needs mount and namespaces
        denied += ["mount", "setns", "unshare"]
    if os.uname().machine == "x86_64":  # the same rules for i386 programs
        assert allowed_on_host["i386_keyctl"] == "0", control.stdout
        denied += ["i386_keyctl"] + (["i386_unshare"] if engine == "bwrap" else [])
    assert {name: found[name] for name in denied} == dict.fromkeys(denied, EPERM), found
    assert found["clone3"] == ENOSYS, found


def test_proot_without_a_filter_is_refused_unless_allowed(harness, programs, tmp_path,
                                                        host_secret):
    need("proot")
    fake = tmp_path / "no-libseccomp"
    fake.mkdir()
    (fake / "pyseccomp.py").write_text(NO_LIBSECCOMP)
    env = {"PYTHONPATH": str(fake)}
    refused = harness.run(attack(harness, programs, "escape", "/etc/hostname"),
                          config=harness.config(container_driver="proot"), extra_env=env)
    assert refused.state == "SYSTEM_ERROR"
    assert "container driver proot: refused: no seccomp filter" in refused.system_logs
    assert "worker.allow_unfiltered_proot" in refused.system_logs
    assert not refused.fold.task_log["logs"] or not refused.executor(0).get("stdout")

    auto = harness.run(harness.task(executors=[{"image": TESTIMAGE, "command": ["true"]}]),
                       config=harness.config(container_driver="auto",
                                             auto_order=["docker", "proot"]), extra_env=env)
    assert auto.state == "SYSTEM_ERROR"
    assert ("no container driver works here (tried docker (its probe failed here); "
            "proot (refused: no seccomp filter") in auto.system_logs

    allowed = harness.run(attack(harness, programs, "escape", str(host_secret)),
                          config=harness.config(container_driver="proot",
                                                allow_unfiltered_proot=True), extra_env=env)
    found = completed(allowed)
    # the control: unfiltered, the escapes are real (why proot is refused by default)
    assert found[f"{host_secret} read"] == host_secret.read_text(), allowed.executor(0)
    if os.uname().machine == "x86_64":
        assert found["int80 read"] == host_secret.read_text(), allowed.executor(0)
    assert "driver proot WITHOUT a seccomp filter" in allowed.system_logs
    assert "NO seccomp filter" in allowed.system_logs


def test_auto_says_what_it_chose_and_why(harness):
    need("proot")
    run = harness.run(harness.task(executors=[{"image": TESTIMAGE, "command": ["true"]}]),
                      config=harness.config(container_driver="auto",
                                            auto_order=["docker", "proot", "bwrap"]))
    assert run.state == "COMPLETE", (run.system_logs, run.fold.task_log["logs"])
    assert "container driver auto: chose proot; skipped docker (its probe failed here)" in \
        run.system_logs
    assert "seccomp proot" in run.system_logs


def test_proot_is_refused_for_an_owned_task_while_executors_share_a_user(harness):
    """Any process of the shared sandbox user can SIGKILL another task's proot, whose
    tracees then run untraced (proot sets no PTRACE_O_EXITKILL): with auth on (the task has
    an owner) proot is refused, and auto goes on to bwrap, saying why."""
    need("proot")
    owned = {"owner": "alice", "executors": [{"image": TESTIMAGE, "command": ["true"]}]}
    refused = harness.run(harness.task(**owned),
                          config=harness.config(container_driver="proot"))
    assert refused.state == "SYSTEM_ERROR"
    assert ("container driver proot: refused for a task with an owner (auth on): executors "
            "share one host user (nobody)") in refused.system_logs
    auto = harness.run(harness.task(**owned), config=harness.config(
        container_driver="auto", auto_order=["proot", "bwrap"]))
    assert auto.state == "COMPLETE", auto.system_logs
    assert ("container driver auto: chose bwrap; skipped proot (refused for a task with an "
            "owner") in auto.system_logs
    unowned = harness.run(harness.task(executors=owned["executors"]),
                          config=harness.config(container_driver="proot"))
    assert unowned.state == "COMPLETE", unowned.system_logs  # auth off: one user


def test_a_real_server_with_auth_refuses_unfiltered_proot(tmp_path, harness):
    """The gateway as root, auth on, local backend, two users' tasks: with no libseccomp on
    the node proot is refused for each, and says why in the task's system logs."""
    need("proot")
    fake = tmp_path / "no-libseccomp"
    fake.mkdir()
    (fake / "pyseccomp.py").write_text(NO_LIBSECCOMP)
    users = {"alice": "pw-a", "bob": "pw-b"}
    server = ServerProcess(tmp_path / "gateway", f"sqlite:///{tmp_path}/funnel.db",
                           reconcile=True, overrides={
                               "backend": {"name": "local"},
                               "reconciler": {"interval_seconds": 0.2},
                               "auth": {"mode": "basic", "users": {
                                   name: generate_password_hash(password)
                                   for name, password in users.items()}},
                               "worker": {"container_driver": "proot", "command": [
                                   "env", f"PYTHONPATH={fake}", sys.executable, "-m",
                                   "funnel_hpc.worker", "run"]}})
    server.start()
    try:
        for name, password in users.items():
            created = requests.post(server.api + "/tasks", auth=(name, password), timeout=10,
                                    json={"executors": [{"image": TESTIMAGE,
                                                         "command": ["cat", "/etc/hostname"]}]})
            created.raise_for_status()
            task = wait_for_state(server.api, created.json()["id"], TERMINAL, 120,
                                  auth=(name, password), detail=lambda: server.log()[-3000:])
            assert task["state"] == "SYSTEM_ERROR", task
            logs = "\n".join(task["logs"][0]["system_logs"])
            assert "container driver proot: refused: no seccomp filter" in logs, logs
    finally:
        server.stop()


def test_a_filter_is_built_once_per_architecture_and_policy(tmp_path):
    paths = {policy: seccomp.filter_file(str(tmp_path), policy) for policy in seccomp.POLICIES}
    assert len(set(paths.values())) == len(seccomp.POLICIES)
    for policy, path in paths.items():
        assert os.path.basename(path).startswith(f"{os.uname().machine}-{policy}-")
        size, built = os.stat(path).st_size, os.stat(path).st_mtime_ns
        assert size > 0 and size % 8 == 0  # struct sock_filter entries
        assert seccomp.filter_file(str(tmp_path), policy) == path
        assert os.stat(path).st_mtime_ns == built  # the cached one: not built again
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_cache_that_cannot_be_written_gives_a_filter_in_memory(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    path = seccomp.filter_file(str(not_a_directory), "proot")
    assert path.startswith("/proc/self/fd/")
    reference = Path(seccomp.filter_file(str(tmp_path), "proot")).read_bytes()
    first, second = seccomp.open_path(path), seccomp.open_path(path)
    try:  # each descriptor its own offset: bwrap reads its own from the start
        assert os.read(first, 1 << 16) == os.read(second, 1 << 16) == reference
    finally:
        os.close(first)
        os.close(second)
