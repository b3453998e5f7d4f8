"""Issue 25's warm start: each executor is forked inside the task's cgroup by the task's
launcher (worker/launcher.py), so no executor start moves a process between cgroups. What
the launcher must keep of Popen (exit codes, signals, fds at their numbers, the user,
env, cwd, the file size limit), that it is the one forking, that what an executor leaves
behind dies with it but the launcher does not, and that starts still work once the
launcher is gone. Real cgroups, real processes, as root."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.limits_helpers import need_cgroups, processes_with
from tests.waiting import wait_for
from tests.worker.conftest import need

SCRIPT = "cat; echo side >&29; id -u; id -G; pwd; echo $ONLY; echo oops >&2"


@pytest.fixture
def group():
    need_cgroups("pids", "memory")
    from funnel_hpc.worker import cgroups

    limits = cgroups.Limits(memory_bytes=1 << 30, pids_max=256)
    made = cgroups.create(f"warm{random.randrange(1 << 30)}", limits)
    wait_for(made.launcher_pid, 60, "the launcher to take starts")
    yield made
    assert made.remove() == []
    assert not any(os.path.exists(path) for path in made.dirs)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def run(cgroup, argv: list[str], **popen) -> tuple[int, str, str]:
    proc = cgroup.start(argv, popen.pop("fsize", None), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, **popen)
    out, err = proc.stdout.read(), proc.stderr.read()
    code = proc.wait(60)
    proc.stdout.close()
    proc.stderr.close()
    return code, out.decode(), err.decode()


def test_an_executor_is_in_the_tasks_group_from_its_first_instruction(group):
    """cat reads /proc/self/cgroup at once: every hierarchy the group uses names it (a
    process moved in after its start would show the worker's group here)."""
    code, out, _err = run(group, ["cat", "/proc/self/cgroup"])
    assert code == 0
    lines = [line for line in out.splitlines() if f"/funnel-hpc/{group.name}" in line]
    assert len(lines) == len(group.dirs), out  # v2 and each v1 controller used


def test_the_launcher_forks_each_executor_and_outlives_it(group):
    proc = group.start(["sleep", "30"], stdout=subprocess.DEVNULL, start_new_session=True)
    launcher = parent_of(proc.pid)
    assert launcher != os.getpid() and launcher in group.pids()
    os.killpg(proc.pid, signal.SIGTERM)  # as a cancel does: its own process group
    assert proc.wait(30) == -signal.SIGTERM
    group.end_leftovers()
    assert group.pids() == [launcher]
    second = group.start(["sleep", "30"], stdout=subprocess.DEVNULL)
    assert parent_of(second.pid) == launcher
    group.kill_all()
    assert second.wait(30) == -signal.SIGKILL


def test_exit_codes_signals_and_exec_failures_are_popens(group):
    assert run(group, ["sh", "-c", "exit 7"])[0] == 7
    assert run(group, ["sh", "-c", "kill -USR1 $$"])[0] == -signal.SIGUSR1
    with pytest.raises(OSError) as failure:
        group.start(["/no/such/engine"], stdout=subprocess.DEVNULL)
    assert failure.value.errno == errno.ENOENT
    assert run(group, ["true"])[0] == 0  # the launcher took it in its stride


def test_fds_user_env_cwd_and_file_size_reach_the_executor(group, tmp_path):
    stdin = tmp_path / "in"
    stdin.write_text("from stdin\n")
    side = tmp_path / "side"
    with open(side, "wb") as side_file, open(stdin, "rb") as stdin_file:
        number = os.dup2(side_file.fileno(), 29, inheritable=False)
        try:
            code, out, err = run(
                group, ["bash", "-c", SCRIPT], stdin=stdin_file, pass_fds=(number,),
                env={"ONLY": "this", "PATH": "/usr/bin:/bin"}, cwd="/tmp", user=65534,
                group=65534, extra_groups=[])
        finally:
            os.close(number)
    assert (code, err) == (0, "oops\n")
    assert out.splitlines() == ["from stdin", "65534", "65534", "/tmp", "this"]
    assert side.read_text() == "side\n"
    big = {f"BIG{index}": str(index) * 100_000 for index in range(4)}  # > a socket buffer
    code, out, _err = run(group, ["sh", "-c", "echo ${#BIG0} ${#BIG3}"], env=big)
    assert (code, out) == (0, "100000 100000\n")
    code, out, _err = run(group, ["ls", "/proc/self/fd"], pass_fds=())
    assert (code, out.split()) == (0, ["0", "1", "2", "3"])  # 3: ls's own; no launcher fd
    target = tmp_path / "big"
    code, _out, _err = run(group, ["sh", "-c", f"exec head -c 100000 /dev/zero > {target}"],
                           fsize=8192)
    assert code == -signal.SIGXFSZ and target.stat().st_size == 8192


def test_what_an_executor_leaves_running_dies_with_it_not_the_launcher(group):
    """A setsid daemon and a forking loop left behind: end_leftovers kills them (the
    group frozen meanwhile), the launcher stays and forks the next executor."""
    mark = str(600 + random.randrange(10_000, 99_999))
    script = (f"setsid sleep {mark} </dev/null >/dev/null 2>&1 & "
              f"(setsid sh -c 'while :; do sleep {mark} & sleep 0.01; done' "
              "</dev/null >/dev/null 2>&1 &); sleep 0.2")
    code, _out, _err = run(group, ["sh", "-c", script])
    assert code == 0 and processes_with(mark)
    launcher = group.launcher_pid()
    group.end_leftovers()
    wait_for(lambda: group.pids() == [launcher], 30, "only the launcher in the group",
             detail=group.pids)
    assert not processes_with(mark)
    assert run(group, ["sh", "-c", "echo $PPID"])[:2] == (0, f"{launcher}\n")


def test_an_executor_cannot_kill_or_trace_its_launcher(group):
    """The executor runs as the sandbox user; the launcher, its parent, is root's."""
    launcher = group.launcher_pid()
    attack = "kill -9 $PPID; echo kill=$?; cat /proc/$PPID/environ; echo environ=$?"
    code, out, _err = run(group, ["sh", "-c", attack], user=65534, group=65534,
                          extra_groups=[])
    assert "kill=1" in out and "environ=1" in out, out
    assert group.launcher_pid() == launcher
    assert run(group, ["sh", "-c", "echo $PPID"])[1] == f"{launcher}\n"


def test_starts_go_the_old_way_once_the_launcher_is_gone(group):
    group.kill_all()  # a cancel: the launcher goes with the rest
    code, out, _err = run(group, ["cat", "/proc/self/cgroup"])
    assert code == 0 and f"/funnel-hpc/{group.name}" in out
    proc = group.start(["true"])
    assert isinstance(proc, subprocess.Popen) and proc.wait(30) == 0


def test_the_launcher_ends_with_its_worker(tmp_path):
    """kill -9 of a worker holding a group: its launcher sees EOF and its reaper kills
    the group; nothing is left."""
    need_cgroups("pids")
    mark = str(600 + random.randrange(10_000, 99_999))
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys, subprocess\n"
        "from funnel_hpc.worker import cgroups\n"
        "import time\n"
        "group = cgroups.create('warmdead', cgroups.Limits(pids_max=64))\n"
        "while group.launcher_pid() is None:\n"
        "    time.sleep(0.01)\n"
        f"proc = group.start(['sleep', '{mark}'], stdout=subprocess.DEVNULL)\n"
        "print(group.dirs[0], group.launcher_pid(), flush=True)\n"
        "proc.wait()\n")
    worker = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              text=True)
    assert worker.stdout is not None
    group_dir, launcher = worker.stdout.readline().split()
    assert processes_with(mark)
    worker.kill()
    worker.wait(30)
    worker.stdout.close()
    wait_for(lambda: not processes_with(mark) and not os.path.exists(group_dir)
             and not os.path.exists(f"/proc/{launcher}"), 30,
             "the group, its processes and its launcher gone")


def test_the_reaper_removes_a_group_whose_rmdir_fails_at_first(tmp_path):
    """The kernel refuses rmdir (EBUSY) while the last exits of a group are accounted; the
    reaper tried once and left the group (seen after a kill -9 of a proot worker). A plain
    directory stands in: rmdir fails while it holds a file, removed a moment later."""
    from funnel_hpc.worker import cgroups

    group_dir = tmp_path / "group"
    group_dir.mkdir()
    blocker = group_dir / "held"
    blocker.write_text("")
    reaper = subprocess.Popen(["sh", "-c", cgroups.REAPER, "funnel-reaper", str(group_dir)],
                              stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert reaper.stdin is not None
    reaper.stdin.close()  # the worker is gone
    time.sleep(0.5)  # the reaper that tried once had given up by now
    assert reaper.poll() is None and group_dir.exists()
    blocker.unlink()
    assert reaper.wait(30) == 0
    assert not group_dir.exists()


def test_the_reaper_leaves_a_group_its_worker_removed(tmp_path):
    from funnel_hpc.worker import cgroups

    group_dir = tmp_path / "group"
    group_dir.mkdir()
    reaper = subprocess.Popen(["sh", "-c", cgroups.REAPER, "funnel-reaper", str(group_dir)],
                              stdin=subprocess.PIPE)
    reaper.communicate(b"done\n", timeout=30)
    assert reaper.returncode == 0 and group_dir.exists()


@pytest.mark.parametrize("kind", [2, 1])
def test_a_worker_killed_while_its_group_is_frozen_leaves_nothing(tmp_path, kind):
    """end_leftovers freezes the group for a moment: a kill -9 of the worker then leaves
    it frozen, and its reaper thaws it (v1: frozen processes cannot die) and ends it."""
    need_cgroups("pids")
    from funnel_hpc.worker import cgroups

    if not [h for h in cgroups.discover() if h.version == kind]:
        pytest.skip(f"no cgroup v{kind} hierarchy on this host")
    mark = str(600 + random.randrange(10_000, 99_999))
    script = tmp_path / "worker.py"
    script.write_text(
        "import subprocess, os, time\n"
        "from funnel_hpc.worker import cgroups\n"
        f"found = [h for h in cgroups.discover() if h.version == {kind}]\n"
        "group = cgroups.create('warmfrozen', cgroups.Limits(), found=found)\n"
        f"group.start(['sleep', '{mark}'], stdout=subprocess.DEVNULL)\n"
        "def sleeping():\n"  # frozen before its exec, the sleep would never show
        "    for pid in group.pids():\n"
        "        try:\n"
        f"            if b'{mark}' in open(f'/proc/{{pid}}/cmdline', 'rb').read():\n"
        "                return True\n"
        "        except OSError:\n"
        "            pass\n"
        "while not sleeping():\n"
        "    time.sleep(0.01)\n"
        "v1 = group.controllers.get('freezer')\n"
        "state = os.path.join(v1, 'freezer.state') if v1 else "
        "os.path.join(group.dirs[0], 'cgroup.freeze')\n"
        "open(state, 'w').write('FROZEN' if v1 else '1')\n"
        "print(*group.dirs, flush=True)\n"
        "input()\n")
    worker = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None and worker.stdin is not None
    dirs = worker.stdout.readline().split()
    assert dirs and processes_with(mark)
    worker.kill()
    worker.wait(30)
    worker.stdin.close()
    worker.stdout.close()
    wait_for(lambda: not processes_with(mark) and not any(map(os.path.exists, dirs)), 30,
             "the frozen group and its processes gone")


def test_a_charliecloud_executor_reads_its_group_at_once(harness):
    """Through a real worker: ch-run shares the host's /proc (no cgroup namespace), so
    the executor's first read of /proc/self/cgroup names the task's group."""
    need("ch-run")
    need_cgroups("pids")
    from funnel_hpc.worker import cgroups

    done = harness.run(harness.task(executors=[
        {"image": "busybox", "command": ["cat", "/proc/self/cgroup"]}]),
        harness.config(container_driver="charliecloud", limit_resources="always"))
    assert done.state == "COMPLETE", done.system_logs + done.stderr
    out = done.executor(0)["stdout"]
    lines = [line for line in out.splitlines() if f"/funnel-hpc/{done.task_dir.name}@" in line]
    unified, where = cgroups.plan_hierarchies(cgroups.discover())
    used = {hierarchy.mount for hierarchy in (unified, where.get("pids")) if hierarchy}
    assert len(lines) == len(used), out  # v2, and v1 pids (max_pids) on a hybrid host
