"""worker/standin.py: the forked stand-in the id range and the copy-on-write probe map
and mount into is in namespaces of its own while the block runs, and is gone after."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys

import pytest

from funnel_hpc.worker.standin import CLONE_NEWUSER, THREADED, StandIn, UnshareFailed

UNSHARE = ctypes.CDLL(None, use_errno=True).unshare


def test_the_stand_in_has_its_own_user_namespace_and_ends_after_the_block():
    with StandIn(UNSHARE, CLONE_NEWUSER) as pid:
        assert pid is not None
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    with pytest.raises(ChildProcessError):  # reaped
        os.waitpid(pid, os.WNOHANG)


def _failing_unshare(flags: int) -> int:
    """An unshare that fails as a ctypes function with use_errno does: errno ENOSPC
    (what the kernel says when max_user_namespaces is reached)."""
    ctypes.set_errno(errno.ENOSPC)
    return -1


def test_a_failed_unshare_raises_its_errno_and_still_ends_the_child():
    stand_in = StandIn(_failing_unshare, CLONE_NEWUSER)
    with pytest.raises(UnshareFailed) as failed:
        with stand_in:
            pytest.fail("the block runs only when the namespaces were made")
    assert failed.value.errno == errno.ENOSPC
    assert failed.value.strerror == os.strerror(errno.ENOSPC)
    assert stand_in.pid > 0
    with pytest.raises(ChildProcessError):  # ended and reaped
        os.waitpid(stand_in.pid, os.WNOHANG)


def test_the_id_range_message_says_the_errno(monkeypatch):
    from funnel_hpc.worker import subids
    from funnel_hpc.worker.sandbox import SandboxError

    monkeypatch.setattr(subids, "StandIn",
                        lambda unshare, flags: StandIn(_failing_unshare, flags))
    with pytest.raises(SandboxError, match="cannot make a user namespace for the "
                                           "subordinate ids: No space left on device"):
        subids._mapped_namespace(object())  # type: ignore[arg-type]


# run in a Python of its own: an at-fork handler cannot be taken back
THREADED_CHILD = """
import ctypes, os, threading, time
from funnel_hpc.worker.standin import CLONE_NEWUSER, StandIn, UnshareFailed
os.register_at_fork(after_in_child=lambda: threading.Thread(
    target=time.sleep, args=(5,), daemon=True).start())
try:
    with StandIn(ctypes.CDLL(None, use_errno=True).unshare, CLONE_NEWUSER):
        print("made")
except UnshareFailed as exc:
    print(exc.errno, exc.strerror)
"""


def test_a_child_an_at_fork_handler_gave_threads_is_named_as_the_cause():
    """gRPC's fork support restarts its threads in every forked child, and a child with
    threads cannot make a user namespace: the error says so, not only EINVAL."""
    done = subprocess.run([sys.executable, "-c", THREADED_CHILD], capture_output=True,
                          text=True, timeout=60, check=True)
    assert done.stdout.strip() == f"{errno.EINVAL} {os.strerror(errno.EINVAL)}: {THREADED}"
