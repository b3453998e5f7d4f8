"""Per-task cgroups: every process of a task in one group that bounds it and that can be
killed whole, whatever the task did (setsid, double fork, a fork bomb).

Contract: `create(name, limits)` makes the group (or raises `Unavailable` where the host
gives no cgroup this worker may use: not root, no hierarchy), `Group.start(argv, ...)`
runs a process inside it from its first instruction, `Group.kill_all()` ends every process
in it, `Group.remove()` ends them and removes the group. `create` also starts a reaper that
does `remove()` as soon as the worker is gone, however it ended (kill -9 included), and
ends the groups of workers that died before their reaper could.

Hierarchies: a cgroup v2 mount (pure v2, or the `unified` one of a hybrid host) holds the
group always: it tracks the processes and `cgroup.kill` ends them atomically; the
controllers (memory, cpu, cpuset, pids) come from v2 where it has them and otherwise from
their v1 mounts (a hybrid host), plus v1 `freezer` to kill without races where no v2 is
mounted. Groups live under `<mount>/<worker.cgroup_parent>/` (created by the first worker).

Cost: a few mkdir and small writes per task, the reaper (one `sh`, asleep) and the task's
launcher (worker/launcher.py: one small Python process moved into the group once, in a
thread); per executor, the launcher's fork, nothing else: a move into a cgroup waits for
an RCU grace period (9-15 ms on a busy node) and executors never make one. Until the
launcher listens, or once it is gone, a start costs one `sh` exec (it waits on a pipe
until its pid is in the group, then execs the engine: no preexec_fn in a threaded worker)
and one write per hierarchy (see `Group.warm_up`).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import math
import os
import signal
import subprocess
import threading
import time

from funnel_hpc.worker.launcher import Launched, Launcher, Unusable

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import IO

    Process = subprocess.Popen[bytes] | Launched

CONTROLLERS = ("memory", "cpu", "cpuset", "pids")
MOUNTS = "/proc/self/mounts"
CFS_PERIOD_US = 100_000
_SERIAL = itertools.count()  # groups of one worker never share a name (nor a reaper)
KILL_SECONDS = 10.0
NOT_STARTED = 125  # the start wrapper's exit code when its pid could not be put in the group

# Waits on fd $1 until the worker put this process in the group (EOF first: never run),
# sets the file size rlimit $2 (512-byte blocks; "-": none) and execs the engine.
START = ('read -r _ <&"$1" || exit 125; eval "exec $1<&-"; '
         '[ "$2" = - ] || ulimit -f "$2" || exit 125; shift 2; exec "$@"')
# The reaper: stdin is a pipe only the worker writes to. "done": the worker removed the
# group itself. EOF (the worker ended, however) -> kill every process of the group ($1
# tracks them all, the others follow) and remove it; rmdir is tried again while it fails
# (EBUSY while the last exits are accounted, as in Group.remove).
REAPER = r"""
read -r word
[ "$word" = done ] && exit 0
i=0
while [ "$i" -lt 400 ]; do
  [ -e "$1/cgroup.kill" ] && echo 1 > "$1/cgroup.kill"
  left=
  [ -e "$1/cgroup.procs" ] &&
    while read -r pid; do kill -9 "$pid"; left=1; done < "$1/cgroup.procs"
  for dir; do  # a worker killed while the group was frozen (Group.end_leftovers)
    [ -e "$dir/freezer.state" ] && echo THAWED > "$dir/freezer.state"
    [ -e "$dir/cgroup.freeze" ] && echo 0 > "$dir/cgroup.freeze"
  done
  if [ -z "$left" ]; then
    for dir; do [ -d "$dir" ] && rmdir "$dir"; done
    for dir; do [ -d "$dir" ] && left=1; done
    [ -z "$left" ] && exit 0
  fi
  i=$((i + 1))
  sleep 0.05
done
"""


class Unavailable(RuntimeError):
    """No cgroup this worker may use (the reason says why); limits fall back to rlimits."""


class Limits:
    """What a task's group bounds; None: not bounded. (Plain classes here: dataclasses
    costs every worker start an import, tests/worker/test_start_cost.py.)"""

    def __init__(self, memory_bytes: int | None = None, cpu_cores: float | None = None,
                 cpus: tuple[int, ...] | None = None, pids_max: int | None = None):
        self.memory_bytes = memory_bytes
        self.cpu_cores = cpu_cores  # a CFS quota of that many CPUs' time
        self.cpus = cpus  # a cpuset the task cannot widen
        self.pids_max = pids_max


class Hierarchy:
    """One mounted cgroup hierarchy: version 1 or 2, and the controllers it holds."""

    def __init__(self, mount: str, version: int, controllers: frozenset[str]):
        self.mount = mount
        self.version = version
        self.controllers = controllers


def discover(mounts: str = MOUNTS) -> list[Hierarchy]:
    """The cgroup hierarchies of this host, from /proc/self/mounts."""
    found = []
    with open(mounts) as lines:
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[2] not in ("cgroup", "cgroup2"):
                continue
            mount = fields[1].replace("\\040", " ")
            if fields[2] == "cgroup2":
                try:
                    with open(os.path.join(mount, "cgroup.controllers")) as fh:
                        names = fh.read().split()
                except OSError:
                    names = []
                found.append(Hierarchy(mount, 2, frozenset(names)))
            else:
                found.append(Hierarchy(mount, 1, frozenset(fields[3].split(","))))
    return found


def plan_hierarchies(found: list[Hierarchy]) -> tuple[Hierarchy | None, dict[str, Hierarchy]]:
    """The v2 hierarchy (tracking, cgroup.kill) and where each controller (and v1 freezer)
    comes from: v2 when it has it, else its v1 mount."""
    unified = next((h for h in found if h.version == 2), None)
    controllers: dict[str, Hierarchy] = {}
    for name in (*CONTROLLERS, "freezer"):
        if unified is not None and name in unified.controllers:
            controllers[name] = unified
            continue
        v1 = next((h for h in found if h.version == 1 and name in h.controllers), None)
        if v1 is not None:
            controllers[name] = v1
    return unified, controllers


def _write(path: str, value: str) -> None:
    with open(path, "w") as fh:
        fh.write(value)


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def _start_time(pid: int) -> str | None:
    """A process's start time in clock ticks (with its pid: a name no later process reuses)."""
    try:
        stat = _read(f"/proc/{pid}/stat")
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def owner_tag() -> str:
    """This worker as group names record it: <pid>.<start time>.<serial>."""
    return f"{os.getpid()}.{_start_time(os.getpid())}.{next(_SERIAL)}"


class Group:
    """A task's cgroup: one directory per hierarchy used, the first one tracking all."""

    def __init__(self, name: str, dirs: list[str], controllers: Mapping[str, str],
                 versions: str = "", home: str | None = None):
        self.name = name
        self.home = home  # the worker's own cgroup.procs, in the hierarchy of dirs[0]
        self._warm: threading.Thread | None = None
        self.versions = versions  # e.g. "v2 + v1" (for the system logs)
        self.dirs = dirs  # dirs[0]: the v2 group when there is one
        self.controllers = dict(controllers)  # controller -> the group's dir holding it
        self._reaper: IO[bytes] | None = None
        self._launcher: Launcher | None = None
        self._placing: threading.Thread | None = None  # puts the launcher in the group

    # ---- processes ----

    def add(self, pid: int) -> None:
        for path in self.dirs:
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        try:
            text = _read(os.path.join(self.dirs[0], "cgroup.procs"))
        except FileNotFoundError:
            return []
        return [int(word) for word in text.split()]

    def start(self, argv: list[str], fsize_bytes: int | None = None,
              **popen: object) -> Process:
        """Popen(argv) inside the group from its first instruction (with RLIMIT_FSIZE when
        given): forked by the task's launcher (worker/launcher.py), or where it is gone or
        cannot carry the arguments, the old way (`_start_moved`). popen: Popen's keyword
        arguments (pass_fds too: they reach argv at the same numbers). Raises OSError."""
        launcher = self._launcher
        if launcher is not None and launcher.ready():
            with contextlib.suppress(Unusable):  # this start the old way; a launcher
                return _launch(launcher, argv, fsize_bytes, popen)  # gone is not ready()
        return self._start_moved(argv, fsize_bytes, **popen)

    def _start_moved(self, argv: list[str], fsize_bytes: int | None = None,
                     **popen: object) -> subprocess.Popen[bytes]:
        """Popen(argv) inside the group: a `sh` waits on a pipe until its pid is written to
        the group, then execs argv (with RLIMIT_FSIZE when given). One cgroup move per
        executor (an RCU grace period: see `warm_up`)."""
        blocks = str(math.ceil(fsize_bytes / 512)) if fsize_bytes else "-"
        self.warm_up()
        warm, self._warm = self._warm, None
        passed: tuple[int, ...] = tuple(popen.pop("pass_fds", ()))  # type: ignore[arg-type]
        pipe_read, write_end = os.pipe()
        # the lowest free fd from 3: dash (sh) takes only one-digit fds in redirections
        read_end = fcntl.fcntl(pipe_read, fcntl.F_DUPFD_CLOEXEC, 3)
        os.close(pipe_read)
        shell = "sh" if read_end <= 9 else "bash"
        try:
            proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
                [shell, "-c", START, "funnel-start", str(read_end), blocks, *argv],
                pass_fds=(read_end, *passed), **popen)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
            if warm is not None:
                warm.join()
        try:
            self.add(proc.pid)
        except OSError:
            os.close(write_end)  # EOF: the wrapper exits NOT_STARTED without running argv
            proc.wait()
            raise
        os.write(write_end, b"go\n")
        os.close(write_end)
        return proc

    def launch(self) -> None:
        """Start the task's launcher and put it in the group, in a thread: the group's one
        cgroup move (an RCU grace period) and the launcher's interpreter start overlap
        what the worker does next. Where it fails, starts go the old way."""
        try:
            launcher = Launcher.spawn()
        except OSError:
            return
        self._launcher = launcher

        def place() -> None:
            try:
                self.add(launcher.pid)
            except OSError:
                launcher.placed(False)
                return
            launcher.placed(True)

        self._placing = threading.Thread(target=place, daemon=True, name="cgroup-launcher")
        self._placing.start()

    def launcher_pid(self) -> int | None:
        """The pid of the task's launcher once it takes starts (None before, or gone)."""
        launcher = self._launcher
        return launcher.pid if launcher is not None and launcher.ready() else None

    def end_leftovers(self) -> None:
        """After an executor: kill what it left running in the group (setsid, daemons)
        but the launcher, without waiting for the exits. The group is frozen meanwhile,
        so nothing forks past the kill; where it cannot be frozen, or a process is still
        there after, the whole group is killed, the launcher too (later starts go the
        old way)."""
        launcher = self._launcher
        spared = launcher.pid if launcher is not None and launcher.in_group() else None
        if not [pid for pid in self.pids() if pid != spared]:
            return
        if spared is None or not self._kill_all_but(spared):
            self.kill_all(timeout=0)

    def _kill_all_but(self, spared: int) -> bool:
        """Freeze the group, SIGKILL each process but spared, thaw; True when done."""
        freeze = os.path.join(self.dirs[0], "cgroup.freeze")
        v1 = self.controllers.get("freezer")
        state = freeze if os.path.exists(freeze) else \
            (os.path.join(v1, "freezer.state") if v1 else None)
        if state is None:
            return False
        try:
            _write(state, "1" if state == freeze else "FROZEN")
        except OSError:
            return False
        try:
            if not self._frozen(state == freeze):
                return False
            killed: set[int] = set()
            for _round in range(100):
                fresh = [pid for pid in self.pids() if pid != spared and pid not in killed]
                if not fresh:
                    return True
                for pid in fresh:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                killed.update(fresh)
            return False
        finally:
            with contextlib.suppress(OSError):
                _write(state, "0" if state == freeze else "THAWED")

    def _frozen(self, v2: bool, timeout: float = 2.0) -> bool:
        """Wait until every process of the group is frozen (v2 cgroup.events, v1
        freezer.state)."""
        deadline = time.monotonic() + timeout
        pause = 0.0002
        while True:
            try:
                if v2:
                    done = "frozen 1" in _read(os.path.join(self.dirs[0], "cgroup.events"))
                else:
                    done = _read(os.path.join(self.controllers["freezer"],
                                              "freezer.state")).strip() == "FROZEN"
            except OSError:
                return False
            if done:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def warm_up(self) -> None:
        """Get the next start's migration ready, in a thread: a migration into a cgroup
        waits for an RCU grace period (the kernel's cgroup_threadgroup_rwsem, 5-15 ms on a
        busy node) unless one just happened; a no-op migration of the worker itself pays it
        while the executor's argv is built and its wrapper forks (measured: the write of
        the wrapper's pid 10 ms -> 0.2 ms)."""
        if self._warm is None and self.home is not None:
            self._warm = threading.Thread(target=self._move_home, daemon=True)
            self._warm.start()

    def _move_home(self) -> None:
        assert self.home is not None
        with contextlib.suppress(OSError):
            _write(self.home, str(os.getpid()))

    def kill_all(self, timeout: float = KILL_SECONDS) -> bool:
        """SIGKILL every process of the group until none is left (timeout 0: once, without
        waiting for the exits); True when it is empty."""
        if self._placing is not None:  # the launcher is killed too, never placed after
            self._placing.join()
        deadline = time.monotonic() + timeout
        pause = 0.001
        kill_file = os.path.join(self.dirs[0], "cgroup.kill")
        freezer = self.controllers.get("freezer")
        while True:
            pids = self.pids()
            if not pids:
                return True
            if os.path.exists(kill_file):
                with contextlib.suppress(OSError):
                    _write(kill_file, "1")
            elif freezer:  # frozen, no pid can exit and be reused under our kill
                self._kill_frozen(freezer)
            else:
                for pid in pids:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            if time.monotonic() >= deadline:
                return not self.pids()
            time.sleep(pause)  # SIGKILLed processes take a moment to exit
            pause = min(pause * 2, 0.05)

    def _kill_frozen(self, freezer: str) -> None:
        state = os.path.join(freezer, "freezer.state")
        with contextlib.suppress(OSError):
            _write(state, "FROZEN")
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            _write(state, "THAWED")

    def remove(self) -> list[str]:
        """Kill every process, remove the group's directories and let the reaper go;
        what could not be removed (for the system logs)."""
        problems = [] if self.kill_all() else [f"processes left in {self.dirs[0]}"]
        if self._launcher is not None:  # killed with the group: reaped here
            self._launcher.close()
            self._launcher = None
        for path in self.dirs:
            pause = 0.001
            for attempt in range(60):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError as error:  # EBUSY while the last exits are accounted
                    if attempt == 59:
                        problems.append(f"{path}: {error.strerror}")
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
        if self._reaper is not None:
            with contextlib.suppress(OSError):  # a reaper gone already
                self._reaper.write(b"done\n")
                self._reaper.flush()
            with contextlib.suppress(OSError):
                self._reaper.close()
            self._reaper = None
        return problems

    def oom_kills(self) -> int:
        """Processes of the group the kernel's OOM killer ended so far."""
        memory = self.controllers.get("memory")
        if memory is None:
            return 0
        for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
            try:
                text = _read(os.path.join(memory, name))
            except OSError:
                continue
            for line in text.splitlines():
                word, _sep, value = line.partition(" ")
                if word == key:
                    return int(value)
        return 0

    def guard(self) -> None:
        """Start the reaper: it removes the group once this worker is gone (kill -9 too)."""
        read_end, write_end = os.pipe()
        try:
            subprocess.Popen(["sh", "-c", REAPER, "funnel-reaper", *self.dirs],
                             stdin=read_end, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._reaper = os.fdopen(write_end, "wb")  # close-on-exec: no engine inherits it

    def describe(self) -> str:
        return f"cgroup {self.name} ({self.versions}: {', '.join(sorted(self.controllers))})"


def _launch(launcher: Launcher, argv: list[str], fsize_bytes: int | None,
            popen: Mapping[str, object]) -> Launched:
    """Group.start through the launcher: Popen's arguments as its request (Unusable for
    one it cannot carry)."""
    known = {"stdin", "stdout", "stderr", "env", "cwd", "start_new_session", "user",
             "group", "extra_groups", "pass_fds"}
    if set(popen) - known or popen.get("extra_groups") not in (None, []) or \
            ("user" in popen) != ("group" in popen):
        raise Unusable("Popen arguments the launcher does not take")
    passed = [int(fd) for fd in popen.get("pass_fds") or ()]  # type: ignore[attr-defined]
    if any(fd < 3 or fd >= 256 for fd in passed):
        raise Unusable("an fd the launcher cannot place")
    ids = (int(popen["user"]), int(popen["group"])) if "user" in popen else None  # type: ignore[call-overload]
    opened: list[int] = []  # ours to close once the launcher has its copies
    kept: list[int] = []  # the read ends of PIPE, closed if the start fails
    try:
        ends = [_child_end(popen.get(key), number, opened, kept)
                for number, key in enumerate(("stdin", "stdout", "stderr"))]
        pid, status = launcher.start(
            argv, ends[0], ends[1], ends[2], popen.get("env"),  # type: ignore[arg-type]
            None if popen.get("cwd") is None else str(popen["cwd"]), ids,
            bool(popen.get("start_new_session")), fsize_bytes, passed)
    except BaseException:
        for fd in kept:
            os.close(fd)
        raise
    finally:
        for fd in opened:
            os.close(fd)
    reads = iter(kept)
    out = os.fdopen(next(reads), "rb") if popen.get("stdout") == subprocess.PIPE else None
    err = os.fdopen(next(reads), "rb") if popen.get("stderr") == subprocess.PIPE else None
    return Launched(pid, status, out, err)


def _child_end(spec: object, number: int, opened: list[int], kept: list[int]) -> int:
    """The fd a child gets for stdin (number 0), stdout or stderr, as Popen reads spec."""
    if spec is None:
        return number
    if spec == subprocess.DEVNULL:
        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        opened.append(fd)
        return fd
    if spec == subprocess.PIPE:
        if number == 0:
            raise Unusable("stdin=PIPE")
        read_end, write_end = os.pipe()
        kept.append(read_end)
        opened.append(write_end)
        return write_end
    if isinstance(spec, int):
        return spec
    fileno = getattr(spec, "fileno", None)
    if fileno is None:
        raise Unusable(f"a stream the launcher cannot take: {spec!r}")
    return int(fileno())


def _is_v2(path: str) -> bool:
    return os.path.exists(os.path.join(path, "cgroup.controllers"))


def create(name: str, limits: Limits, parent: str = "funnel-hpc",
           found: list[Hierarchy] | None = None) -> Group:
    """The task's group under every hierarchy it needs, its limits written and its reaper
    started; raises Unavailable when none can be made."""
    if os.geteuid() != 0:
        raise Unavailable("the worker is not root")
    unified, where = plan_hierarchies(discover() if found is None else found)
    wanted = [c for c in CONTROLLERS if _needed(c, limits)]
    missing = [c for c in wanted if c not in where]
    if unified is None and not where:
        raise Unavailable("no cgroup hierarchy is mounted")
    if missing:
        raise Unavailable(f"no cgroup controller {', '.join(missing)} is mounted")
    mounts: list[Hierarchy] = []
    if unified is not None:
        mounts.append(unified)
    for controller in (*wanted, "freezer"):
        hierarchy = where.get(controller)
        if controller == "freezer" and (unified is not None or hierarchy is None):
            continue
        if hierarchy is not None and hierarchy not in mounts:
            mounts.append(hierarchy)
    if not mounts:  # v1 only and no limit asked: any v1 hierarchy tracks the processes
        mounts.append(where["pids"] if "pids" in where else next(iter(where.values())))
    full_name = f"{name}@{owner_tag()}"
    dirs: list[str] = []
    controllers: dict[str, str] = {}
    try:
        for hierarchy in mounts:
            base = _prepare_parent(hierarchy, parent, wanted)
            sweep(base)
            path = os.path.join(base, full_name)
            os.mkdir(path, 0o755)
            dirs.append(path)
            for controller in (*wanted, "freezer"):
                if where.get(controller) is hierarchy:
                    controllers[controller] = path
        versions = " + ".join(dict.fromkeys(f"v{h.version}" for h in mounts))
        group = Group(full_name, dirs, controllers, versions, _home(mounts[0]))
        _apply(group, limits)
        group.guard()
        group.launch()  # the first executor's start comes next
    except OSError as error:
        for path in reversed(dirs):
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise Unavailable(f"cannot make the task's cgroup: {error.filename}: "
                          f"{error.strerror}") from None
    return group


def _home(hierarchy: Hierarchy) -> str | None:
    """The cgroup.procs of the group this worker is in, in that hierarchy."""
    with open("/proc/self/cgroup") as lines:
        for line in lines:
            number, names, path = line.rstrip("\n").split(":", 2)
            if (hierarchy.version == 2 and number == "0" and not names) or \
                    (hierarchy.version == 1 and hierarchy.controllers & set(names.split(","))):
                return os.path.join(hierarchy.mount, path.lstrip("/"), "cgroup.procs")
    return None


def _needed(controller: str, limits: Limits) -> bool:
    return {"memory": limits.memory_bytes, "cpu": limits.cpu_cores, "cpuset": limits.cpus,
            "pids": limits.pids_max}[controller] is not None


def _prepare_parent(hierarchy: Hierarchy, parent: str, wanted: list[str]) -> str:
    """<mount>/<parent>, made once; in v2 with the controllers enabled down to it, in v1
    cpuset with the CPUs and memory nodes a child needs before it can hold a process."""
    base = os.path.join(hierarchy.mount, parent.strip("/"))
    if hierarchy.version == 2:
        enable = [c for c in wanted if c in hierarchy.controllers]
        current = hierarchy.mount
        for part in [p for p in parent.strip("/").split("/") if p]:
            _enable(current, enable)
            current = os.path.join(current, part)
            with contextlib.suppress(FileExistsError):
                os.mkdir(current, 0o755)
        _enable(current, enable)
        return base
    os.makedirs(base, 0o755, exist_ok=True)
    if "cpuset" in hierarchy.controllers:
        _fill_cpuset(hierarchy.mount, parent)
    return base


def _enable(path: str, controllers: list[str]) -> None:
    control = os.path.join(path, "cgroup.subtree_control")
    have = set(_read(control).split())
    for controller in controllers:
        if controller not in have:
            _write(control, f"+{controller}")


def _fill_cpuset(mount: str, parent: str) -> None:
    """v1 cpuset: a new group starts with no CPUs and no memory nodes: copy its parent's."""
    current = mount
    for part in [p for p in parent.strip("/").split("/") if p]:
        above, current = current, os.path.join(current, part)
        for key in ("cpuset.cpus", "cpuset.mems"):
            if not _read(os.path.join(current, key)).strip():
                _write(os.path.join(current, key), _read(os.path.join(above, key)).strip())


def _apply(group: Group, limits: Limits) -> None:
    where = group.controllers
    if limits.memory_bytes is not None:
        path, size = where["memory"], str(limits.memory_bytes)
        if _is_v2(path):
            _write(os.path.join(path, "memory.max"), size)
            _optional(os.path.join(path, "memory.swap.max"), "0")
        else:
            _write(os.path.join(path, "memory.limit_in_bytes"), size)
            _optional(os.path.join(path, "memory.memsw.limit_in_bytes"), size)  # no swap
    if limits.cpu_cores is not None:
        path = where["cpu"]
        quota = str(max(1000, int(limits.cpu_cores * CFS_PERIOD_US)))
        if _is_v2(path):
            _write(os.path.join(path, "cpu.max"), f"{quota} {CFS_PERIOD_US}")
        else:
            _write(os.path.join(path, "cpu.cfs_period_us"), str(CFS_PERIOD_US))
            _write(os.path.join(path, "cpu.cfs_quota_us"), quota)
    if limits.cpus is not None:
        path = where["cpuset"]
        if not _is_v2(path):
            _write(os.path.join(path, "cpuset.mems"),
                   _read(os.path.join(os.path.dirname(path), "cpuset.mems")).strip())
        _write(os.path.join(path, "cpuset.cpus"), ",".join(map(str, limits.cpus)))
    if limits.pids_max is not None:
        _write(os.path.join(where["pids"], "pids.max"), str(limits.pids_max))


def _optional(path: str, value: str) -> None:
    """A limit the kernel may not offer (swap accounting off): written where it exists."""
    if os.path.exists(path):
        _write(path, value)


def sweep(base: str) -> None:
    """End and remove the groups under base whose worker is gone (its reaper was killed
    too, or the node rebooted into the same hierarchy)."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        _task, at, tag = name.rpartition("@")
        pid, _dot, rest = tag.partition(".")
        if not at or not pid.isdigit() or _start_time(int(pid)) == rest.partition(".")[0]:
            continue
        path = os.path.join(base, name)
        if not os.path.isdir(path):
            continue
        stale = Group(name, [path], {})
        stale.kill_all(timeout=2)
        with contextlib.suppress(OSError):
            os.rmdir(path)
