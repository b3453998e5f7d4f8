"""Run one TES task: stage in, run executors in order, stage out, record events."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from funnel_hpc.core.worker_tokens import read_token
from funnel_hpc.worker.drivers import (
    CH_ROOT,
    IMAGE_DRIVERS,
    SANDBOX_TMP,
    DriverError,
    Drivers,
    Invocation,
    switch_user,
)
from funnel_hpc.worker.events import EventLog, now_rfc3339
from funnel_hpc.worker.limits import LimitError
from funnel_hpc.worker.limits import wrap as limit_resources
from funnel_hpc.worker.livelogs import LiveLogs, Tail
from funnel_hpc.worker.paths import (
    KEEP_WORKDIR,
    WILDCARD,
    PathError,
    TaskPaths,
    check_container_path,
    remove_task_files,
)
from funnel_hpc.worker.storage import Storage, StorageError, join_url
from funnel_hpc.worker.validation import TaskError, check_task, check_task_id

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType
    from typing import IO, Any

log = logging.getLogger(__name__)

EXIT_CODES = {"COMPLETE": 0, "EXECUTOR_ERROR": 1, "SYSTEM_ERROR": 2, "CANCELED": 3}
CHUNK = 1 << 16
# A task's input/output `type` -> is it a directory; absent: the worker finds out.
KNOWN_TYPES = {"FILE": False, "DIRECTORY": True}
# Metadata keys of the types found for untyped inputs and outputs: JSON {index: type}.
INPUT_TYPES, OUTPUT_TYPES = "input_types", "output_types"


class Canceled(Exception):
    pass


class SystemFailure(Exception):
    """Infrastructure trouble: the task ends as SYSTEM_ERROR with this message."""


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


class TaskRunner:
    def __init__(self, task: dict[str, Any], workdir: Path, config: dict[str, Any],
                 server: str | None = None, remote: bool = False):
        self.task = task
        self.task_id = check_task_id(task.get("id"))
        self.config = config
        self.server = server
        self.task_dir = workdir / self.task_id
        self.paths = TaskPaths(self.task_dir)
        self.cancel_event = threading.Event()
        self.storage = Storage(config, stop=self.cancel_event, owner=task.get("owner"))
        self.drivers = Drivers(config, workdir)
        self.tail_bytes = int(config["worker"]["log_tail_bytes"])
        self.log_update_seconds = float(config["worker"].get("log_update_seconds", 5))
        self.token = read_token(self.task_dir) if server else None
        # a remote worker (started with --task-id: no file system shared with the
        # gateway) reports only over HTTP, so it waits for a restarting server; one whose
        # event log the gateway reads sends events as a courtesy and never waits long
        self.flush_seconds = float(config["worker"]["server_wait_seconds"]) if remote else 5.0
        self.events = EventLog(self.task_dir / "events.jsonl", self.task_id, server,
                               token=self.token, retry_seconds=self.flush_seconds)
        parameters = (task.get("resources") or {}).get("backend_parameters") or {}
        gpus = str(parameters.get("gpus") or "")
        self.gpus = gpus if gpus not in ("", "0") else None  # resources.backend_parameters
        self.process: subprocess.Popen[bytes] | None = None
        # output files directly under / made empty before the run -> their mtime then
        self.placeholders: dict[str, int] = {}
        self._lock = threading.Lock()

    # ---- cancel ----

    def request_cancel(self, reason: str) -> None:
        if self.cancel_event.is_set():
            return
        self.cancel_event.set()
        self.events.system_log(f"cancel requested: {reason}")
        self._kill_process()

    def _kill_process(self) -> None:
        with self._lock:
            proc = self.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _watch_server(self, server: str) -> None:
        """Notice a cancel made on the server."""
        import requests

        interval = float(self.config["worker"]["poll_server_seconds"])
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
        ev = self.events
        if ev.fold.terminal:  # already finished (a re-run of a done attempt)
            ev.close()
            return ev.fold.state or "SYSTEM_ERROR"
        ev.state("INITIALIZING")
        ev.emit("task_start", start_time=now_rfc3339())
        ev.emit("metadata", metadata={"hostname": os.uname().nodename, "pid": str(os.getpid())})
        if self.server:
            threading.Thread(target=self._watch_server, args=(self.server,), daemon=True,
                             name="cancel-watch").start()
        try:
            check_task(self.task)
            driver = self.drivers.choose()
            ev.emit("metadata", metadata={"container_driver": driver})
            for note in self.drivers.prepare(driver, [executor["image"] for executor
                                                      in self.task["executors"]]):
                ev.system_log(note)
            binds = self._prepare_dirs()
            self._stage_in()
            self.drivers.hand_over(driver, self.task_dir, binds)
            ev.state("RUNNING")
            final = self._run_executors(driver, binds)
            if final == "COMPLETE":
                self._stage_out()
        except Canceled:
            final = "CANCELED"
        except (SystemFailure, StorageError, DriverError, PathError, TaskError, LimitError,
                OSError) as exc:
            final = "CANCELED" if self.cancel_event.is_set() else "SYSTEM_ERROR"
            ev.system_log(f"{exc.__class__.__name__}: {exc}" if isinstance(exc, OSError)
                          else str(exc))
        except Exception as exc:  # a bug must still end the task, with its reason
            log.exception("task %s: unexpected error", self.task_id)
            final = "CANCELED" if self.cancel_event.is_set() else "SYSTEM_ERROR"
            ev.system_log(f"worker internal error: {exc.__class__.__name__}: {exc}")
        self._clean_up(final)
        ev.emit("task_end", end_time=now_rfc3339())
        ev.state(final)
        self.cancel_event.set()  # stops the server watcher
        ev.close(self.flush_seconds)
        return final

    def _clean_up(self, final: str) -> None:
        """worker.keep_workdir: once the task's outcome is known and its outputs are
        uploaded, remove its files/ tree and the sandbox's own files."""
        keep = str(self.config["worker"].get("keep_workdir") or "on_failure")
        if keep not in KEEP_WORKDIR:
            self.events.system_log(f"worker.keep_workdir {keep!r} is not one of "
                                   f"{', '.join(KEEP_WORKDIR)}: the task directory is kept")
            return
        if keep == "always" or (keep == "on_failure" and final != "COMPLETE"):
            return
        try:
            problems = remove_task_files(self.task_dir, (self.paths.files.name, SANDBOX_TMP),
                                         (CH_ROOT,))
        except OSError as exc:
            problems = [f"{exc.filename}: {exc.strerror}"]
        for problem in problems[:10]:
            self.events.system_log(f"keep_workdir {keep}: cannot remove {problem}")

    def _check_cancel(self) -> None:
        if self.cancel_event.is_set():
            raise Canceled()

    def _prepare_dirs(self) -> list[tuple[str, str]]:
        mounts = self.paths.mounts(self.task)
        files = self.paths.top_level(self.task)
        binds = []
        for container in mounts:
            host = self.paths.host(container)
            role = files.get(container)
            if role is None:
                host.mkdir(parents=True, exist_ok=True)
            elif role == "output":  # an empty file to bind; staged inputs make their own
                self.paths.files.mkdir(parents=True, exist_ok=True)
                fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644)
                self.placeholders[container] = os.fstat(fd).st_mtime_ns
                os.close(fd)
            self.paths.ensure_inside(host)
            binds.append((str(host), container))
        return binds

    def _stage_in(self) -> None:
        fetched: list[tuple[dict[str, Any], Path]] = []  # inputs with a URL: fetched together
        for item in self.task.get("inputs") or []:
            self._check_cancel()
            dest = self.paths.host(item["path"])
            if item.get("content") is None:
                fetched.append((item, dest))
                continue
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(item["content"], encoding="utf-8")
            except OSError as exc:  # e.g. the work dir's disk is full: free what we wrote
                if dest.is_file():
                    dest.unlink()
                raise SystemFailure(f"input {item['path']}: cannot write {dest}: "
                                    f"{exc.strerror or exc}") from None
            self.paths.ensure_inside(dest)
        try:
            kinds = self.storage.get_many([(item.get("url") or "", dest,
                                            KNOWN_TYPES.get(str(item.get("type"))))
                                           for item, dest in fetched])
        except StorageError as exc:
            path = fetched[exc.index or 0][0]["path"] if fetched else "?"
            raise SystemFailure(f"input {path} from {exc}") from None
        for _item, dest in fetched:
            self.paths.ensure_inside(dest)
        inputs = self.task.get("inputs") or []
        found = {id(item): is_dir for (item, _dest), is_dir in zip(fetched, kinds, strict=True)}
        self._report_types(INPUT_TYPES, {index: found.get(id(item), False)
                                         for index, item in enumerate(inputs)
                                         if not item.get("type")})

    def _report_types(self, key: str, kinds: dict[int, bool]) -> None:
        """What the worker found at untyped inputs' or outputs' paths, as task metadata
        (the gateway shows it as their `type`, gateway/views.py)."""
        if kinds:
            self.events.emit("metadata", metadata={key: json.dumps(
                {str(index): "DIRECTORY" if is_dir else "FILE"
                 for index, is_dir in kinds.items()}, separators=(",", ":"))})

    def _stream_file(self, container_path: str | None, mode: str) -> IO[bytes] | None:
        """Host file of an executor's stdin (mode "rb") or stdout/stderr ("wb")."""
        if not container_path:
            return None
        host = self.paths.host(container_path)
        host.parent.mkdir(parents=True, exist_ok=True)
        self.paths.ensure_inside(host)
        flags = os.O_RDONLY if mode == "rb" else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        # O_NOFOLLOW: a symlink put there since the check is refused, not followed
        fd = os.open(host, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        return os.fdopen(fd, mode)

    def _run_executors(self, driver: str, binds: list[tuple[str, str]]) -> str:
        notes: set[str] = set()
        for index, executor in enumerate(self.task["executors"]):
            self._check_cancel()
            invocation = self.drivers.invocation(
                driver, executor["image"], list(executor["command"]),
                dict(executor.get("env") or {}), executor.get("workdir"), binds, self.gpus)
            if driver in IMAGE_DRIVERS:  # an engine's client (docker...) is not the task
                invocation.argv, limited = limit_resources(
                    invocation.argv, self.task.get("resources") or {},
                    str(self.config["worker"].get("limit_resources", "auto")), self.task_id)
                if limited:
                    invocation.note += f"; {limited}"
            if invocation.note not in notes:
                notes.add(invocation.note)
                self.events.system_log(f"executor {index}: {invocation.note}")
            exit_code, out_tail, err_tail = self._run_one(index, executor, invocation)
            self._check_cancel()
            if exit_code != 0 and not executor.get("ignore_error"):
                return "EXECUTOR_ERROR"
        return "COMPLETE"

    def _run_one(self, index: int, executor: dict[str, Any],
                 inv: Invocation) -> tuple[int, str, str]:
        out_tail, err_tail = Tail(self.tail_bytes), Tail(self.tail_bytes)
        with contextlib.ExitStack() as files:
            # opened (and checked) before the executor counts as started
            streams: dict[str, IO[bytes] | None] = {}
            for key, mode in (("stdin", "rb"), ("stdout", "wb"), ("stderr", "wb")):
                fh = self._stream_file(executor.get(key), mode)
                streams[key] = files.enter_context(fh) if fh is not None else None
            stdin, stdout_file, stderr_file = streams["stdin"], streams["stdout"], streams["stderr"]
            self.events.emit("executor_start", index=index, start_time=now_rfc3339())
            try:
                with self._lock:
                    self.process = subprocess.Popen(
                        inv.argv, stdin=stdin or subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, env=inv.env, start_new_session=True,
                        cwd=inv.cwd or str(self.task_dir), **switch_user(inv.ids))
            except OSError as exc:
                raise DriverError(f"cannot start {inv.argv[0]}: {exc.strerror}") from None
            proc = self.process
            if self.cancel_event.is_set():
                self._kill_process()
            pumps = [threading.Thread(target=_pump, args=(proc.stdout, stdout_file, out_tail)),
                     threading.Thread(target=_pump, args=(proc.stderr, stderr_file, err_tail))]
            for pump in pumps:
                pump.start()
            live = LiveLogs(self.events, index, {"stdout": out_tail, "stderr": err_tail},
                            self.log_update_seconds)
            live.start()
            exit_code = proc.wait()
            for pump in pumps:
                pump.join()
            live.stop()
        if exit_code < 0:  # killed by a signal: report it the way shells do
            exit_code = 128 - exit_code
        self.events.emit("executor_end", index=index, end_time=now_rfc3339(),
                         exit_code=exit_code, stdout=out_tail.text(), stderr=err_tail.text())
        return exit_code, out_tail.text(), err_tail.text()

    def _stage_out(self) -> None:
        uploads = self._output_files()

        def uploaded(index: int, size: int) -> None:  # called in the order of uploads
            _host, container, url, _output = uploads[index]
            self.events.emit("output", url=url, path=container, size_bytes=str(size))

        try:
            self.storage.put_many([(host, url) for host, _c, url, _o in uploads], uploaded)
        except StorageError as exc:
            output = uploads[exc.index or 0][3] if uploads else "?"
            raise SystemFailure(f"output {output} to {exc}") from None

    def _output_files(self) -> list[tuple[Path, str, str, str]]:
        """(host file, container path, url, the output's path) of every file to upload."""
        uploads: list[tuple[Path, str, str, str]] = []
        outputs = self.task.get("outputs") or []
        for item in outputs:
            self._check_cancel()
            path = item["path"]
            if WILDCARD.search(path):
                # check_task made sure path_prefix is a prefix of path
                prefix = check_container_path(item["path_prefix"]).rstrip("/") + "/"
                matches = [m for m in self.paths.glob(path) if m[0].startswith(prefix)]
                uploads += [(host, container, join_url(item["url"], container[len(prefix):]),
                             path) for container, host in matches]
                if not matches:
                    self.events.system_log(f"output {path}: no files matched")
            elif item.get("type") == "DIRECTORY" or self._untyped_dir(item):
                root = self.paths.host(path)
                if not root.is_dir():
                    raise SystemFailure(f"output directory {path} does not exist")
                for dirpath, dirs, files in os.walk(root):
                    dirs.sort()  # events in the same order on every file system
                    for name in sorted(files):
                        host = Path(dirpath) / name
                        rel = str(host.relative_to(root))
                        uploads.append((host, path.rstrip("/") + "/" + rel,
                                        join_url(item["url"], rel), path))
            else:
                host = self.paths.host(path)
                if not host.is_file() or self._untouched(path, host):
                    raise SystemFailure(f"output file {path} does not exist")
                uploads.append((host, path, item["url"], path))
        for host, *_rest in uploads:
            self.paths.ensure_inside(host)  # a symlink to elsewhere is refused
        self._report_types(OUTPUT_TYPES, {
            index: self._untyped_dir(item) for index, item in enumerate(outputs)
            if not item.get("type") and not WILDCARD.search(item["path"])})
        return uploads

    def _untouched(self, path: str, host: Path) -> bool:
        """An output file under / that the worker made empty and no executor wrote."""
        made = self.placeholders.get(check_container_path(path))
        if made is None:
            return False
        info = host.stat()
        return info.st_size == 0 and info.st_mtime_ns == made

    def _untyped_dir(self, item: dict[str, Any]) -> bool:
        """An output without a type that is a directory (not a symlink to one)."""
        if item.get("type"):
            return False
        host = self.paths.host(item["path"])
        return host.is_dir() and not host.is_symlink()


def run_task(task: dict[str, Any], workdir: Path, config: dict[str, Any],
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
