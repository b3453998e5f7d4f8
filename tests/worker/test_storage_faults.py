"""Retries: transient failures are tried again within storage.retry_seconds, permanent
ones fail at once (no retry storm), every message names the URL without credentials."""

from __future__ import annotations

import threading

import pytest

from funnel_hpc.core import config as config_mod
from funnel_hpc.worker.storage import Stopped, Storage, StorageError
from funnel_hpc.worker.storage.retry import with_retries
from tests.storage_helpers import CheckedMoto, ObjectServer, storage_config
from tests.worker_helpers import sh


class Attempts:
    """attempt() failing with the given errors first, then returning "done"."""

    def __init__(self, *errors: StorageError):
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def test_transient_errors_are_retried_until_success():
    attempts = Attempts(StorageError("u: reset", transient=True),
                        StorageError("u: 503", transient=True))
    assert with_retries("u", attempts, budget_seconds=30) == "done"
    assert attempts.calls == 3


def test_permanent_errors_fail_at_once():
    attempts = Attempts(StorageError("u: 403 Forbidden"))
    with pytest.raises(StorageError, match="403"):
        with_retries("u", attempts, budget_seconds=30)
    assert attempts.calls == 1


def test_the_budget_bounds_the_retries():
    now = [0.0]
    attempts = Attempts(*[StorageError("u: 503", transient=True)] * 1000)

    def clock() -> float:
        now[0] += 1.0  # each look at the clock: one second later
        return now[0]

    with pytest.raises(StorageError, match=r"still failing after \d+ attempts"):
        with_retries("u", attempts, budget_seconds=5, clock=clock)
    assert 1 < attempts.calls < 10


def test_a_cancel_ends_the_pause():
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        with_retries("u", Attempts(StorageError("u: 503", transient=True)), 600, stop)


@pytest.fixture
def objects():
    server = ObjectServer()
    yield server
    server.stop()


def test_a_connection_dropped_mid_transfer_twice_then_the_task_completes(harness, objects):
    body = bytes(range(256)) * 4096  # 1 MiB
    objects.objects["/flaky.bin"] = body
    objects.faults["/flaky.bin"] = ["drop", "drop"]
    run = harness.run(harness.task(
        inputs=[{"path": "/in/flaky.bin", "url": f"{objects.url}/flaky.bin"}],
        executors=[sh("wc -c < /in/flaky.bin")]))
    assert run.state == "COMPLETE", run.system_logs
    assert run.executor(0)["stdout"].strip() == str(len(body))
    assert run.host("/in/flaky.bin").read_bytes() == body
    assert [s for m, _p, s in objects.requests if m == "GET"] == [-1, -1, 200]


def test_503_beyond_the_retry_budget_is_system_error_naming_the_url(harness, objects):
    objects.always["/busy.txt"] = 503
    url = f"{objects.url}/busy.txt"
    config = storage_config(harness, {"retry_seconds": 2})
    run = harness.run(harness.task(inputs=[{"path": "/in/busy.txt", "url": url}],
                                   executors=[sh("true")]), config=config)
    assert run.state == "SYSTEM_ERROR"
    assert f"input /in/busy.txt from {url}: HTTP 503" in run.system_logs
    assert "still failing after" in run.system_logs and "storage.retry_seconds: 2" \
        in run.system_logs
    assert objects.count("GET", "/busy.txt") >= 2
    assert run.fold.task_log["logs"] == []


def test_a_wrong_http_credential_fails_at_once(harness):
    server = ObjectServer(required={"Authorization": "Bearer right"})
    try:
        server.objects["/x.txt"] = b"x"
        config = storage_config(harness, {"http": {"headers": {
            server.host: {"Authorization": "Bearer wrong"}}}})
        run = harness.run(harness.task(inputs=[{"path": "/in/x", "url": f"{server.url}/x.txt"}],
                                       executors=[sh("true")]), config=config)
        assert run.state == "SYSTEM_ERROR" and "HTTP 401" in run.system_logs
        assert "still failing" not in run.system_logs
        assert server.requests == [("GET", "/x.txt", 401)]  # one request, no retry storm
    finally:
        server.stop()


def test_a_wrong_s3_credential_fails_at_once(harness, tmp_path):
    moto = CheckedMoto(tmp_path, "alice")
    try:
        moto.client().create_bucket(Bucket="bkt")
        moto.client().put_object(Bucket="bkt", Key="in.txt", Body=b"x")
        before = moto.count("/bkt/in.txt")
        config = storage_config(harness, {"s3": {
            "endpoint_url": moto.url, "access_key_id": moto.key_id,
            "secret_access_key": "not-the-secret"}})
        run = harness.run(harness.task(inputs=[{"path": "/in/x", "url": "s3://bkt/in.txt"}],
                                       executors=[sh("true")]), config=config)
        assert run.state == "SYSTEM_ERROR", run.system_logs
        assert "input /in/x from s3://bkt/in.txt: 403" in run.system_logs
        assert "still failing" not in run.system_logs
        assert "not-the-secret" not in run.system_logs + run.stderr
        assert moto.count("/bkt/in.txt") - before == 1  # one request, no retry storm
    finally:
        moto.stop()


def storage_for(**options) -> Storage:
    return Storage(config_mod.load(environ={}, overrides={"storage": options}).for_worker())


def test_s3_5xx_and_a_cut_connection_are_retried(objects, tmp_path, monkeypatch):
    """boto3 against a plain object server (path-style s3 URLs are its paths)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    objects.objects["/bkt/k"] = b"from s3" * 1000
    objects.faults["/bkt/k"] = ["503", "drop", "500"]
    storage = storage_for(s3={"endpoint_url": objects.url}, retry_seconds=60)
    storage.get("s3://bkt/k", tmp_path / "k")
    assert (tmp_path / "k").read_bytes() == b"from s3" * 1000
    assert [status for _m, _p, status in objects.requests][-1] == 200
    assert len(objects.requests) == 4  # three failures, one success


def test_gs_5xx_429_and_a_cut_connection_are_retried_403_is_not(objects, tmp_path):
    path = "/download/storage/v1/b/bkt/o/k"  # the JSON API's media download
    objects.objects[path] = b"from gs" * 1000
    objects.faults[path] = ["503", "drop", "429"]
    # ranged_threshold_mb 0: no metadata request first (this server has only media)
    storage = storage_for(gs={"endpoint_url": objects.url, "anonymous": True,
                              "ranged_threshold_mb": 0}, retry_seconds=60)
    storage.get("gs://bkt/k", tmp_path / "k")
    assert (tmp_path / "k").read_bytes() == b"from gs" * 1000
    assert objects.count("GET", path) == 4
    objects.always[path] = 403
    with pytest.raises(StorageError, match="gs://bkt/k: HTTP 403"):
        storage.get("gs://bkt/k", tmp_path / "k2")
    assert objects.count("GET", path) == 5  # one more request: no retry
