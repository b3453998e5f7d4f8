"""Helpers of the submit_as_owner tests: real local users, a funnel-hpc install every user
can read (as docs/admin.md recommends), running commands as a user, and a process's peak
memory and the bytes it has read."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import pytest

from tests.components import need
from tests.waiting import wait_for


def need_root() -> None:
    """Fail under CI, skip on a laptop: these tests make users and chown."""
    need("root", os.geteuid() == 0, "the submit_as_owner tests make local users and chown")


def make_user(prefix: str, *, system: bool = False, groups: tuple[str, ...] = ()) -> str:
    """A real local account with a home (or a system account, uid below UID_MIN)."""
    name = f"fo{prefix}{secrets.token_hex(3)}"
    argv = ["useradd", "-U", "-s", "/bin/sh"]
    argv += ["-r", "-M"] if system else ["-m"]
    if groups:
        argv += ["-G", ",".join(groups)]
    subprocess.run([*argv, name], check=True, capture_output=True)
    return name


def drop_user(name: str) -> None:
    """The account, its home and its Slurm jobs, gone."""
    subprocess.run(["scancel", "-u", name], capture_output=True)
    subprocess.run(["userdel", "-r", "-f", name], capture_output=True)
    subprocess.run(["groupdel", name], capture_output=True)


def as_user(user: str, *argv: str, **kwargs) -> subprocess.CompletedProcess:
    """argv run as user (runuser, from root), output captured as text."""
    return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True,
                          text=True, cwd="/", **kwargs)


def run_as(name: str, argv: list[str], data: bytes | None = None) -> bytes:
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


def open_dir(prefix: str) -> Path:
    """A fresh directory under /tmp that every user may traverse and read (755)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def readable_install(directory: Path) -> Path:
    """This checkout's install, as every user can run it: a venv of the system Python
    (Debian's /usr/bin/python3, not a pyenv one under /root) in a 755 directory, seeing
    this checkout's link tree and dependencies (the test venv's site-packages, under the
    checkout: world-readable). What docs/admin.md recommends is the same but with
    `pip install`: /opt/funnel-hpc from /usr/bin/python3. Returns its python."""
    system_python = shutil.which("python3", path="/usr/bin")
    if system_python is None:
        pytest.fail("/usr/bin/python3 missing (scripts/setup/10-base.sh installs it)")
    subprocess.run([system_python, "-m", "venv", "--without-pip", str(directory)], check=True)
    theirs = subprocess.run([str(directory / "bin" / "python"), "-c",
                             "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            capture_output=True, text=True, check=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]  # with the strict editable install's .pth
    if as_user("nobody", "test", "-r", f"{ours}/yaml/__init__.py").returncode != 0:
        pytest.fail(f"{ours} (this checkout's venv) is not readable by other users: check "
                    "the checkout out where they can read it (not under a 700 /root)")
    Path(theirs, "funnel-checkout.pth").write_text(
        f"import site; site.addsitedir({ours!r})\n")
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o055 if path.is_dir() else
                       path.stat().st_mode | 0o044)
    return directory / "bin" / "python"


def slurm_jobs(user: str, name: str) -> list[str]:
    """Ids of the user's jobs of that name squeue lists (any state). By name: a uid
    freed by userdel is given to the next new account, old jobs included."""
    done = subprocess.run(["squeue", "-h", "-u", user, "-n", name, "-t", "all", "-o", "%i"],
                          capture_output=True, text=True)
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def held_job(user: str, name: str) -> str:
    """A held job named `name` submitted by user itself (sbatch as that user)."""
    done = as_user(user, "sbatch", "--parsable", "--hold", "-J", name, "-o", "/dev/null",
                   "--wrap", "true")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip().split(";")[0]
    wait_for(lambda: job_id in slurm_jobs(user, name), 60, f"job {job_id} of {user} in squeue")
    return job_id
