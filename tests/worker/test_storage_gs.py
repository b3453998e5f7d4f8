"""gs:// against gcp-storage-emulator on 127.0.0.1: files, prefixes as directories,
wildcard outputs, anonymous and service-account credentials, permanent errors."""

from __future__ import annotations

import json
import os

import pytest

from tests.storage_helpers import GcsEmulator, ObjectServer, storage_config
from tests.worker_helpers import sh, worker_config


def gs_options(emulator: GcsEmulator, **extra) -> dict:
    return {"gs": {"endpoint_url": emulator.url, "anonymous": True, **extra}}


def test_files_prefixes_and_wildcard_outputs(harness, emulator):
    client = emulator.client()
    bucket = client.create_bucket("tes-gs")
    bucket.blob("in/a.txt").upload_from_string(b"from gs")
    bucket.blob("ref/x/1.txt").upload_from_string(b"1")
    bucket.blob("ref/x/sub/2.txt").upload_from_string(b"22")
    config = storage_config(harness, gs_options(emulator))
    run = harness.run(harness.task(
        inputs=[{"path": "/in/a.txt", "url": "gs://tes-gs/in/a.txt"},
                {"path": "/in/ref", "url": "gs://tes-gs/ref/x", "type": "DIRECTORY"}],
        outputs=[{"path": "/out/r.txt", "url": "gs://tes-gs/out/r.txt"},
                 {"path": "/out/d", "url": "gs://tes-gs/out/d", "type": "DIRECTORY"},
                 {"path": "/out/w/*.log", "path_prefix": "/out/w/", "url": "gs://tes-gs/logs"}],
        executors=[sh("mkdir -p /out/d/deep /out/w && "
                      "cat /in/a.txt /in/ref/1.txt /in/ref/sub/2.txt > /out/r.txt && "
                      "echo z > /out/d/deep/z.txt && echo l > /out/w/l.log && "
                      "echo no > /out/w/n.txt")]), config=config)
    assert run.state == "COMPLETE", run.system_logs
    assert bucket.blob("out/r.txt").download_as_bytes() == b"from gs122"
    assert bucket.blob("out/d/deep/z.txt").download_as_bytes() == b"z\n"
    assert bucket.blob("logs/l.log").download_as_bytes() == b"l\n"
    assert sorted(b.name for b in client.list_blobs("tes-gs", prefix="logs/")) == ["logs/l.log"]
    logged = {o["path"]: o["url"] for o in run.fold.task_log["outputs"]}
    assert logged["/out/w/l.log"] == "gs://tes-gs/logs/l.log"


def test_a_missing_object_fails_at_once_naming_the_url(harness, emulator):
    emulator.client().create_bucket("tes-gs-empty")
    config = storage_config(harness, {"retry_seconds": 120, **gs_options(emulator)})
    run = harness.run(harness.task(inputs=[{"path": "/in/x", "url": "gs://tes-gs-empty/nope"}],
                                   executors=[sh("true")]), config=config)
    assert run.state == "SYSTEM_ERROR"
    assert "input /in/x from gs://tes-gs-empty/nope: HTTP 404" in run.system_logs
    assert "still failing" not in run.system_logs


def test_a_service_account_file_is_used(harness, emulator, tmp_path):
    """The key file's token_uri points at a local server: the worker signs a JWT with the
    key and trades it for a token there before talking to the store."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    tokens = ObjectServer()
    try:
        tokens.replies["/token"] = json.dumps({"access_token": "ya29.test",
                                               "expires_in": 3600}).encode()
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        key_file = tmp_path / "sa.json"
        key_file.write_text(json.dumps({
            "type": "service_account", "project_id": "test", "private_key_id": "k1",
            "private_key": pem, "client_email": "worker@test.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": f"{tokens.url}/token"}))
        emulator.client().create_bucket("tes-gs-sa").blob("in.txt").upload_from_string(b"sa")
        config = storage_config(harness, {"gs": {"endpoint_url": emulator.url,
                                                 "credentials_file": str(key_file)}})
        run = harness.run(harness.task(inputs=[{"path": "/in/x", "url": "gs://tes-gs-sa/in.txt"}],
                                       executors=[sh("cat /in/x")]), config=config)
        assert run.state == "COMPLETE", run.system_logs
        assert run.executor(0)["stdout"] == "sa"
        assert tokens.requests and set(tokens.requests) == {("POST", "/token", 200)}
    finally:
        tokens.stop()


RANGED = {"ranged_threshold_mb": 0.01, "ranged_chunk_mb": 0.004}  # 10 kB and up: 4 kB ranges


def test_a_large_object_comes_down_in_ranges_byte_identical(harness, emulator):
    data = os.urandom(50_000)  # 13 ranges, the last one short
    emulator.client().create_bucket("tes-gs-ranged").blob("big.bin").upload_from_string(data)
    config = storage_config(harness, {"max_parallel_transfers": 4,
                                      **gs_options(emulator, **RANGED)})
    out = harness.data / "copy.bin"
    run = harness.run(harness.task(
        inputs=[{"path": "/in/big.bin", "url": "gs://tes-gs-ranged/big.bin"}],
        outputs=[{"path": "/in/big.bin", "url": f"file://{out}"}],
        executors=[sh("true")]), config=config)
    assert run.state == "COMPLETE", run.system_logs
    assert out.read_bytes() == data


def test_ranges_are_written_at_their_offsets_and_checked(emulator, tmp_path, monkeypatch):
    from funnel_hpc.worker.storage import Storage, gs_ranged

    data = os.urandom(20_000)
    blob = emulator.client().create_bucket("tes-gs-spy").blob("x.bin")
    blob.upload_from_string(data)
    starts: list[int] = []

    class Recording(gs_ranged._At):
        def __init__(self, fd, offset, *rest):
            starts.append(offset)
            super().__init__(fd, offset, *rest)

    monkeypatch.setattr(gs_ranged, "_At", Recording)
    store = Storage(worker_config(storage={"allowed_schemes": ["gs"], "retry_seconds": 5,
                                           "max_parallel_transfers": 3,
                                           **gs_options(emulator, **RANGED)}))
    store.get("gs://tes-gs-spy/x.bin", tmp_path / "x.bin")
    assert (tmp_path / "x.bin").read_bytes() == data
    assert sorted(starts) == list(range(0, 20_000, int(0.004 * (1 << 20))))  # 4194 bytes
    # below the threshold: one plain download, no ranges
    blob.bucket.blob("small.bin").upload_from_string(b"small")
    starts.clear()
    store.get("gs://tes-gs-spy/small.bin", tmp_path / "small.bin")
    assert (tmp_path / "small.bin").read_bytes() == b"small" and starts == []


def test_a_download_that_does_not_match_the_objects_hash_is_removed(tmp_path):
    import base64

    from funnel_hpc.worker.storage import StorageError
    from funnel_hpc.worker.storage.gs_ranged import _check

    dest = tmp_path / "x"
    dest.write_bytes(b"abc")
    wrong = base64.b64encode(b"\0\0\0\0").decode()
    with pytest.raises(StorageError, match="do not match the object: CRC32C") as caught:
        _check("gs://b/x", dest, 3, {"crc32c": wrong, "md5": None})
    assert caught.value.transient and not dest.exists()
    dest.write_bytes(b"ab")
    with pytest.raises(StorageError, match="2 bytes, not 3"):
        _check("gs://b/x", dest, 3, {"crc32c": None, "md5": None})
