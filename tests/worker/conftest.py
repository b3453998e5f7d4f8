"""Worker fixtures: a WorkerHarness (tests/worker_helpers.py) running `funnel worker run` for
real; moto S3, HTTP and FTP servers on 127.0.0.1."""

from __future__ import annotations

import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.backend_helpers import FAKE_AWS_ENV
from tests.storage_helpers import GcsEmulator
from tests.worker_helpers import WorkerHarness, need, need_registry


@pytest.fixture
def harness(tmp_path):
    need("bwrap")
    need_registry()
    return WorkerHarness(tmp_path)


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


LIMITS_FIRST_UID = 1_600_000_000  # a range no account and no other test uses


@pytest.fixture(scope="module")
def limits_servers(databases, tmp_path_factory):
    """get(driver) -> (server, auth): a real server as root (auth on, local backend,
    reconciler) whose worker uses that container driver, made on first use; a real local
    user submits (tests/worker/test_limits.py). Tasks' files are removed when they end."""
    from werkzeug.security import generate_password_hash

    from tests.owner_helpers import drop_user, make_user
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
                               "max_pids": 256, "disk_check_seconds": 1,
                               # one uid per task, as a shared node has it (proot is refused
                               # for owned tasks while executors share one user)
                               "sandbox_uids": {
                                   "first": LIMITS_FIRST_UID, "count": 4,
                                   "lock_dir": str(tmp_path_factory.mktemp("uid-locks"))}}}
            ).start()
        return servers[driver], (owner, "pw")

    yield get
    for server in servers.values():
        server.stop()
    drop_user(owner)


@pytest.fixture(scope="module")
def emulator():
    """gcp-storage-emulator on 127.0.0.1, one per test module."""
    pytest.importorskip("google.cloud.storage")
    server = GcsEmulator()
    yield server
    server.stop()
