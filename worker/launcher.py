"""The task's launcher: one small root process per task, put in the task's cgroup once,
that forks each executor there, so an executor is born inside the group (fork inherits
every cgroup) and no executor start writes a cgroup.procs file.

Why: moving a process into a cgroup takes the kernel's cgroup_threadgroup_rwsem for
writing, which waits for an RCU grace period (9-12 ms on a busy node) unless another move
just happened: that one write made a sandboxed start 1.4-1.75x the same bwrap run
directly. A fork takes the same lock for reading only, which costs nothing.

Contract: `Launcher.spawn()` starts the launcher (its interpreter start overlaps what the
worker does next); worker/cgroups.py moves it into the group and calls `placed()`; once
`ready()` (it said it listens), `Launcher.start(argv, ...)` asks it to fork argv with
the given fds (passed with SCM_RIGHTS at the numbers the caller uses), env, cwd, uid/gid,
new session and file size rlimit, and returns a `Launched`: pid, stdout, stderr, poll(),
wait() as subprocess.Popen has them (exit codes and signals unchanged: the launcher waits
for its child and passes waitpid's answer on). `Unusable` means: start it the old way.
The launcher exits when the worker's end of its socket closes (kill -9 of the worker too);
its cgroup's kill ends it like any process of the task.

This file is also the launcher itself: `python -I -S launcher.py FD` (standard library
only, no site: the interpreter start is ~12 ms, paid once per task).

Cost per executor: one sendmsg, one fork of a ~10 MB process and the exec; a pipe carries
the pid back, then the exit status.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    import _socket
    import subprocess
    from collections.abc import Mapping, Sequence
    from typing import IO, Any

HIGH_FD = 256  # the launcher keeps its own fds from here: a caller's fd numbers are below
MAX_REQUEST = 16 << 20
UP = b"u"  # the launcher's first word: listening
MAX_FDS = 64  # stdin, stdout, stderr, the exit status pipe and those passed


class Unusable(RuntimeError):
    """The launcher cannot start this executor (gone, or a request it cannot carry)."""


# ---------------------------------------------------------------- the worker's side


class Launched:
    """An executor the launcher forked: what executors.py uses of subprocess.Popen."""

    def __init__(self, pid: int, status_fd: int, stdout: IO[bytes] | None,
                 stderr: IO[bytes] | None):
        import threading

        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._status_fd = status_fd  # the launcher writes "exit RC" and closes it
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self._wait(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._wait(timeout)
        if code is None:
            import subprocess

            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
        return code

    def _wait(self, timeout: float | None) -> int | None:
        import math
        import select
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return None
        try:
            if self.returncode is not None:
                return self.returncode
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            poller = select.poll()  # not select.select: fds past 1023
            poller.register(self._status_fd, select.POLLIN)
            if not poller.poll(None if left is None else math.ceil(left * 1000)):
                return None
            line = _read_line(self._status_fd)
            os.close(self._status_fd)
            # no exit line: the launcher was killed (the task's cgroup killed, or OOM), and
            # its child with it
            self.returncode = int(line.split()[1]) if line.startswith("exit ") else -9  # KILL
            return self.returncode
        finally:
            self._lock.release()


class Launcher:
    """The worker's handle on a task's launcher process."""

    def __init__(self, process: subprocess.Popen[bytes], sock: _socket.socket):
        import threading

        self.process = process  # the launcher, a child of the worker
        self._sock = sock  # the worker's end
        self._lock = threading.Lock()
        self._placed = threading.Event()
        self._failed = False
        self._up = False  # it sent UP

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def spawn(cls, python: str = sys.executable) -> Launcher:
        """Start the launcher (not yet in any group: `placed()` says it is). Raises
        OSError."""
        import _socket
        import subprocess

        mine, theirs = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            process = subprocess.Popen(
                [python, "-I", "-S", os.path.abspath(__file__), str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
                start_new_session=True)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        return cls(process, mine)

    def placed(self, ok: bool) -> None:
        """The launcher is in the task's group (ok), or could not be put there."""
        self._failed = not ok
        self._placed.set()

    def in_group(self) -> bool:
        """Put in the group and alive."""
        return self._placed.is_set() and not self._failed and \
            self.process.poll() is None

    def ready(self) -> bool:
        """In the group, alive and listening (its interpreter has started): never waits,
        so a start that comes sooner goes the old way instead."""
        if not self._up:
            import _socket

            try:
                self._up = self._sock.recv(1, _socket.MSG_DONTWAIT) == UP
            except OSError:  # BlockingIOError: not yet
                return False
        return self._up and self.in_group()

    def start(self, argv: Sequence[str], stdin: int, stdout: int, stderr: int,
              env: Mapping[str, str] | None, cwd: str | None, ids: tuple[int, int] | None,
              new_session: bool, fsize_bytes: int | None,
              pass_fds: Sequence[int] = ()) -> tuple[int, int]:
        """Fork argv in the launcher: (its pid, the fd its exit status comes on). Raises
        OSError as Popen would (exec failed), Unusable when the launcher cannot."""
        import marshal

        request = marshal.dumps({
            "argv": [str(word) for word in argv], "cwd": cwd,
            "env": None if env is None else {str(k): str(v) for k, v in env.items()},
            "ids": None if ids is None else [int(ids[0]), int(ids[1])],
            "session": new_session, "fsize": fsize_bytes, "fds": [int(fd) for fd in pass_fds]})
        if len(request) > MAX_REQUEST or len(pass_fds) + 4 > MAX_FDS:
            raise Unusable("a request the launcher does not take")
        status_read, status_write = os.pipe()
        try:
            fds = b"".join(fd.to_bytes(4, sys.byteorder, signed=True)
                           for fd in (status_write, stdin, stdout, stderr, *pass_fds))
            with self._lock:
                data = len(request).to_bytes(4, "big") + request
                try:
                    sent = self._sock.sendmsg([data], [(_SOL_SOCKET, _SCM_RIGHTS, fds)])
                    if sent < len(data):  # a signal cut it short: the rest, fds sent
                        self._sock.sendall(data[sent:])
                except OSError as error:
                    raise Unusable(f"launcher gone: {error.strerror}") from None
            os.close(status_write)
            status_write = -1
            line = _read_line(status_read)
        except BaseException:
            os.close(status_read)
            if status_write >= 0:
                os.close(status_write)
            raise
        word, _sep, rest = line.partition(" ")
        if word == "pid":
            return int(rest), status_read
        os.close(status_read)
        if word == "error":
            number, _sep, message = rest.partition(" ")
            raise OSError(int(number), message)
        raise Unusable("launcher gone")

    def close(self) -> None:
        """EOF on its socket: the launcher exits (it is killed with the group anyway)."""
        self._sock.close()
        process = self.process
        try:
            process.wait(1)
        except Exception:  # noqa: BLE001  # not ours to wait for: the group kill ends it
            pass


_SOL_SOCKET = 1  # Linux values (socket's constants would cost the worker its import)
_SCM_RIGHTS = 1


def _read_line(fd: int) -> str:
    """One line from fd, read a byte at a time: what follows it is left in the pipe."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


# ---------------------------------------------------------------- the launcher's side
# Only builtin and C modules here (no json, subprocess, array: `re` and `collections` would
# double the launcher's start); the child is forked from this single-threaded process.


def _receive(sock: _socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One request and its fds; None at EOF (the worker is gone)."""
    import _socket
    import marshal

    fds: list[int] = []
    head, ancillary, _flags, _address = sock.recvmsg(
        4, _socket.CMSG_SPACE(MAX_FDS * 4), _socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            fds.extend(_ints(data))
    while 0 < len(head) < 4:
        more = sock.recv(4 - len(head))
        if not more:
            break
        head += more
    size = int.from_bytes(head, "big") if len(head) == 4 else -1
    body = b""
    while 0 <= len(body) < size:
        more = sock.recv(size - len(body))
        if not more:
            size = -1
            break
        body += more
    if size < 0:
        for fd in fds:
            os.close(fd)
        return None
    return marshal.loads(body), fds


def _ints(data: bytes) -> list[int]:
    return [int.from_bytes(data[at:at + 4], sys.byteorder, signed=True)
            for at in range(0, len(data) - 3, 4)]


def _high(fd: int) -> int:
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
    os.close(fd)
    return moved


def _child(request: dict[str, Any], own: list[int], failed: int) -> None:
    """In the forked child: the fds at their numbers, the session, cwd, file size limit,
    the user, default signals, then exec; on failure its errno goes to `failed`."""
    import _signal  # type: ignore[import-not-found]
    import resource

    try:
        targets = [int(fd) for fd in request["fds"]]
        for source, target in zip(own, [0, 1, 2, *targets], strict=True):
            os.dup2(source, target)  # inheritable; every other fd here is close-on-exec
        if request["session"]:
            os.setsid()
        if request["cwd"] is not None:
            os.chdir(request["cwd"])
        size = request["fsize"]
        limit = resource.RLIM_INFINITY if size is None else int(size)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        if request["ids"] is not None:
            os.setgroups([])
            os.setgid(request["ids"][1])
            os.setuid(request["ids"][0])
        for number in (_signal.SIGPIPE, _signal.SIGXFSZ):  # Python ignores them: Popen's
            _signal.signal(number, _signal.SIG_DFL)  # restore_signals
        argv = request["argv"]
        env = os.environ if request["env"] is None else request["env"]
        first: OSError | None = None
        for path in request["paths"]:
            try:
                os.execve(path, argv, env)
            except OSError as error:  # as Popen: the first error that is not "not here"
                if first is None or (first.errno in (2, 20) and error.errno not in (2, 20)):
                    first = error
        raise first or OSError(2, "No such file or directory")
    except BaseException as error:  # noqa: BLE001  # whatever it is, the parent hears it
        number = getattr(error, "errno", None) or 0
        os.write(failed, f"{number} {getattr(error, 'strerror', None) or error}".encode())
    finally:
        os._exit(127)


def _spawn(request: dict[str, Any], own: list[int]) -> int:
    """Fork and exec the request (own: stdin, stdout, stderr, then the fds to pass, all
    above HIGH_FD); its pid once the exec succeeded, else OSError as Popen raises it."""
    if len(own) != 3 + len(request["fds"]) or \
            any(not 3 <= int(fd) < HIGH_FD for fd in request["fds"]):
        raise OSError(22, "fds missing from the request")
    program = request["argv"][0] if request["argv"] else ""
    env = os.environ if request["env"] is None else request["env"]
    # searched here, as Popen does, not in the child (os.execvpe imports after setuid)
    request["paths"] = [program] if os.path.dirname(program) else \
        [os.path.join(folder, program) for folder in
         (env.get("PATH") or os.defpath).split(os.pathsep)]
    read_end, write_end = os.pipe()  # close-on-exec: EOF once the exec succeeded
    read_end, write_end = _high(read_end), _high(write_end)
    try:
        pid = os.fork()
        if pid == 0:
            _child(request, own, write_end)
        os.close(write_end)
        write_end = -1
        failure = os.read(read_end, 4096)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if failure:
        os.waitpid(pid, 0)
        number, _sep, message = failure.decode(errors="replace").partition(" ")
        raise OSError(int(number), message)
    return pid


def serve(sock_fd: int) -> None:
    """The launcher's loop: one executor at a time, until the worker's end closes."""
    import _signal  # noqa: F401  # imported once here, not in each forked child
    import _socket
    import resource  # noqa: F401

    sock = _socket.socket(fileno=_high(sock_fd))
    sock.send(UP)
    while True:
        received = _receive(sock)
        if received is None:
            return
        request, fds = received
        fds = [_high(fd) for fd in fds]
        status, own = fds[0], fds[1:]
        try:
            pid = _spawn(request, own)
        except OSError as error:
            os.write(status, f"error {error.errno or 0} {error.strerror or error}\n".encode())
            os.close(status)
            continue
        finally:
            for fd in own:
                os.close(fd)
        os.write(status, f"pid {pid}\n".encode())
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        try:
            os.write(status, f"exit {code}\n".encode())
        except OSError:  # the worker stopped listening (it died)
            pass
        os.close(status)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
