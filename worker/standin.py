"""A stand-in process in new namespaces, for the worker's sandbox set-up.

``StandIn`` forks a child that unshares the namespaces asked for, says through a pipe
whether it could (or the errno it got), and waits on another pipe until the parent is
done with it: meanwhile the parent maps its user namespace (``/proc/PID/uid_map``,
newuidmap), holds one of its namespaces by descriptor or mounts into them (subids.py's
id range, overlay_root.py's probe). The unshare function is resolved before the fork and
the child makes system calls only (no Python allocation that could wait on a lock
another thread held at the fork). Leaving the ``with`` block ends the child and reaps
it.
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Callable


CLONE_NEWUSER = 0x10000000
# unshare(CLONE_NEWUSER) says EINVAL only when the caller has other threads: in the forked
# child, threads an at-fork handler of this process started (gRPC's fork support does)
THREADED = ("the forked stand-in had other threads (an at-fork handler in this process "
            "started them, as gRPC's fork support does)")


class UnshareFailed(OSError):
    """The stand-in's unshare failed (errno and strerror say why); its child is ended."""


class StandIn:
    """``with StandIn(unshare, flags) as pid``: pid is the child's; UnshareFailed when
    its unshare failed (the child is then ended and reaped before it is raised).
    ``unshare`` is a ctypes function made with ``use_errno=True``."""

    def __init__(self, unshare: Callable[[int], int], flags: int) -> None:
        self.unshare = unshare
        self.flags = flags
        self.pid = 0
        self.ready_read = self.go_write = -1

    def __enter__(self) -> int:
        from ctypes import get_errno  # before the fork; loaded already by the caller's

        go_read, self.go_write = os.pipe()
        self.ready_read, ready_write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the namespaces' first process: makes them, says so, waits
            try:
                os.close(self.go_write)
                os.close(self.ready_read)
                failed = self.unshare(self.flags) != 0
                # one byte: 0, or the errno (255 when it does not fit or is not set)
                os.write(ready_write, bytes((get_errno() % 256 or 255,)) if failed else b"\0")
                os.read(go_read, 1)
            finally:
                os._exit(0)
        os.close(go_read)
        os.close(ready_write)
        try:
            answer = os.read(self.ready_read, 1)
        except BaseException:
            self.__exit__()
            raise
        if answer != b"\0":
            self.__exit__()
            code = answer[0] if answer else 255  # nothing: the child died before saying
            reason = os.strerror(code)
            if code == errno.EINVAL and self.flags & CLONE_NEWUSER:
                reason = f"{reason}: {THREADED}"
            raise UnshareFailed(code, reason)
        return self.pid

    def __exit__(self, *_: object) -> None:
        os.close(self.ready_read)
        os.close(self.go_write)  # the child's read returns: it ends
        os.waitpid(self.pid, 0)
