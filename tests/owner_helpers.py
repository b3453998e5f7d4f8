"""Helpers for tests/test_owner_reads.py: real local users, commands run as one of them,
a process's peak memory and the bytes it has read."""

from __future__ import annotations

import pwd
import secrets
import subprocess


def make_user(prefix: str) -> str:
    """A new local user (and its group) with no home and no login shell."""
    name = f"fh{prefix}{secrets.token_hex(3)}"
    subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", name], check=True)
    return name


def remove_user(name: str) -> None:
    subprocess.run(["userdel", name], check=True)


def as_user(name: str, argv: list[str], data: bytes | None = None) -> bytes:
    """argv run as user `name` (its uid, gid and no other group): what it printed."""
    account = pwd.getpwnam(name)
    done = subprocess.run(argv, input=data, capture_output=True, user=account.pw_uid,
                          group=account.pw_gid, extra_groups=[], timeout=60)
    assert done.returncode == 0, f"{argv} as {name}: {done.stderr.decode(errors='replace')}"
    return done.stdout


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a process: the most resident memory it has had, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM for process {pid}")


def bytes_read(pid: int) -> int:
    """rchar of a process: the bytes its read calls (pread too, sockets too) returned."""
    with open(f"/proc/{pid}/io") as io:
        for line in io:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError(f"no rchar for process {pid}")
