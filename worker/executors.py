"""A task's executors, run in order: one process each, its output streamed to its files,
the tails and the events; a cancel kills the running one (SIGTERM, then SIGKILL). Given
the task's cgroup (worker/cgroups.py), a sandboxed executor starts inside it, and whatever
it left running when it ends (or is killed) is killed with the group.

Cost: two pump threads and the live-log ticker per executor; no polling (the disk watch of
resources.disk_gb, when enforced, walks the task's files every few seconds).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading

from funnel_hpc.worker.disk import DiskWatch
from funnel_hpc.worker.drivers import IMAGE_DRIVERS, DriverError, switch_user
from funnel_hpc.worker.events import now_rfc3339
from funnel_hpc.worker.exit_codes import shell_exit_code
from funnel_hpc.worker.failures import Canceled
from funnel_hpc.worker.livelogs import LiveLogs, Tail
from funnel_hpc.worker.overlay_root import ROOTS, Removals
from funnel_hpc.worker.sandbox import SandboxError

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from pathlib import Path
    from typing import IO, Any

    from funnel_hpc.core.config import WorkerConfig
    from funnel_hpc.worker.cgroups import Group, Process
    from funnel_hpc.worker.drivers import Drivers, Invocation
    from funnel_hpc.worker.events import EventLog
    from funnel_hpc.worker.limits import Plan
    from funnel_hpc.worker.paths import TaskPaths

CHUNK = 1 << 16
KILL_GRACE_SECONDS = 10


def _pump(stream: IO[bytes], sink: IO[bytes] | None, tail: Tail) -> None:
    """Copy a child's output to its file and the tail, chunk by chunk."""
    while True:
        chunk = stream.read1(CHUNK) if hasattr(stream, "read1") else stream.read(CHUNK)
        if not chunk:
            break
        if sink is not None:
            sink.write(chunk)
        tail.write(chunk)
    stream.close()


class Executors:
    """Runs a task's executors; kill() (any thread) stops the one running."""

    def __init__(self, task: dict[str, Any], config: WorkerConfig, events: EventLog,
                 canceled: threading.Event, drivers: Drivers, task_dir: Path, plan: Plan):
        self.task = task
        self.task_id = str(task.get("id"))
        self.config = config
        self.events = events
        self.canceled = canceled
        self.drivers = drivers
        self.task_dir = task_dir
        self.tail_bytes = config.worker.log_tail_bytes
        self.log_update_seconds = config.worker.log_update_seconds
        parameters = (task.get("resources") or {}).get("backend_parameters") or {}
        gpus = str(parameters.get("gpus") or "")
        self.gpus = gpus if gpus not in ("", "0") else None  # resources.backend_parameters
        self.plan = plan
        self.group: Group | None = None  # the task's cgroup, for sandboxed executors
        self.process: Process | None = None
        self.exceeded: str | None = None  # a limit the running executor went over
        self.removals = Removals()  # ended executors' copy-on-write roots going
        self._lock = threading.Lock()

    def kill(self) -> None:
        """SIGTERM to the executor's process group, SIGKILL after a grace; then everything
        left in the task's cgroup (what left the process group: setsid, daemons)."""
        with self._lock:
            proc = self.process
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(KILL_GRACE_SECONDS)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        if self.group is not None:
            self.group.kill_all()

    def exceed(self, reason: str) -> None:
        """A limit was passed (the disk watch): stop the running executor at once."""
        self.exceeded = reason
        with self._lock:
            proc = self.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self.group is not None:
            self.group.kill_all()

    def check_cancel(self) -> None:
        if self.canceled.is_set():
            raise Canceled()

    def run_all(self, driver: str, binds: list[tuple[str, str]], paths: TaskPaths,
                group: Group | None = None) -> str:
        """Each executor in order; "COMPLETE", or "EXECUTOR_ERROR" at the first that failed
        (an exit code not 0, unless it has ignore_error) or went over resources.disk_gb.
        group: the task's cgroup, which sandboxed executors start in."""
        self.group = group if driver in IMAGE_DRIVERS else None
        disk = None
        if self.plan.disk_bytes and driver in IMAGE_DRIVERS:
            # the task's files, proot's /tmp and the upper layers of copy-on-write roots
            disk = DiskWatch([str(paths.files), str(self.drivers.sandbox_tmp),
                              str(self.drivers.task_dir / ROOTS)],
                             self.plan.disk_bytes,
                             self.plan.disk_check_seconds, self.exceed)
            disk.start()
        try:
            return self._run_each(driver, binds, paths, disk)
        finally:
            if disk is not None:
                disk.stop()
            for problem in (self.removals.wait() + self.drivers.drop_spares())[:10]:
                self.events.system_log(f"copy-on-write root: cannot remove {problem}")

    def _run_each(self, driver: str, binds: list[tuple[str, str]], paths: TaskPaths,
                  disk: DiskWatch | None) -> str:
        notes: set[str] = set()
        for index, executor in enumerate(self.task["executors"]):
            self.check_cancel()
            if self.group is not None:
                self.group.warm_up()
            invocation = self._invocation(driver, executor, binds)
            if invocation.note not in notes:
                notes.add(invocation.note)
                self.events.system_log(f"executor {index}: {invocation.note}")
            try:
                exit_code = self.run_one(index, executor, invocation, paths, driver)
            finally:
                self._remove_root(invocation)
            self.check_cancel()
            if disk is not None:
                disk.check()
            if self.exceeded:
                self.events.system_log(f"executor {index}: {self.exceeded}")
                return "EXECUTOR_ERROR"
            if exit_code != 0 and not executor.get("ignore_error"):
                return "EXECUTOR_ERROR"
        return "COMPLETE"

    def _remove_root(self, invocation: Invocation) -> None:
        """The executor's copy-on-write root goes with it (its processes have ended)."""
        if invocation.root is not None:
            self.removals.add(invocation.root)
            invocation.root = None

    def _invocation(self, driver: str, executor: dict[str, Any],
                    binds: list[tuple[str, str]]) -> Invocation:
        invocation = self.drivers.invocation(
            driver, executor["image"], list(executor["command"]),
            dict(executor.get("env") or {}), executor.get("workdir"), binds, self.gpus)
        # an engine's client (docker...) is not the task; with a cgroup, _start limits it
        if driver in IMAGE_DRIVERS and self.group is None:
            invocation.argv, limited = self.plan.rlimit_argv(invocation.argv)
            if limited:
                invocation.note += f"; {limited}"
        return invocation

    def run_one(self, index: int, executor: dict[str, Any], inv: Invocation,
                paths: TaskPaths, driver: str = "") -> int:
        """Run one executor to its end; its exit code (128 + N when killed by signal N)."""
        out_tail, err_tail = Tail(self.tail_bytes), Tail(self.tail_bytes)
        with contextlib.ExitStack() as files:
            # opened (and checked) before the executor counts as started
            streams: dict[str, IO[bytes] | None] = {}
            for key, mode in (("stdin", "rb"), ("stdout", "wb"), ("stderr", "wb")):
                fh = _stream_file(paths, executor.get(key), mode)
                streams[key] = files.enter_context(fh) if fh is not None else None
            self.events.emit("executor_start", index=index, start_time=now_rfc3339())
            oom_kills = self.group.oom_kills() if self.group is not None else 0
            proc = self._start(inv, streams["stdin"])
            pumps = [threading.Thread(target=_pump, args=(proc.stdout, streams["stdout"],
                                                          out_tail)),
                     threading.Thread(target=_pump, args=(proc.stderr, streams["stderr"],
                                                          err_tail))]
            for pump in pumps:
                pump.start()
            live = LiveLogs(self.events, index, {"stdout": out_tail, "stderr": err_tail},
                            self.log_update_seconds)
            live.start()
            exit_code = proc.wait()
            if self.group is not None:  # what it left running (setsid, daemons) ends with it
                self.group.end_leftovers()
                if self.group.oom_kills() > oom_kills:
                    self.events.system_log(
                        f"executor {index}: the kernel's OOM killer ended a process of it: "
                        "the task went over its memory limit (resources.ram_gb)")
            for pump in pumps:
                pump.join()
            live.stop()
        # as shells report it: 128+N for signal N, 127/126 for a command that did not start
        exit_code = shell_exit_code(driver, list(executor["command"]), exit_code,
                                    err_tail.text())
        self.events.emit("executor_end", index=index, end_time=now_rfc3339(),
                         exit_code=exit_code, stdout=out_tail.text(), stderr=err_tail.text())
        return exit_code

    def _start(self, inv: Invocation, stdin: IO[bytes] | None) -> Process:
        popen: dict[str, Any] = dict(
            stdin=stdin or subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=inv.env, start_new_session=True, cwd=inv.cwd or str(self.task_dir),
            **switch_user(inv.ids),
            pass_fds=(*inv.fds, *(inv.hook.pass_fds if inv.hook else ())))
        try:
            with self._lock:
                if self.group is not None:  # inside the task's cgroup from its first step
                    proc = self.process = self.group.start(inv.argv, self.plan.disk_bytes,
                                                           **popen)
                else:
                    proc = self.process = subprocess.Popen(inv.argv, **popen)
        except OSError as exc:
            raise DriverError(f"cannot start {inv.argv[0]}: {exc.strerror}") from None
        finally:
            for fd in inv.fds:  # the child has its copy (a seccomp filter)
                os.close(fd)
            inv.fds = ()
        if inv.hook:  # e.g. bwrap waits until its uid/gid maps are written
            try:
                inv.hook.started(proc)
            except SandboxError as error:
                proc.wait()
                raise DriverError(str(error)) from None
        if self.canceled.is_set():  # a cancel that came before the process was known
            self.kill()
        return proc


def _stream_file(paths: TaskPaths, container_path: str | None, mode: str) -> IO[bytes] | None:
    """Host file of an executor's stdin (mode "rb") or stdout/stderr ("wb")."""
    if not container_path:
        return None
    host = paths.host(container_path)
    host.parent.mkdir(parents=True, exist_ok=True)
    paths.ensure_inside(host)
    flags = os.O_RDONLY if mode == "rb" else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    # O_NOFOLLOW: a symlink put there since the check is refused, not followed
    fd = os.open(host, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, mode)
