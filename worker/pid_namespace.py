"""A pid namespace around ch-run and proot, which have none of their own.

Contract: the engine is started under util-linux ``unshare --pid --fork --kill-child
--mount-proc --ipc`` behind ``setpriv --pdeathsig KILL`` (a root worker: dropped to the
task's identity with ``--setuid/--setgid``, which also clears the groups; otherwise in a
user namespace of the worker's own uid), so the task sees only its own processes and,
when the namespace's pid 1 ends, the kernel kills every process the executor left (a
``setsid`` or double-forked daemon too); a killed worker takes it along. ch-run is started
under the host's ``sh`` as that pid 1 (the executor, which ch-run execs, would ignore its own
signals as pid 1); proot stays pid 1 and waits for everything it traces, so
ProotReaper kills the rest once the executor (pid 2) has ended.

Cost: two short execs per executor; for proot a thread per executor and a /proc scan
when the executor ends.
"""

from __future__ import annotations

import os
import select
import signal

from funnel_hpc.worker.identity import SWEEP_PAUSE_SECONDS

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from subprocess import Popen

    from funnel_hpc.worker.identity import Identity


class ProotReaper:
    """proot waits for every process it traces, so its pid namespace would outlive the
    executor for as long as a daemon the executor left runs: once the executor (pid 2 of
    the namespace: proot's first child) has ended, every other process of that namespace
    but proot (pid 1) is killed; proot then ends with the executor's status. A thread per
    executor, waiting on a pidfd."""

    pass_fds = ()

    def started(self, proc: Popen[bytes]) -> None:
        import threading

        threading.Thread(target=self._watch, args=(proc,), daemon=True,
                         name="proot-reaper").start()

    def _watch(self, proc: Popen[bytes]) -> None:
        import time

        init = _first_child(proc.pid, proc)  # unshare's only child: proot, pid 1 inside
        if init is None:
            return  # ended already: the kernel took the namespace along
        try:
            namespace = os.readlink(f"/proc/{init}/ns/pid")
        except OSError:
            return
        while proc.poll() is None:
            members = _members(namespace)
            main = next((pid for pid, inner in members if inner == 2), None)
            if main is not None:
                _wait_for_exit(main, proc)
                break
            if any(inner > 2 for _pid, inner in members):
                break  # the executor has ended and been reaped; what it left has not
            time.sleep(0.01)
        while proc.poll() is None and _kill_namespace(namespace, spare=init):
            time.sleep(SWEEP_PAUSE_SECONDS)


def _first_child(parent: int, proc: Popen[bytes]) -> int | None:
    """A child of `parent` once it has one; None if proc ended first."""
    import time

    while proc.poll() is None:
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as children:
                pids = [int(word) for word in children.read().split()]
        except OSError:  # a kernel without CONFIG_PROC_CHILDREN, or parent gone
            pids = [pid for pid in _all_pids() if _parent_of(pid) == parent]
        if pids:
            return min(pids)
        time.sleep(0.01)
    return None


def _wait_for_exit(pid: int, proc: Popen[bytes]) -> None:
    """Until `pid` has ended and its parent (proot) has reaped it: proot has then taken
    its exit status and the forks it made before, and killing the rest changes neither
    (measured: killing a just-forked daemon before proot saw the fork made proot exit 1)."""
    import time

    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # gone already
    try:
        while proc.poll() is None and not select.select([pidfd], [], [], 1.0)[0]:
            pass
    finally:
        os.close(pidfd)
    while proc.poll() is None and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.01)


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            return int(stat_file.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _members(namespace: str) -> list[tuple[int, int]]:
    """(host pid, pid inside) of the live processes of the pid namespace `namespace`."""
    members = []
    for pid in _all_pids():
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") != namespace:
                continue
            with open(f"/proc/{pid}/status", "rb") as status:
                fields = dict(line.split(b":", 1) for line in status if b":" in line)
        except OSError:
            continue  # gone meanwhile
        if fields.get(b"State", b"Z").split()[0] not in (b"Z", b"X"):
            members.append((pid, int(fields[b"NSpid"].split()[-1])))
    return members


def _kill_namespace(namespace: str, spare: int) -> bool:
    """SIGKILL every live process of the pid namespace `namespace` but `spare`; any?"""
    found = False
    for pid, _inner in _members(namespace):
        if pid == spare:
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == namespace:  # still the same process
                found = True
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass  # gone meanwhile
        finally:
            os.close(pidfd)
    return found


def wrapper_argv(identity: Identity | None, drop: bool = True) -> list[str]:
    """The command that starts ch-run or proot in a new pid, mount (a fresh /proc) and ipc
    namespace that dies with it: as root, then as the identity (no groups; drop False: the
    next command drops to it itself, as seccomp_exec does); a worker that is not root makes
    a user namespace of its own uid for it. setpriv's parent-death signal ends the
    namespace if the worker itself is killed."""
    argv = ["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--pid", "--fork",
            "--kill-child", "--mount-proc", "--ipc"]
    if identity is None:  # --map-user (util-linux 2.36+), not 2.38's --map-current-user
        argv += [f"--map-user={os.getuid()}", f"--map-group={os.getgid()}"]
    elif drop:
        argv += ["--setgid", str(identity.gid), "--setuid", str(identity.uid)]
    return argv + ["--"]
