"""worker/standin.py: the forked stand-in the id range and the copy-on-write probe map
and mount into is in namespaces of its own while the block runs, and is gone after."""

from __future__ import annotations

import ctypes
import os

import pytest

from funnel_hpc.worker.standin import StandIn
from funnel_hpc.worker.subids import CLONE_NEWUSER

UNSHARE = ctypes.CDLL(None, use_errno=True).unshare


def test_the_stand_in_has_its_own_user_namespace_and_ends_after_the_block():
    with StandIn(UNSHARE, CLONE_NEWUSER) as pid:
        assert pid is not None
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    with pytest.raises(ChildProcessError):  # reaped
        os.waitpid(pid, os.WNOHANG)


def test_a_failed_unshare_gives_none_and_still_ends_the_child():
    stand_in = StandIn(lambda flags: -1, CLONE_NEWUSER)
    with stand_in as pid:
        assert pid is None and stand_in.pid > 0
    with pytest.raises(ChildProcessError):  # ended and reaped
        os.waitpid(stand_in.pid, os.WNOHANG)
