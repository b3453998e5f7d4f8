"""Helpers the tests share: a real `funnel server run` process, fresh databases, the
test registry's worker settings, ports and environments. Fixtures live in conftest.py."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from tests.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://funnel:funnel@127.0.0.1:5432/funnel")


# Image drivers (bwrap, proot) pull `busybox` from the local test registry (scripts/setup/
# 45-registry.sh) as the docker.io mirror, into one image cache per test session.
TEST_REGISTRY = "127.0.0.1:5055"
TEST_REGISTRY_CA = "/var/lib/funnel-test/registry/tls/cert.pem"
TEST_REGISTRIES = {"docker.io": {"mirrors": [TEST_REGISTRY]},
                   TEST_REGISTRY: {"ca_file": TEST_REGISTRY_CA}}
_IMAGE_CACHE: list[Path] = []  # set once per session by the test_image_cache fixture


def worker_image_config() -> dict:
    """The worker.* keys every test server and worker gets: registries and the cache."""
    cache = _IMAGE_CACHE[0] if _IMAGE_CACHE else Path("/tmp/funnel-test-image-cache")
    return {"registries": TEST_REGISTRIES, "image_cache": str(cache)}


def worker_image_env() -> dict[str, str]:
    """worker_image_config as FUNNEL_ variables, for workers configured by environment
    (AWS Batch job definitions)."""
    import json

    image = worker_image_config()
    return {"FUNNEL_WORKER__REGISTRIES": json.dumps(image["registries"]),
            "FUNNEL_WORKER__IMAGE_CACHE": image["image_cache"]}


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now and never handed out before by this process: the
    kernel gives a closed socket's port out again, and one server's HTTP and gRPC ports
    (two calls in a row) once came out the same."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def funnel_argv(*args: str) -> list[str]:
    """The `funnel` command of this checkout's Python."""
    return [sys.executable, "-m", "funnel_hpc.gateway.cli.main", *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNNEL_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(extra)
    return env


@dataclass
class ServerProcess:
    """A `funnel server run` subprocess with its own work dir and config."""

    work_dir: Path
    db_url: str
    overrides: dict = field(default_factory=dict)
    reconcile: bool = False
    port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    funnel: list[str] = field(default_factory=funnel_argv)  # the `funnel` command to run
    cwd: Path = REPO  # the checkout: tests name modules of tests/ in configs

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return self.url + "/ga4gh/tes/v1"

    @property
    def config_path(self) -> Path:
        return self.work_dir / "server.yaml"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "server.log"

    def write_config(self) -> None:
        config: dict[str, Any] = {
            "work_dir": str(self.work_dir), "database": {"url": self.db_url},
            "server": {"host": "127.0.0.1", "http_port": self.port,
                       "grpc_port": self.grpc_port, "threads": 16},
            "worker": worker_image_config()}
        for section, values in self.overrides.items():
            if isinstance(values, dict):
                config.setdefault(section, {}).update(values)
            else:
                config[section] = values
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self, timeout: float = 30) -> ServerProcess:
        self.write_config()
        args = ["server", "run", "--config", str(self.config_path)]
        if not self.reconcile:
            args.append("--no-reconciler")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([*self.funnel, *args], cwd=self.cwd, env=clean_env(),
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        proc = self.proc

        def answering() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n{self.log()}")
            try:
                return requests.get(self.api + "/service-info", timeout=1).status_code < 500
            except requests.RequestException:
                return False

        try:
            wait_for(answering, timeout, "the server to answer", interval=0.1)
        except AssertionError:
            self.stop()
            raise RuntimeError(f"server did not start in {timeout}s:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """kill -9, no clean-up: what a crash looks like."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def _postgres_reachable() -> bool:
    try:
        import psycopg
        with psycopg.connect(POSTGRES_ADMIN_URL.replace("+psycopg", ""), connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001 - any failure (no driver, refused, auth) means no postgres
        return False


class DatabaseFactory:
    """Fresh, empty databases: SQLite files, or new PostgreSQL databases."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.created: list[str] = []

    def new(self, kind: str) -> str:
        name = "funnel_t_" + secrets.token_hex(6)
        if kind == "sqlite":
            return f"sqlite:///{self.tmp / name}.db"
        import psycopg
        with psycopg.connect(POSTGRES_ADMIN_URL.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        self.created.append(name)
        return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + name

    def drop_all(self) -> None:
        if not self.created:
            return
        import psycopg
        with psycopg.connect(POSTGRES_ADMIN_URL.replace("+psycopg", ""), autocommit=True) as conn:
            for name in self.created:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
