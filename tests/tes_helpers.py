"""The tes backend's test set-up: a real remote funnel-hpc server (its own process, work dir,
SQLite database and auth, the local backend running busybox through bwrap from the test
registry) and a real forwarding gateway whose backend is `tes`, pointed at the remote with
a bearer token read from a file. Fixtures live in tests/test_tes_backend.py's conftest
use (tests/conftest.py); these are the pieces."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import requests
from werkzeug.security import generate_password_hash

from tests.e2e_helpers import TICK
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for, wait_for_state

REMOTE_USER, REMOTE_TOKEN = "forwarder", "remote-token-of-the-forwarder"
REMOTE_PASSWORD = "remote-password-of-the-forwarder"
USER, PASSWORD = "alice", "alice-pw"  # the forwarding gateway's user
AUTH = (USER, PASSWORD)
USER_TOKEN = "alice-token"  # the same user by bearer token (no password hash per call)


class Bearer(requests.auth.AuthBase):
    """requests auth sending a bearer token."""

    def __init__(self, token: str):
        self.token = token

    def __call__(self, request: Any) -> Any:
        request.headers["Authorization"] = f"Bearer {self.token}"
        return request


REMOTE_AUTH = Bearer(REMOTE_TOKEN)
USER_AUTH = Bearer(USER_TOKEN)


def remote_server(work: Path, db_url: str, port: int | None = None,
                  max_concurrent: int = 2, interval: float = TICK,
                  s3_url: str | None = None) -> ServerProcess:
    """The remote TES: auth on (the forwarder's account has a bearer token), the local
    backend, bwrap; s3_url: its workers' S3 endpoint (a moto server)."""
    overrides: dict[str, Any] = {
        "backend": {"name": "local", "local": {"max_concurrent": max_concurrent}},
        "reconciler": {"interval_seconds": interval},
        "worker": {"container_driver": "bwrap", "poll_server_seconds": 1},
        "auth": {"mode": "basic+bearer", "tokens": {REMOTE_TOKEN: REMOTE_USER},
                 "users": {REMOTE_USER: generate_password_hash(REMOTE_PASSWORD)}}}
    if s3_url:
        overrides["storage"] = {"s3": {"endpoint_url": s3_url, "access_key_id": "testing",
                                       "secret_access_key": "testing"}}
    extra: dict[str, Any] = {} if port is None else {"port": port}
    return ServerProcess(work, db_url, overrides=overrides, reconcile=True, **extra)


def token_file(directory: Path, token: str = REMOTE_TOKEN, mode: int = 0o600) -> Path:
    path = directory / "remote.token"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    os.chmod(path, mode)
    return path


def forwarder(work: Path, db_url: str, remote_url: str, token: Path, *,
              port: int | None = None, tes: dict | None = None,
              reconciler: dict | None = None) -> ServerProcess:
    """The forwarding gateway: auth on (alice), backend tes to remote_url."""
    overrides = {
        "backend": {"name": "tes", "tes": {"url": remote_url, "token_file": str(token),
                                           "timeout_seconds": 10, **(tes or {})}},
        "reconciler": {"interval_seconds": TICK, **(reconciler or {})},
        "auth": {"mode": "basic+bearer", "tokens": {USER_TOKEN: USER},
                 "users": {USER: generate_password_hash(PASSWORD)}}}
    extra: dict[str, Any] = {} if port is None else {"port": port}
    return ServerProcess(work, db_url, overrides=overrides, reconcile=True, **extra)


def submit(server: ServerProcess, task: dict, auth: Any = AUTH) -> str:
    resp = requests.post(server.api + "/tasks", json=task, auth=auth, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def get(server: ServerProcess, task_id: str, auth: Any = AUTH, view: str = "FULL") -> dict:
    resp = requests.get(f"{server.api}/tasks/{task_id}", params={"view": view}, auth=auth,
                        timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_state(server: ServerProcess, task_id: str, states: Any, auth: Any = AUTH,
               timeout: float = 120.0, also: ServerProcess | None = None) -> dict:
    """The task (FULL) once in one of states; the servers' logs on timeout."""
    def detail() -> str:
        text = server.log()[-3000:]
        if also is not None:
            text += "\n--- remote ---\n" + also.log()[-3000:]
        return text

    return wait_for_state(server.api, task_id, states, timeout, auth=auth, detail=detail)


def remote_id(task: dict) -> str:
    """The remote task id of a forwarded task (its job id)."""
    return task["logs"][-1]["metadata"]["job_id"]


def remote_tasks(remote: ServerProcess, **params: Any) -> list[dict]:
    """Every task of the forwarder's account on the remote (BASIC), newest first."""
    resp = requests.get(remote.api + "/tasks", params={"view": "BASIC", **params},
                        auth=REMOTE_AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["tasks"]


def wait_remote_state(remote: ServerProcess, task_id: str, states: Any,
                      timeout: float = 120.0) -> dict:
    return wait_for_state(remote.api, task_id, states, timeout, auth=REMOTE_AUTH,
                          detail=lambda: remote.log()[-3000:])


def wait_job(server: ServerProcess, task_id: str, timeout: float = 120.0) -> str:
    """The task's remote id, once the forwarder recorded it."""
    def recorded() -> str | None:
        logs = get(server, task_id).get("logs") or []
        return (logs[-1].get("metadata") or {}).get("job_id") if logs else None

    return wait_for(recorded, timeout, f"task {task_id} to be forwarded",
                    detail=lambda: server.log()[-3000:])


# ---- in-process: the backend itself, and a hostile remote ----

def tes_options(url: str, **values: Any) -> Any:
    """backend.tes as the configuration loads it, with these keys set."""
    from funnel_hpc.core import config as config_mod

    loaded = config_mod.load(environ={}, overrides={"backend": {
        "name": "tes", "tes": {"url": url, "timeout_seconds": 10, **values}}})
    return loaded.backend.tes


def request_for(work: Path, task_id: str, task: dict) -> Any:
    """The SubmitRequest the reconciler makes, with the task dir made as it does."""
    import json

    from funnel_hpc.backends import files
    from funnel_hpc.backends.base import SubmitRequest

    directory = work / task_id
    files.private_dir(directory)
    files.write_private(directory, "task.json", json.dumps({**task, "id": task_id}))
    return SubmitRequest(task_id=task_id, task={**task, "id": task_id, "state": "QUEUED"},
                         task_dir=directory, worker_argv=[])


class FakeTes:
    """A TES server in this process answering what the test sets: `answers` maps
    (method, path) to a function of the query (name -> list of values) giving (status,
    body bytes). Requests are recorded in `seen`. Only for answers no real server gives."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlsplit

        self.answers: dict[tuple[str, str], Any] = {}
        self.seen: list[tuple[str, str, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, method: str) -> None:
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                fake.seen.append((method, parts.path, query))
                answer = fake.answers.get((method, parts.path))
                status, body = answer(query) if answer else (404, b'{"message": "no"}')
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._answer("GET")

            def do_POST(self) -> None:
                self._answer("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def json(self, method: str, path: str, body: Any, status: int = 200) -> None:
        import json

        data = json.dumps(body).encode()
        self.answers[(method, "/ga4gh/tes/v1" + path)] = lambda _query: (status, data)

    def raw(self, method: str, path: str, data: bytes, status: int = 200) -> None:
        self.answers[(method, "/ga4gh/tes/v1" + path)] = lambda _query: (status, data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def s3_client(moto_url: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


class HoldingProxy:
    """An HTTP proxy in this process in front of a real remote: every call goes through,
    but the answer to the first task POST is held back (`posted` is set once the remote
    has made the task), as when a gateway dies between its POST and the answer."""

    def __init__(self, remote_url: str) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.posted = threading.Event()
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() in ("authorization", "content-type", "accept")}
                resp = requests.request(method, remote_url + self.path, data=body,
                                        headers=headers, timeout=60)
                if method == "POST" and self.path.rstrip("/").endswith("/tasks") \
                        and not proxy.posted.is_set():
                    proxy.posted.set()
                    proxy.release.wait(120)
                    return  # the answer never comes
                self.send_response(resp.status_code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            def do_GET(self) -> None:
                self._forward("GET")

            def do_POST(self) -> None:
                self._forward("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
