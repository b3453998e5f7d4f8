"""Run one TES task: stage in, run executors in order, stage out, record events."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from typing import IO

from funnel_hpc.core.worker_tokens import read_token
from funnel_hpc.worker.drivers import DriverError, Drivers, Invocation
from funnel_hpc.worker.events import EventLog, now_rfc3339
from funnel_hpc.worker.paths import WILDCARD, PathError, TaskPaths, check_container_path
from funnel_hpc.worker.storage import Storage, StorageError, join_url
from funnel_hpc.worker.validation import TaskError, check_task, check_task_id

log = logging.getLogger(__name__)

EXIT_CODES = {"COMPLETE": 0, "EXECUTOR_ERROR": 1, "SYSTEM_ERROR": 2, "CANCELED": 3}
CHUNK = 1 << 16


class Canceled(Exception):
    pass


class SystemFailure(Exception):
    """Infrastructure trouble: the task ends as SYSTEM_ERROR with this message."""


class Tail:
    """Keeps the last `limit` bytes written to it."""

    def __init__(self, limit: int):
        self.limit = limit
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > 2 * self.limit:
            del self.buffer[: len(self.buffer) - self.limit]

    def text(self) -> str:
        return bytes(self.buffer[-self.limit:]).decode("utf-8", errors="replace") \
            if self.limit else ""


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
    def __init__(self, task: dict, workdir: Path, config: dict, server: str | None = None,
                 remote: bool = False):
        self.task = task
        self.task_id = check_task_id(task.get("id"))
        self.config = config
        self.server = server
        self.task_dir = workdir / self.task_id
        self.paths = TaskPaths(self.task_dir)
        self.cancel_event = threading.Event()
        self.storage = Storage(config, stop=self.cancel_event)
        self.drivers = Drivers(config, workdir)
        self.tail_bytes = int(config["worker"]["log_tail_bytes"])
        self.token = read_token(self.task_dir) if server else None
        # a remote worker (started with --task-id: no file system shared with the
        # gateway) reports only over HTTP, so it waits for a restarting server; one whose
        # event log the gateway reads sends events as a courtesy and never waits long
        self.flush_seconds = float(config["worker"]["server_wait_seconds"]) if remote else 5.0
        self.events = EventLog(self.task_dir / "events.jsonl", self.task_id, server,
                               token=self.token, retry_seconds=self.flush_seconds)
        self.process: subprocess.Popen | None = None
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

    def _watch_server(self) -> None:
        """Notice a cancel made on the server."""
        import requests

        interval = float(self.config["worker"]["poll_server_seconds"])
        url = f"{self.server.rstrip('/')}/ga4gh/tes/v1/tasks/{self.task_id}"
        session = requests.Session()
        if self.token:
            session.headers["Authorization"] = f"Bearer {self.token}"
        while not self.cancel_event.wait(interval):
            try:
                state = session.get(url, params={"view": "MINIMAL"}, timeout=5).json()["state"]
            except Exception:
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
            threading.Thread(target=self._watch_server, daemon=True, name="cancel-watch").start()
        try:
            check_task(self.task)
            driver = self.drivers.choose()
            ev.emit("metadata", metadata={"container_driver": driver})
            binds = self._prepare_dirs()
            self._stage_in()
            ev.state("RUNNING")
            final = self._run_executors(driver, binds)
            if final == "COMPLETE":
                self._stage_out()
        except Canceled:
            final = "CANCELED"
        except (SystemFailure, StorageError, DriverError, PathError, TaskError, OSError) as exc:
            final = "CANCELED" if self.cancel_event.is_set() else "SYSTEM_ERROR"
            ev.system_log(f"{exc.__class__.__name__}: {exc}" if isinstance(exc, OSError)
                          else str(exc))
        except Exception as exc:  # a bug must still end the task, with its reason
            log.exception("task %s: unexpected error", self.task_id)
            final = "CANCELED" if self.cancel_event.is_set() else "SYSTEM_ERROR"
            ev.system_log(f"worker internal error: {exc.__class__.__name__}: {exc}")
        ev.emit("task_end", end_time=now_rfc3339())
        ev.state(final)
        self.cancel_event.set()  # stops the server watcher
        ev.close(self.flush_seconds)
        return final

    def _check_cancel(self) -> None:
        if self.cancel_event.is_set():
            raise Canceled()

    def _prepare_dirs(self) -> list[tuple[str, str]]:
        mounts = self.paths.mounts(self.task)
        binds = []
        for container in mounts:
            host = self.paths.host(container)
            host.mkdir(parents=True, exist_ok=True)
            self.paths.ensure_inside(host)
            binds.append((str(host), container))
        return binds

    def _stage_in(self) -> None:
        for item in self.task.get("inputs") or []:
            self._check_cancel()
            dest = self.paths.host(item["path"])
            try:
                if "content" in item and item["content"] is not None:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_text(item["content"], encoding="utf-8")
                    continue
                self.storage.get(item.get("url") or "", dest,
                                 is_dir=item.get("type") == "DIRECTORY")
            except StorageError as exc:
                raise SystemFailure(f"input {item['path']} from {exc}") from None
            except OSError as exc:  # e.g. the work dir's disk is full: free what we wrote
                if dest.is_file():
                    dest.unlink()
                raise SystemFailure(f"input {item['path']}: cannot write {dest}: "
                                    f"{exc.strerror or exc}") from None
            self.paths.ensure_inside(dest)

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
                dict(executor.get("env") or {}), executor.get("workdir"), binds)
            if invocation.note not in notes:
                notes.add(invocation.note)
                self.events.system_log(f"executor {index}: {invocation.note}")
            exit_code, out_tail, err_tail = self._run_one(index, executor, invocation)
            self._check_cancel()
            if exit_code != 0 and not executor.get("ignore_error"):
                return "EXECUTOR_ERROR"
        return "COMPLETE"

    def _run_one(self, index: int, executor: dict, inv: Invocation) -> tuple[int, str, str]:
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
                        cwd=str(self.task_dir))
            except OSError as exc:
                raise DriverError(f"cannot start {inv.argv[0]}: {exc.strerror}") from None
            proc = self.process
            if self.cancel_event.is_set():
                self._kill_process()
            pumps = [threading.Thread(target=_pump, args=(proc.stdout, stdout_file, out_tail)),
                     threading.Thread(target=_pump, args=(proc.stderr, stderr_file, err_tail))]
            for pump in pumps:
                pump.start()
            exit_code = proc.wait()
            for pump in pumps:
                pump.join()
        if exit_code < 0:  # killed by a signal: report it the way shells do
            exit_code = 128 - exit_code
        self.events.emit("executor_end", index=index, end_time=now_rfc3339(),
                         exit_code=exit_code, stdout=out_tail.text(), stderr=err_tail.text())
        return exit_code, out_tail.text(), err_tail.text()

    def _stage_out(self) -> None:
        for item in self.task.get("outputs") or []:
            self._check_cancel()
            path = item["path"]
            try:
                if WILDCARD.search(path):
                    # check_task made sure path_prefix is a prefix of path
                    prefix = check_container_path(item["path_prefix"]).rstrip("/") + "/"
                    matches = [m for m in self.paths.glob(path) if m[0].startswith(prefix)]
                    for container, host in matches:
                        self._upload(host, container, join_url(item["url"], container[len(prefix):]))
                    if not matches:
                        self.events.system_log(f"output {path}: no files matched")
                elif item.get("type") == "DIRECTORY":
                    root = self.paths.host(path)
                    if not root.is_dir():
                        raise SystemFailure(f"output directory {path} does not exist")
                    for dirpath, _dirs, files in os.walk(root):
                        for name in sorted(files):
                            host = Path(dirpath) / name
                            rel = str(host.relative_to(root))
                            self._upload(host, path.rstrip("/") + "/" + rel,
                                         join_url(item["url"], rel))
                else:
                    host = self.paths.host(path)
                    if not host.is_file():
                        raise SystemFailure(f"output file {path} does not exist")
                    self._upload(host, path, item["url"])
            except StorageError as exc:
                raise SystemFailure(f"output {path} to {exc}") from None

    def _upload(self, host: Path, container: str, url: str) -> None:
        self._check_cancel()  # after a cancel, nothing more is uploaded
        self.paths.ensure_inside(host)  # a symlink to elsewhere is refused
        size = host.stat().st_size
        self.storage.put(host, url)
        self.events.emit("output", url=url, path=container, size_bytes=str(size))


def run_task(task: dict, workdir: Path, config: dict, server: str | None = None,
             remote: bool = False) -> str:
    """Run a task to its end; SIGTERM/SIGINT cancel it. Returns the final TES state.
    remote: the gateway does not read this worker's event log (see TaskRunner)."""
    runner = TaskRunner(task, workdir, config, server, remote)
    previous = {}

    def on_signal(signum, _frame):
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
