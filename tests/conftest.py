"""Shared fixtures: real servers on SQLite and PostgreSQL, the session's image cache and
moto server, and the `needs` marker's hook. The helpers they use live in
tests/server_helpers.py and tests/components.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.components import NEEDS_MARKER, POSTGRES, POSTGRES_REASON, need
from tests.server_helpers import (
    _IMAGE_CACHE,
    DatabaseFactory,
    ServerProcess,
    _postgres_reachable,
)

# gRPC's fork support (on unless this says otherwise) restarts gRPC's threads in every
# child os.fork makes in a process that has used gRPC: after a gRPC test, the worker's
# stand-in (worker/standin.py) forked in this process could not make a user namespace
# (EINVAL). Read when gRPC first starts, so set before any test module runs.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", f"{NEEDS_MARKER}(component, reachable, reason): a real "
                            "component the test needs (tests/components.py: fails under CI, "
                            "skips elsewhere)")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    for mark in item.iter_markers(name=NEEDS_MARKER):
        need(*mark.args)


@pytest.fixture(scope="session", autouse=True)
def test_image_cache(tmp_path_factory) -> Path:
    """The session's shared image cache (see worker_image_config)."""
    if not _IMAGE_CACHE:
        _IMAGE_CACHE.append(tmp_path_factory.mktemp("image-cache"))
    return _IMAGE_CACHE[0]


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    return _postgres_reachable()


@pytest.fixture(scope="session")
def databases(tmp_path_factory):
    factory = DatabaseFactory(tmp_path_factory.mktemp("db"))
    yield factory
    factory.drop_all()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
                scope="module")
def db_kind(request) -> str:
    if request.param == "postgres":
        need(POSTGRES, _postgres_reachable(), POSTGRES_REASON)
    return request.param


@pytest.fixture(scope="module")
def api_server(db_kind, databases, tmp_path_factory):
    """A real server (no reconciler: tasks stay QUEUED) on SQLite and on PostgreSQL."""
    work = tmp_path_factory.mktemp(f"server-{db_kind}")
    server = ServerProcess(work, databases.new(db_kind), overrides={
        "backend": {"local": {"backend_parameters": {"queue": "--queue", "VmSize": "--vm"}}}})
    server.start()
    yield server
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def alice_server(databases, tmp_path_factory):
    """A real server with auth on (no reconciler): user alice, password "alice-pw", and
    the bearer token "alice-token" for her."""
    from werkzeug.security import generate_password_hash

    server = ServerProcess(tmp_path_factory.mktemp("alice"), databases.new("sqlite"),
                           overrides={"auth": {
                               "mode": "basic+bearer",
                               "users": {"alice": generate_password_hash("alice-pw")},
                               "tokens": {"alice-token": "alice"}}}).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_server():
    """One real `moto_server` process on 127.0.0.1 for the session (S3, Batch, IAM, EC2...),
    with fake AWS credentials in os.environ for boto3 clients and servers started here."""
    from tests.backend_helpers import FAKE_AWS_ENV, MotoServer, set_environ

    restore = set_environ(FAKE_AWS_ENV)
    try:
        server = MotoServer.start()
    except RuntimeError as exc:
        restore()
        pytest.fail(str(exc))
    yield server
    server.stop()
    restore()
