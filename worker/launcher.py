"""The task's launcher: one small root process per task, put in the task's cgroup once,
that forks each executor there, so an executor is born inside the group (fork inherits
every cgroup) and no executor start writes a cgroup.procs file.

Why: moving a process into a cgroup takes the kernel's cgroup_threadgroup_rwsem for
writing, which waits for an RCU grace period (9-12 ms on a busy node) unless another move
just happened: that one write made a sandboxed start 1.4-1.75x the same bwrap run
directly. A fork takes the same lock for reading only, which costs nothing.

Contract: `Launcher.spawn(python, group_procs)` starts the launcher (its interpreter start
overlaps what the worker does next); `Launcher.start(argv, ...)` asks it to fork argv with
the given fds (passed with SCM_RIGHTS at the numbers the caller uses), env, cwd, uid/gid,
new session and file size rlimit, and returns a `Launched`: pid, stdout, stderr, poll(),
wait() as subprocess.Popen has them (exit codes and signals unchanged: the launcher waits
for its child and passes waitpid's answer on). `Unusable` means: start it the old way.
The launcher exits when the worker's end of its socket closes (kill -9 of the worker too);
its cgroup's kill ends it like any process of the task.

This file is also the launcher itself: `python -I -S launcher.py FD` (standard library
only, no site: the interpreter start is ~10 ms, paid once per task).

Cost per executor: one sendmsg, one fork of a ~10 MB process and the exec; a pipe carries
the pid back, then the exit status.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from typing import IO

HIGH_FD = 256  # the launcher keeps its own fds from here: a caller's fd numbers are below
MAX_REQUEST = 16 << 20


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
        import select
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return None
        try:
            if self.returncode is not None:
                return self.returncode
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._status_fd], [], [], left)[0]:
                return None
            line = _read_line(self._status_fd)
            os.close(self._status_fd)
            # no exit line: the launcher was killed (the task's cgroup killed, or OOM), and
            # its child with it
            self.returncode = int(line.split()[1]) if line.startswith("exit ") else -9
            return self.returncode
        finally:
            self._lock.release()


class Launcher:
    """The worker's handle on a task's launcher process."""

    def __init__(self, process: object, sock: object):
        import threading

        self.process = process  # subprocess.Popen: the launcher, a child of the worker
        self._sock = sock  # _socket.socket, the worker's end
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._failed = False

    @property
    def pid(self) -> int:
        return self.process.pid  # type: ignore[attr-defined, no-any-return]

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
        self._ready.set()

    def usable(self, timeout: float) -> bool:
        """In the group and alive (waits up to timeout for the placing)."""
        return self._ready.wait(timeout) and not self._failed and \
            self.process.poll() is None  # type: ignore[attr-defined]

    def start(self, argv: Sequence[str], stdin: int, stdout: int, stderr: int,
              env: Mapping[str, str] | None, cwd: str | None, ids: tuple[int, int] | None,
              new_session: bool, fsize_bytes: int | None,
              pass_fds: Sequence[int] = ()) -> tuple[int, int]:
        """Fork argv in the launcher: (its pid, the fd its exit status comes on). Raises
        OSError as Popen would (exec failed), Unusable when the launcher cannot."""
        import array
        import json

        request = json.dumps({
            "argv": list(argv), "env": None if env is None else dict(env), "cwd": cwd,
            "ids": None if ids is None else list(ids), "session": new_session,
            "fsize": fsize_bytes, "fds": list(pass_fds)}).encode()
        if len(request) > MAX_REQUEST:
            raise Unusable("request too large")
        status_read, status_write = os.pipe()
        try:
            fds = array.array("i", [status_write, stdin, stdout, stderr, *pass_fds])
            with self._lock:
                try:
                    self._sock.sendmsg(  # type: ignore[attr-defined]
                        [len(request).to_bytes(4, "big"), request],
                        [(_SOL_SOCKET, _SCM_RIGHTS, fds.tobytes())])
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
        self._sock.close()  # type: ignore[attr-defined]
        process = self.process
        try:
            process.wait(1)  # type: ignore[attr-defined]
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


def _receive(sock: object) -> tuple[dict, list[int]] | None:
    """One request and its fds; None at EOF (the worker is gone)."""
    import array
    import json
    import socket

    assert isinstance(sock, socket.socket)
    fds: list[int] = []
    head, ancillary, _flags, _address = sock.recvmsg(4, socket.CMSG_SPACE(64 * 4))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[:len(data) - len(data) % 4]))
    while 0 < len(head) < 4:
        more = sock.recv(4 - len(head))
        if not more:
            break
        head += more
    if len(head) < 4:
        for fd in fds:
            os.close(fd)
        return None
    size = int.from_bytes(head, "big")
    body = b""
    while len(body) < size:
        more = sock.recv(size - len(body))
        if not more:
            return None
        body += more
    return json.loads(body), fds


def _high(fd: int) -> int:
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
    os.close(fd)
    return moved


def _spawn(request: dict, fds: list[int]) -> object:
    """Popen the request; fds: stdin, stdout, stderr, then those to pass (already high)."""
    import resource
    import subprocess

    targets = [int(fd) for fd in request["fds"]]
    for source, target in zip(fds[3:], targets):
        os.dup2(source, target)  # at the number the argv names (bwrap --seccomp N)
    size = request["fsize"]
    limit = resource.RLIM_INFINITY if size is None else int(size)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    ids = request["ids"]
    users = {} if ids is None else {"user": ids[0], "group": ids[1], "extra_groups": []}
    try:
        return subprocess.Popen(request["argv"], stdin=fds[0], stdout=fds[1], stderr=fds[2],
                                pass_fds=targets, env=request["env"], cwd=request["cwd"],
                                start_new_session=bool(request["session"]), **users)
    finally:
        for target in targets:
            os.close(target)


def serve(sock_fd: int) -> None:
    """The launcher's loop: one executor at a time, until the worker's end closes."""
    import socket

    sock = socket.socket(fileno=_high(sock_fd))
    while True:
        received = _receive(sock)
        if received is None:
            return
        request, fds = received
        fds = [_high(fd) for fd in fds]
        status, own = fds[0], fds[1:]
        try:
            if len(own) != 3 + len(request["fds"]):
                raise OSError(22, "fds missing from the request")
            child = _spawn(request, own)
        except OSError as error:
            os.write(status, f"error {error.errno or 0} {error.strerror or error}\n".encode())
            os.close(status)
            continue
        finally:
            for fd in own:
                os.close(fd)
        os.write(status, f"pid {child.pid}\n".encode())  # type: ignore[attr-defined]
        code = child.wait()  # type: ignore[attr-defined]
        try:
            os.write(status, f"exit {code}\n".encode())
        except OSError:  # the worker stopped listening (it died)
            pass
        os.close(status)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
