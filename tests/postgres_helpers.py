"""A private PostgreSQL server a test may stop and start without touching the shared one.

``PrivatePostgres.create()`` runs initdb (as the ``postgres`` account: PostgreSQL refuses
root) into a fresh directory under /tmp and starts it on a free port with trust
authentication on 127.0.0.1 only. Cost: about 2 s for initdb, under 1 s per start.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.server_helpers import free_port


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise FileNotFoundError(f"PostgreSQL's {name} is not installed")
    return found[-1]


def available() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb")) and shutil.which("runuser") \
        is not None


@dataclass
class PrivatePostgres:
    """One initdb'd cluster; url reaches its `postgres` database."""

    directory: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    @classmethod
    def create(cls) -> PrivatePostgres:
        directory = Path(tempfile.mkdtemp(prefix="funnel-pg-"))
        shutil.chown(directory, "postgres", "postgres")
        os.chmod(directory, 0o700)
        server = cls(directory, free_port())
        server._as_postgres(_bin("initdb"), "-D", str(directory / "data"), "-A", "trust",
                            "-U", "postgres", "--no-sync")
        return server.start()

    def _as_postgres(self, *argv: str) -> None:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *argv],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr[-500:]}")

    def start(self) -> PrivatePostgres:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -F"
        self._as_postgres(_bin("pg_ctl"), "-D", str(self.directory / "data"), "-w",
                          "-l", str(self.directory / "log"), "-o", options, "start")
        return self

    def stop(self) -> None:
        self._as_postgres(_bin("pg_ctl"), "-D", str(self.directory / "data"), "-w",
                          "-m", "immediate", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except RuntimeError:
            pass  # already stopped
        shutil.rmtree(self.directory, ignore_errors=True)
