"""The wrapper around each local worker, and the launcher that starts wrappers.

Wrapper: it records its pid and start time (TASK_DIR/local.pid), runs the worker, then
writes the worker's exit status to TASK_DIR/local.exit (atomically: a number, negative
for a signal), so a gateway restarted meanwhile still learns how it ended. A SIGTERM
to the process group reaches the worker; the wrapper ignores it and waits for the
worker, so the exit status is still recorded. Each wrapper leads its own session.

Launcher (``python -m funnel_hpc.backends.local_runner --serve``): one per gateway
process, a helper speaking JSON lines (backends/jsonlines.py). Each request
(``{"task_dir": ..., "argv": [...]}``) forks a wrapper and is answered with its pid,
once the wrapper leads its own process group. When a wrapper ends the launcher sends
the notice ``{"notice": "exit", "pid": ...}``, so the gateway reconciles at once. A
worker whose argv is this Python's ``-m MODULE ...`` (the default worker command) runs
in the forked process itself, as ``python -m`` would run it, without starting a new
interpreter (the cost a local task would otherwise pay before doing anything); the
launcher imports ``MODULE.main`` and the modules its ``PRELOAD`` names once, before the
first such fork. Any other worker command is exec'd. The launcher knows the worker only
by that name. It ends when its stdin closes (the gateway stopped); wrappers it started
go on without it.

``python -m funnel_hpc.backends.local_runner TASK_DIR -- WORKER ARGV...`` runs one
wrapper in the foreground (no launcher).
"""

from __future__ import annotations

import importlib
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from funnel_hpc.backends.jsonlines import NOTICE, write_line
from funnel_hpc.backends.jsonlines import serve as serve_lines
from funnel_hpc.backends.local import EXIT, write_atomic, write_pid_record


def in_process_module(argv: list[str]) -> str | None:
    """MODULE when argv is this Python's ``-m MODULE ...``, else None."""
    if len(argv) >= 3 and argv[0] == sys.executable and argv[1] == "-m":
        return argv[2]
    return None


def _ignore_term() -> None:
    # a no-op handler (not SIG_IGN, which the worker would inherit): the worker gets the
    # group's SIGTERM and ends; the wrapper waits for it and records how it ended
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)


def run_wrapper(task_dir: Path, argv: list[str]) -> None:
    """Record ourselves, run the worker, record its exit status."""
    # first: a gateway killed right after starting us still finds us
    write_pid_record(task_dir, os.getpid())
    _ignore_term()
    try:
        code = subprocess.call(argv)
    except OSError as exc:
        print(f"local backend: cannot start the worker: {exc}", file=sys.stderr)
        code = 127
    write_atomic(task_dir / EXIT, str(code))


def main(argv: list[str]) -> int:
    if argv == ["--serve"]:
        return serve()
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m funnel_hpc.backends.local_runner TASK_DIR -- ARGV...",
              file=sys.stderr)
        return 2
    run_wrapper(Path(argv[0]), argv[2:])
    return 0


# ---- launcher ----

def preload(module: str) -> None:
    """Import MODULE.main and what its PRELOAD names, once, for every fork after it."""
    try:
        main_module = importlib.import_module(f"{module}.main")
    except ImportError:
        return  # the fork imports what it needs itself
    for name in getattr(main_module, "PRELOAD", ()):
        importlib.import_module(name)


def serve() -> int:
    """The launcher: a helper process speaking JSON lines (backends/jsonlines.py). A request
    {"task_dir", "argv"} is answered with the wrapper's pid; a wrapper's end is the
    notice {"notice": "exit", "pid": ...}."""
    out = sys.stdout
    preloaded: set[str] = set()

    def on_child_exit(*_: object) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            try:
                write_line(out, {NOTICE: "exit", "pid": pid})
            except (BrokenPipeError, ValueError):
                pass  # the gateway is gone; nobody to tell

    def launch(request: dict[str, Any]) -> int:
        task_dir, argv = Path(request["task_dir"]), [str(a) for a in request["argv"]]
        module = in_process_module(argv)
        if module and module not in preloaded:
            preloaded.add(module)
            preload(module)
        return _fork_wrapper(task_dir, argv)

    signal.signal(signal.SIGCHLD, on_child_exit)
    return serve_lines(launch, hello="launcher")


def _fork_wrapper(task_dir: Path, argv: list[str]) -> int:
    """Fork a wrapper; its pid once it leads its own session and process group.

    The pid is answered only then: the gateway reports the job RUNNING as soon as the
    pid is alive, and a cancel signals the group (os.killpg(pid)), which does not exist
    until the wrapper has called setsid (on a busy machine, measured, that can be after
    the gateway's first poll)."""
    out = os.open(task_dir / "worker.out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    err = os.open(task_dir / "worker.err", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    ready_read, ready_write = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # the wrapper
            code = 1
            try:
                os.close(ready_read)
                _become_wrapper(task_dir, out, err)
                os.close(ready_write)  # the launcher's read ends: we lead our group
                code = _wrap(task_dir, argv)
            finally:
                os._exit(code)
        os.close(ready_write)
        ready_write = -1
        os.read(ready_read, 1)  # EOF once the wrapper leads its group (or died trying)
        return pid
    finally:
        os.close(out)
        os.close(err)
        os.close(ready_read)
        if ready_write >= 0:
            os.close(ready_write)


def _become_wrapper(task_dir: Path, out: int, err: int) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in (null, out, err):
        os.close(fd)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False, buffering=1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    os.chdir(task_dir)


def _wrap(task_dir: Path, argv: list[str]) -> int:
    """In the forked wrapper: as run_wrapper, with the worker forked instead of exec'd
    when it is this Python's `-m MODULE ...`."""
    module = in_process_module(argv)
    if module is None:
        run_wrapper(task_dir, argv)
        return 0
    write_pid_record(task_dir, os.getpid())
    _ignore_term()
    try:
        child = os.fork()
    except OSError as exc:
        print(f"local backend: cannot start the worker: {exc}", file=sys.stderr)
        write_atomic(task_dir / EXIT, "127")
        return 0
    if child == 0:  # the worker
        code = 2
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            sys.argv = [module, *argv[3:]]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - report, then the exit code says it
            print(f"local backend: worker crashed: {exc!r}", file=sys.stderr)
            code = 2
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    while True:
        try:
            _pid, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    write_atomic(task_dir / EXIT, str(os.waitstatus_to_exitcode(status)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
