"""Fixtures for the HPC backend tests: the real Slurm, an sshd, the PBS double (options,
requests and the fake runner: tests/backend_helpers.py)."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.components import SLURM, need
from tests.pbs_helpers import FakePbs
from tests.server_helpers import free_port
from tests.waiting import wait_for


@pytest.fixture(scope="session")
def slurm() -> None:
    """The real single-node Slurm of scripts/setup/30-slurm.sh.

    Skipped only where Slurm is not installed at all; installed but not
    answering is a failure (CI runs the set-up script first).
    """
    if not shutil.which("sinfo"):
        need(SLURM, False, "not installed (scripts/setup/30-slurm.sh)")
    for _ in range(30):  # another test may be restarting slurmctld
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip() in ("idle", "mixed", "allocated"):
            return
        time.sleep(1)
    pytest.fail(f"Slurm is installed but not healthy (sinfo: {done.stdout.strip()}"
                f"{done.stderr.strip()}); run scripts/setup/30-slurm.sh")


@pytest.fixture(scope="session")
def slurmrestd(slurm) -> str:
    """The shared slurmrestd of scripts/setup/35-slurmrestd.sh: its socket path. Skipped
    only where slurmrestd is not installed; installed but not answering is a failure."""
    from tests import slurm_rest_helpers as rest

    if not rest.installed():
        need(rest.SLURMRESTD, False, "not installed (scripts/setup/35-slurmrestd.sh)")
    try:
        wait_for(rest.answers, 60, f"slurmrestd on {rest.SOCKET}", interval=1)
    except AssertionError:
        pytest.fail(f"slurmrestd {rest.SLURMRESTD_REASON}")
    return rest.SOCKET


@pytest.fixture(params=["cli", "rest"])
def slurm_mode(request, slurm) -> str:
    """backend.slurm.mode for a real-Slurm test run in both modes (rest: with the shared
    slurmrestd, which must answer)."""
    if request.param == "rest":
        request.getfixturevalue("slurmrestd")
    return str(request.param)


@pytest.fixture
def sshd(tmp_path) -> Iterator[dict]:
    """A private sshd on 127.0.0.1 that accepts one generated key for this user."""
    sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd_bin).exists():
        need("sshd", False, "openssh-server not installed (scripts/setup/30-slurm.sh)")
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)],
                       check=True)
    (keys / "authorized_keys").write_text((keys / "client.pub").read_text())
    os.chmod(keys / "authorized_keys", 0o600)
    port = free_port()
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-p", str(port), "-h", str(keys / "host"),
                             "-o", "ListenAddress=127.0.0.1",
                             "-o", f"AuthorizedKeysFile={keys / 'authorized_keys'}",
                             "-o", "PasswordAuthentication=no", "-o", "PermitRootLogin=yes",
                             "-o", "StrictModes=no", "-o", f"PidFile={keys / 'sshd.pid'}",
                             "-o", "UsePAM=no"],
                            stderr=subprocess.DEVNULL)
    host_key = (keys / "host.pub").read_text().split()
    (keys / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(listening, 10, f"sshd to listen on 127.0.0.1:{port}", interval=0.1)
        yield {"host": "127.0.0.1", "port": port, "user": getpass.getuser(),
               "key_file": str(keys / "client"), "known_hosts": str(keys / "known_hosts")}
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.fixture
def fake_pbs(tmp_path, monkeypatch) -> FakePbs:
    """The PBS commands' double (tests/pbs_helpers.py), first on PATH: a PBS backend made
    after this runs them as real processes."""
    fake = FakePbs(tmp_path / "pbs")
    monkeypatch.setenv("PATH", f"{fake.bin}{os.pathsep}{os.environ['PATH']}")
    return fake
