"""Run one TES task: stage in, run executors in order, stage out, record events.

The steps live beside this file: staging.py (the task's directories, inputs, outputs),
executors.py (the processes), scratch.py (worker.scratch_dir); this module orders them,
turns what they raise into the task's final state, handles cancels and cleans up: limits.py
says what of the task's resources this worker enforces, cgroups.py makes the task's group
(removed at the end, and by its reaper if this worker is killed).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from funnel_hpc.core.worker_tokens import read_token
from funnel_hpc.worker import cgroups
from funnel_hpc.worker.drivers import (
    CH_ROOT,
    IMAGE_DRIVERS,
    SANDBOX_SHM,
    SANDBOX_TMP,
    DriverError,
    Drivers,
)
from funnel_hpc.worker.events import EventLog, now_rfc3339
from funnel_hpc.worker.executors import Executors
from funnel_hpc.worker.failures import Canceled, SystemFailure
from funnel_hpc.worker.limits import DEFAULT_TMPFS_MB, LimitError, Plan, plan
from funnel_hpc.worker.overlay_root import ROOTS
from funnel_hpc.worker.paths import KEEP_WORKDIR, PathError, TaskPaths, remove_task_files
from funnel_hpc.worker.staging import Staging
from funnel_hpc.worker.storage import Storage, StorageError
from funnel_hpc.worker.validation import TaskError, check_task, check_task_id

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType
    from typing import Any

    from funnel_hpc.core.config import WorkerConfig
    from funnel_hpc.worker.bound_inputs import Binder
    from funnel_hpc.worker.scratch import Scratch

__all__ = ["EXIT_CODES", "Canceled", "SystemFailure", "TaskRunner", "run_task"]

log = logging.getLogger(__name__)

EXIT_CODES = {"COMPLETE": 0, "EXECUTOR_ERROR": 1, "SYSTEM_ERROR": 2, "CANCELED": 3}
# What ends a task SYSTEM_ERROR with the exception's own words.
FAILURES = (SystemFailure, StorageError, DriverError, PathError, TaskError, LimitError, OSError)


class TaskRunner:
    """One task's run, from INITIALIZING to its final state, in this process."""

    def __init__(self, task: dict[str, Any], workdir: Path, config: WorkerConfig,
                 server: str | None = None, remote: bool = False):
        self.task = task
        self.task_id = check_task_id(task.get("id"))
        self.config = config
        self.server = server
        self.task_dir = workdir / self.task_id
        self.paths = TaskPaths(self.task_dir)
        self.scratch: Scratch | None = None  # worker.scratch_dir, once made
        self.cancel_event = threading.Event()
        self.storage = Storage(config, stop=self.cancel_event, owner=task.get("owner"))
        self.limit_error: LimitError | None = None  # a bad worker.* limit setting
        try:
            self.plan = plan(task.get("resources") or {}, config.worker, self.task_id)
        except LimitError as error:  # raised in _steps, to end the task SYSTEM_ERROR
            self.limit_error, self.plan = error, Plan(False, DEFAULT_TMPFS_MB << 20)
        self.group: cgroups.Group | None = None  # the task's cgroup, while it runs
        self.drivers = Drivers(config, workdir, task.get("owner"),
                               tmpfs_bytes=self.plan.tmpfs_bytes)
        self.token = read_token(self.task_dir) if server else None
        # a remote worker (started with --task-id: no file system shared with the
        # gateway) reports only over HTTP, so it waits for a restarting server; one whose
        # event log the gateway reads sends events as a courtesy and never waits long
        self.flush_seconds = config.worker.server_wait_seconds if remote else 5.0
        self.events = EventLog(self.task_dir / "events.jsonl", self.task_id, server,
                               token=self.token, retry_seconds=self.flush_seconds)
        self.executors = Executors(task, config, self.events, self.cancel_event, self.drivers,
                                   self.task_dir, self.plan)

    # ---- cancel ----

    def request_cancel(self, reason: str) -> None:
        if self.cancel_event.is_set():
            return
        self.cancel_event.set()
        self.events.system_log(f"cancel requested: {reason}")
        self.executors.kill()

    def _watch_server(self, server: str) -> None:
        """Notice a cancel made on the server."""
        import requests

        interval = self.config.worker.poll_server_seconds
        url = f"{server.rstrip('/')}/ga4gh/tes/v1/tasks/{self.task_id}"
        session = requests.Session()
        if self.token:
            session.headers["Authorization"] = f"Bearer {self.token}"
        while not self.cancel_event.wait(interval):
            try:
                state = session.get(url, params={"view": "MINIMAL"}, timeout=5).json()["state"]
            except Exception:  # noqa: BLE001  # an unreachable server must not stop the task
                continue
            if state in ("CANCELING", "CANCELED"):
                self.request_cancel(f"the task is {state} on the server")

    # ---- the run ----

    def run(self) -> str:
        events = self.events
        if events.fold.terminal:  # already finished (a re-run of a done attempt)
            events.close()
            return events.fold.state or "SYSTEM_ERROR"
        events.state("INITIALIZING")
        events.emit("task_start", start_time=now_rfc3339())
        events.emit("metadata", metadata={"hostname": os.uname().nodename,
                                          "pid": str(os.getpid())})
        if self.server:
            threading.Thread(target=self._watch_server, args=(self.server,), daemon=True,
                             name="cancel-watch").start()
        try:
            final = self._steps()
        except Canceled:
            final = "CANCELED"
        except FAILURES as exc:
            final = "CANCELED" if self.cancel_event.is_set() else "SYSTEM_ERROR"
            events.system_log(f"{exc.__class__.__name__}: {exc}" if isinstance(exc, OSError)
                              else str(exc))
        except Exception as exc:  # a bug must still end the task, with its reason
            log.exception("task %s: unexpected error", self.task_id)
            final = "CANCELED" if self.cancel_event.is_set() else "SYSTEM_ERROR"
            events.system_log(f"worker internal error: {exc.__class__.__name__}: {exc}")
        self._release_group()
        self._clean_up(final)
        try:
            self.drivers.release()  # the task's host identity goes back to the pool
        except DriverError as exc:
            events.system_log(str(exc))
        events.emit("task_end", end_time=now_rfc3339())
        events.state(final)
        self.cancel_event.set()  # stops the server watcher
        events.close(self.flush_seconds)
        return final

    def _steps(self) -> str:
        """Check, stage in, run, stage out; the final state unless something raises."""
        check_task(self.task)
        if self.limit_error is not None:
            raise self.limit_error
        self._use_scratch()
        driver = self.drivers.choose()
        for note in self.drivers.choice_notes:
            self.events.system_log(note)
        self.events.emit("metadata", metadata={"container_driver": driver})
        self._make_group(driver)  # its launcher starts while images and inputs come
        for note in self.drivers.prepare(driver, [executor["image"] for executor
                                                  in self.task["executors"]]):
            self.events.system_log(note)
        staging = Staging(self.task, self.paths, self.storage, self.events, self.cancel_event)
        binds = staging.prepare_dirs()
        binder = self._binder(driver)
        try:
            staging.stage_in(binder)
            # the sandbox's own files (proot's /tmp, ch-run's roots) go beside files/
            self.drivers.hand_over(driver, self.scratch.root if self.scratch
                                   else self.task_dir, binds, binder.bound if binder else [])
            self.events.state("RUNNING")
            try:
                final = self.executors.run_all(driver, binds, self.paths, self.group)
            finally:  # the task's files are the worker's again before anything reads them
                self.drivers.take_back(binds)
        finally:
            if binder is not None:
                binder.close()
        if final == "COMPLETE":
            staging.stage_out()
        return final

    def _binder(self, driver: str) -> Binder | None:
        """worker.bind_inputs: file:// inputs bound read-only in place (bwrap only)."""
        if not self.config.worker.bind_inputs:
            return None
        from funnel_hpc.worker.bound_inputs import BIND_DRIVERS, SETTING, Binder

        if driver not in BIND_DRIVERS:
            self.events.system_log(f"{SETTING}: driver {driver} cannot bind by descriptor: "
                                   "file:// inputs are copied")
            return None
        return Binder(self.task, self.storage, self.events)

    def _make_group(self, driver: str) -> None:
        """The task's cgroup, when this worker enforces limits on a sandboxed driver."""
        if not self.plan.enforce or driver not in IMAGE_DRIVERS:
            return
        parent = self.config.worker.cgroup_parent
        try:
            self.group = cgroups.create(self.task_id, self.plan.cgroup_limits(), parent)
        except cgroups.Unavailable as reason:
            self.events.system_log(f"limits (worker.limit_resources): no cgroup ({reason}): "
                                   "memory is an address-space rlimit, CPUs an affinity, "
                                   "and nothing bounds the number of processes")
            return
        self.events.system_log(f"limits (worker.limit_resources): {self.group.describe()}: "
                               f"{self.plan.describe()}")

    def _release_group(self) -> None:
        """Kill what is left of the task and remove its cgroup (its reaper then exits)."""
        if self.group is None:
            return
        for problem in self.group.remove():
            self.events.system_log(f"cgroup {self.group.name}: cannot remove {problem}")
        self.group = None

    def _use_scratch(self) -> None:
        """worker.scratch_dir set: the task's files/ tree moves to node-local scratch."""
        setting = self.config.worker.scratch_dir
        if not setting:
            return
        from funnel_hpc.worker.scratch import Scratch, Unset

        try:
            self.scratch = Scratch.make(setting, self.task_id, os.environ)
        except Unset as exc:
            self.events.system_log(f"{exc}: the task's files stay in the work dir")
            return
        self.paths = TaskPaths(self.task_dir, self.scratch.files)

    def _clean_up(self, final: str) -> None:
        """worker.keep_workdir: once the task's outcome is known and its outputs are
        uploaded, remove its files/ tree and the sandbox's own files. Scratch is removed
        whatever the outcome; what keep_workdir keeps is first copied back."""
        keep = self.config.worker.keep_workdir
        if keep not in KEEP_WORKDIR:
            self.events.system_log(f"worker.keep_workdir {keep!r} is not one of "
                                   f"{', '.join(KEEP_WORKDIR)}: the task directory is kept")
            keep = "always"
        kept = keep == "always" or (keep == "on_failure" and final != "COMPLETE")
        if self.scratch is not None:
            self._leave_scratch(keep if kept else "")
        if kept:
            return
        try:
            problems = remove_task_files(self.task_dir, (self.paths.files.name, SANDBOX_TMP,
                                                          SANDBOX_SHM, ROOTS),
                                         (CH_ROOT,))
        except OSError as exc:
            problems = [f"{exc.filename}: {exc.strerror}"]
        for problem in problems[:10]:
            self.events.system_log(f"keep_workdir {keep}: cannot remove {problem}")

    def _leave_scratch(self, keep: str) -> None:
        """Copy scratch's files/ back (keep: the keep_workdir value that keeps them), then
        remove the task's scratch directory."""
        assert self.scratch is not None
        problems = [f"cannot copy back {problem}" for problem
                    in (self.scratch.copy_back(self.task_dir) if keep else [])]
        problems += [f"cannot remove {problem}" for problem in self.scratch.remove()]
        for problem in problems[:10]:
            self.events.system_log(f"worker.scratch_dir: {problem}")


def run_task(task: dict[str, Any], workdir: Path, config: WorkerConfig,
             server: str | None = None,
             remote: bool = False) -> str:
    """Run a task to its end; SIGTERM/SIGINT cancel it. Returns the final TES state.
    remote: the gateway does not read this worker's event log (see TaskRunner)."""
    runner = TaskRunner(task, workdir, config, server, remote)
    previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        threading.Thread(target=runner.request_cancel,
                         args=(f"signal {signal.Signals(signum).name}",), daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, on_signal)
    try:
        started = time.monotonic()
        state = runner.run()
        log.info("task %s ended %s after %.1fs", runner.task_id, state, time.monotonic() - started)
        return state
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
