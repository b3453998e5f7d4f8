"""A real `funnel worker run` as an ordinary local user (not root), for the tests of a
non-root worker's subordinate id range (worker/subids.py): the user, its /etc/subuid
range, this checkout's install as every user can run it, and a work dir of its own."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from funnel_hpc.core.events import read_event_log
from tests.owner_helpers import drop_user, make_user, open_dir, readable_install
from tests.server_helpers import TEST_REGISTRIES
from tests.worker_helpers import WorkerRun

DEBIAN = "127.0.0.1:5055/funnel/snakemake:1"  # Debian 12 with GNU tar (46-workflow-image.sh)
TESTIMAGE = "127.0.0.1:5055/funnel/testimage:1"  # busybox-like (45-registry.sh)


def subordinate_first(path: str, name: str) -> int | None:
    for line in Path(path).read_text().splitlines():
        fields = line.split(":")
        if len(fields) == 3 and fields[0] == name and int(fields[2]) >= 65535:
            return int(fields[1])
    return None


@dataclass
class Account:
    name: str
    uid: int
    gid: int
    first_uid: int | None  # its /etc/subuid range (None: none)
    first_gid: int | None

    @classmethod
    def make(cls, prefix: str) -> Account:
        """A new local user; useradd gives it a range of 65536 in /etc/subuid and
        /etc/subgid (scripts/setup/40-worker.sh makes sure the files exist)."""
        name = make_user(prefix)
        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, entry.pw_gid, subordinate_first("/etc/subuid", name),
                   subordinate_first("/etc/subgid", name))

    def drop(self) -> None:
        drop_user(self.name)

    def without_range(self) -> None:
        """Its /etc/subuid and /etc/subgid lines removed (usermod, as an admin would)."""
        for kind in ("uids", "gids"):
            first = self.first_uid if kind == "uids" else self.first_gid
            if first is not None:
                subprocess.run(["usermod", f"--del-sub{kind}", f"{first}-{first + 65535}",
                                self.name], check=True, capture_output=True)
        self.first_uid = self.first_gid = None


class UserWorker:
    """`funnel worker run` as `account`, through runuser, with this checkout's code."""

    def __init__(self, account: Account, base: Path):
        self.account = account
        self.base = base  # 755, the user's own: work dir, config, task files, outputs
        self.python = readable_install(base / "install")
        self.workdir = base / "work"
        self.outputs = base / "outputs"
        for path in (self.workdir, self.outputs, base / "cache"):
            path.mkdir(mode=0o755)
            shutil.chown(path, account.name, account.name)
        self.count = 0

    @classmethod
    def make(cls, account: Account) -> UserWorker:
        base = open_dir("subids-")
        return cls(account, base)

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def config(self, **worker: object) -> Path:
        settings = {"worker": {"registries": TEST_REGISTRIES, "image_cache": str(
            self.base / "cache"), "container_driver": "bwrap", "keep_workdir": "never",
            "allowed_dirs": [str(self.outputs)], **worker}}
        self.count += 1
        path = self.base / f"config-{self.count}.yaml"
        path.write_text(yaml.safe_dump(settings))
        path.chmod(0o644)
        return path

    def start(self, task: dict, config: Path) -> subprocess.Popen:
        task_file = self.base / f"{task['id']}.json"
        task_file.write_text(json.dumps(task))
        task_file.chmod(0o644)
        argv = ["/usr/sbin/runuser", "-u", self.account.name, "--", str(self.python), "-m",
                "funnel_hpc.gateway.cli.main", "worker", "run", "--task-file", str(task_file),
                "--workdir", str(self.workdir), "--config", str(config)]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
               "HOME": pwd.getpwnam(self.account.name).pw_dir}
        return subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def run(self, task: dict, config: Path, timeout: float = 600) -> WorkerRun:
        proc = self.start(task, config)
        _out, err = proc.communicate(timeout=timeout)
        task_dir = self.workdir / task["id"]
        return WorkerRun(proc.returncode, read_event_log(task_dir / "events.jsonl"), task_dir,
                         err)

    def task(self, **fields: object) -> dict:
        self.count += 1
        return {"id": f"sub{self.count}{os.urandom(3).hex()}", **fields}
