"""Worker fixtures: run `funnel worker run` for real; moto S3, HTTP and FTP servers on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from funnel_hpc.core.events import EventFold, read_event_log
from tests import components
from tests.backend_helpers import FAKE_AWS_ENV
from tests.image_helpers import registry_answers
from tests.server_helpers import TEST_REGISTRY, clean_env, funnel_argv, worker_image_config
from tests.worker_helpers import need

# busybox-static unpacked by scripts/setup/40-worker.sh: what quickstart.sh seeds the
# image cache from (tasks no longer run over it: images come from the registry).
ROOTFS = Path("/var/lib/funnel/rootfs")


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


@pytest.fixture
def harness(tmp_path):
    need("bwrap")
    need_registry()
    return WorkerHarness(tmp_path)


def need_registry() -> None:
    components.need(f"the registry {TEST_REGISTRY}", registry_answers(TEST_REGISTRY),
                    "not running (scripts/setup/45-registry.sh starts it)")


@pytest.fixture
def moto_s3(moto_server):
    """The session's real moto server process on 127.0.0.1 (tests/conftest.py), emptied:
    its URL and the fake credentials a worker needs."""
    moto_server.reset()
    return moto_server.url, dict(FAKE_AWS_ENV)


@pytest.fixture(scope="session")
def http_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def ftp_root(tmp_path_factory):
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

    root = tmp_path_factory.mktemp("ftp")
    authorizer = DummyAuthorizer()
    authorizer.add_user("user", "secret", str(root), perm="elradfmwMT")
    handler = type("Handler", (FTPHandler,), {"authorizer": authorizer,
                                               "passive_ports": range(60000, 60100)})
    server = FTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.5}, daemon=True)
    thread.start()
    yield root, f"ftp://user:secret@127.0.0.1:{server.address[1]}"
    server.close_all()


@pytest.fixture(scope="module")
def limits_servers(databases, tmp_path_factory):
    """get(driver) -> (server, auth): a real server as root (auth on, local backend,
    reconciler) whose worker uses that container driver, made on first use; a real local
    user submits (tests/worker/test_limits.py). Tasks' files are removed when they end."""
    from werkzeug.security import generate_password_hash

    from tests.limits_helpers import make_user, remove_user
    from tests.server_helpers import ServerProcess

    owner = make_user("lim")
    servers: dict[str, ServerProcess] = {}

    def get(driver: str = "bwrap") -> tuple[ServerProcess, tuple[str, str]]:
        if driver not in servers:
            servers[driver] = ServerProcess(
                tmp_path_factory.mktemp(f"limits-{driver}"), databases.new("sqlite"),
                reconcile=True, overrides={
                    "auth": {"mode": "basic", "users": {owner: generate_password_hash("pw")}},
                    "reconciler": {"interval_seconds": 0.3},
                    "worker": {"container_driver": driver, "keep_workdir": "never",
                               "max_pids": 256, "disk_check_seconds": 1}}).start()
        return servers[driver], (owner, "pw")

    yield get
    for server in servers.values():
        server.stop()
    remove_user(owner)
