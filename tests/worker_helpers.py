"""Shared pieces of the worker tests (tests/worker/): `funnel worker run` for real
(WorkerHarness), a shell executor on the test image, finding processes by their exact
argv, and the components they need."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from funnel_hpc.core import config as config_mod
from funnel_hpc.core.events import EventFold, read_event_log
from tests.components import need as need_component
from tests.image_helpers import registry_answers
from tests.server_helpers import TEST_REGISTRY, clean_env, funnel_argv, worker_image_config

# busybox-static unpacked by scripts/setup/40-worker.sh: what quickstart.sh seeds the
# image cache from (tasks no longer run over it: images come from the registry).
ROOTFS = Path("/var/lib/funnel/rootfs")



BUSYBOX = "busybox"


def worker_config(**sections: dict) -> config_mod.WorkerConfig:
    """What a worker reads: conf/default.yaml with these sections' keys merged over it."""
    return config_mod.load(environ={}, overrides=sections).for_worker()


def worker_section(**values: object) -> config_mod.WorkerSection:
    """The worker section of conf/default.yaml with some keys replaced (a mapping given
    for a sub-section, e.g. sandbox_uids, replaces only the keys it names)."""
    section = config_mod.replace(config_mod.load(environ={}).worker, "worker", **values)
    assert isinstance(section, config_mod.WorkerSection)
    return section


def need(tool: str) -> None:
    """The command tool on PATH (tests/components.py's rule: fail under CI, else skip)."""
    need_component(tool, shutil.which(tool) is not None,
                   "not installed (scripts/setup/40-worker.sh)")


def sh(script: str, **fields) -> dict:
    return {"image": BUSYBOX, "command": ["sh", "-c", script], **fields}


def processes_with_argv(argv: list[str]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            if raw.split(b"\0")[:-1] == [a.encode() for a in argv]:
                found.append(int(entry))
    return found


def need_registry() -> None:
    need_component(f"the registry {TEST_REGISTRY}", registry_answers(TEST_REGISTRY),
                   "not running (scripts/setup/45-registry.sh starts it)")


@dataclass
class WorkerRun:
    exit_code: int
    fold: EventFold
    task_dir: Path
    stderr: str

    @property
    def state(self) -> str | None:
        return self.fold.state

    @property
    def system_logs(self) -> str:
        return "\n".join(self.fold.task_log["system_logs"])

    def executor(self, index: int) -> dict:
        return self.fold.task_log["logs"][index]

    def host(self, container_path: str) -> Path:
        return self.task_dir / "files" / container_path.lstrip("/")


class WorkerHarness:
    def __init__(self, tmp: Path, env: dict[str, str] | None = None):
        self.tmp = tmp
        self.workdir = tmp / "work"
        self.data = tmp / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.env = env or {}
        self.count = 0

    def config(self, **worker: object) -> Path:
        # keep_workdir always: tests look at what a task left in its directory
        settings = {"worker": {"allowed_dirs": [str(self.data)], **worker_image_config(),
                               "container_driver": "bwrap", "keep_workdir": "always",
                               **worker}}
        path = self.tmp / f"config-{self.count}.yaml"
        path.write_text(yaml.safe_dump(settings))
        return path

    def task(self, **fields) -> dict:
        self.count += 1
        return {"id": f"task{self.count}", **fields}

    def start(self, task: dict, config: Path | None = None, extra_env=None) -> subprocess.Popen:
        task_file = self.tmp / f"{task['id']}.json"
        task_file.write_text(json.dumps(task))
        argv = funnel_argv("worker", "run", "--task-file", str(task_file),
                           "--workdir", str(self.workdir), "--config", str(config or self.config()))
        return subprocess.Popen(argv, env=clean_env(**self.env, **(extra_env or {})),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run(self, task: dict, config: Path | None = None, timeout: float = 120,
            extra_env=None) -> WorkerRun:
        proc = self.start(task, config, extra_env)
        _out, err = proc.communicate(timeout=timeout)
        task_dir = self.workdir / task["id"]
        return WorkerRun(proc.returncode, read_event_log(task_dir / "events.jsonl"), task_dir, err)
