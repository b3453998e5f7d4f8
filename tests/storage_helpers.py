"""Real stores on 127.0.0.1 for the storage tests: an HTTP object server with auth and
scripted faults, the GCS emulator, moto servers that check credentials, a swap loop."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import boto3
import requests

from tests.server_helpers import free_port

BIN = Path(sys.executable).parent
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def wait_for(condition, timeout: float = 30, what: str = "condition") -> None:
    """Poll condition() until true; fail after timeout (generous: a busy 2-core machine)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=1)
        return True
    except requests.RequestException:
        return False


class ObjectServer:
    """GET/HEAD/PUT/POST of whole objects by path, kept in memory.

    required: headers every request must carry (else 401). faults[path]: a queue of
    "drop" (send half the body, then close) or an HTTP status, used one per request.
    always[path]: a status answered to every request. requests: (method, path, status)."""

    def __init__(self, required: dict[str, str] | None = None):
        self.objects: dict[str, bytes] = {}
        self.required = required or {}
        self.faults: dict[str, list[str]] = {}
        self.always: dict[str, int] = {}
        self.requests: list[tuple[str, str, int]] = []
        self.seen_headers: list[dict[str, str]] = []
        self.replies: dict[str, bytes] = {}  # POST path -> canned 200 body
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.gather = 0  # >1: transfers wait (up to 60 s) until this many were in flight at once
        self.in_flight = 0
        self.max_in_flight = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.host}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def count(self, method: str, path: str) -> int:
        with self.lock:
            return sum(1 for m, p, _s in self.requests if m == method and p == path)

    def _decide(self, method: str, path: str, headers: dict[str, str]) -> str | int:
        with self.lock:
            self.seen_headers.append(headers)
            if any(headers.get(k) != v for k, v in self.required.items()):
                return 401
            if path in self.always:
                return self.always[path]
            queue = self.faults.get(path)
            if queue:
                fault = queue.pop(0)
                return int(fault) if fault.isdigit() else fault
            return 0

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _answer(self, status: int, body: bytes = b"") -> None:
                with store.lock:
                    store.requests.append((self.command, self.path_only, status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            @property
            def path_only(self) -> str:
                return urlparse(self.path).path

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while (size := int(self.rfile.readline().strip() or b"0", 16)):
                        data += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _get(self) -> None:
                decision = store._decide(self.command, self.path_only, dict(self.headers))
                body = store.objects.get(self.path_only)
                if decision == "drop" and body is not None:
                    with store.lock:
                        store.requests.append((self.command, self.path_only, -1))
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if isinstance(decision, int) and decision:
                    return self._answer(decision, b"scripted failure")
                if body is None:
                    return self._answer(404, b"no such object")
                self._answer(200, body)

            def _put(self) -> None:
                data = self._body()
                decision = store._decide(self.command, self.path_only, dict(self.headers))
                if isinstance(decision, int) and decision:
                    return self._answer(decision, b"scripted failure")
                store.objects[self.path_only] = data
                self._answer(201)

            def _gathered(self, serve) -> None:
                with store.changed:
                    store.in_flight += 1
                    store.max_in_flight = max(store.max_in_flight, store.in_flight)
                    store.changed.notify_all()
                    store.changed.wait_for(lambda: store.max_in_flight >= store.gather, 60)
                try:
                    serve()
                finally:
                    with store.changed:
                        store.in_flight -= 1

            def do_GET(self) -> None:
                self._gathered(self._get)

            def do_PUT(self) -> None:
                self._gathered(self._put)

            def do_POST(self) -> None:
                if self.path_only in store.replies:
                    self._body()
                    return self._answer(200, store.replies[self.path_only])
                self._gathered(self._put)

            do_HEAD = _get

        return Handler


class GcsEmulator:
    """`gcp-storage-emulator start` on a free port, in memory."""

    def __init__(self):
        exe = shutil.which("gcp-storage-emulator") or str(BIN / "gcp-storage-emulator")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([exe, "start", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--in-memory", "-q"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: _answers(self.url + "/storage/v1/b?project=test"), 30,
                 "the GCS emulator")

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage  # type: ignore[import-untyped]

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.url})

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class CheckedMoto:
    """A moto_server that checks credentials: one IAM user with full rights, whose key is
    the only one accepted once setup is done. Requests are counted from its access log."""

    SETUP_ACTIONS = 3  # create_user, put_user_policy, create_access_key

    def __init__(self, tmp: Path, name: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"moto-{name}.log"
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(self.SETUP_ACTIONS),
               "AWS_ACCESS_KEY_ID": "setup", "AWS_SECRET_ACCESS_KEY": "setup"}
        exe = shutil.which("moto_server") or str(BIN / "moto_server")
        with self.log.open("w") as log:
            self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                         env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: _answers(self.url + "/moto-api/"), 30, f"moto server {name}")
        iam = boto3.client("iam", endpoint_url=self.url, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def client(self):
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret)

    def count(self, fragment: str) -> int:
        """Requests whose access-log line contains fragment (e.g. "GET /bucket/key")."""
        return sum(1 for line in self.log.read_text().splitlines() if fragment in line)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def exchange(a: Path, b: Path) -> None:
    """renameat2(RENAME_EXCHANGE): swap two names atomically."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class SwapLoop:
    """Swaps a directory and a symlink to elsewhere, as fast as it can, until stopped."""

    def __init__(self, directory: Path, symlink: Path):
        self.directory, self.symlink = directory, symlink
        self.swaps = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.is_set():
            exchange(self.directory, self.symlink)
            self.swaps += 1

    def __enter__(self) -> SwapLoop:
        self.thread.start()
        wait_for(lambda: self.swaps > 100, 10, "the swap loop")
        return self

    def __exit__(self, *_exc) -> None:
        self.done.set()
        self.thread.join()
        if self.directory.is_symlink():  # leave the directory where it was
            exchange(self.directory, self.symlink)


def storage_config(harness, storage: dict, **worker) -> Path:
    """harness.config(**worker) with a `storage:` section added."""
    import yaml

    path = harness.config(**worker)
    settings = yaml.safe_load(path.read_text())
    settings["storage"] = storage
    path.write_text(yaml.safe_dump(settings))
    return path
