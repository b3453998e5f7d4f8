"""s3:// against two moto servers that check credentials: endpoints chosen by bucket and
by URL host, each with its own keys; server-side encryption; multipart; directory trees."""

from __future__ import annotations

import os

import boto3
import pytest

from tests.storage_helpers import CheckedMoto, storage_config
from tests.worker_helpers import sh


@pytest.fixture(scope="module")
def two_motos(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("motos")
    alpha, beta = CheckedMoto(tmp, "alpha"), CheckedMoto(tmp, "beta")
    yield alpha, beta
    alpha.stop()
    beta.stop()


def endpoints(alpha: CheckedMoto, beta: CheckedMoto, **default) -> dict:
    """alpha is the default endpoint; beta serves buckets beta-* and s3://<beta host>/..."""
    beta_options = {"endpoint_url": beta.url, "access_key_id": beta.key_id,
                    "secret_access_key": beta.secret}
    return {"s3": {"endpoint_url": alpha.url, "access_key_id": alpha.key_id,
                   "secret_access_key": alpha.secret, **default,
                   "endpoints": {
                       "beta": {**beta_options, "buckets": ["beta-*"], "sse": "AES256"},
                       "beta-by-host": {**beta_options, "host": beta.url.split("//")[1],
                                        "sse": "aws:kms", "sse_kms_key_id": "key-1"}}}}


def test_endpoints_by_bucket_and_host_each_with_its_own_credentials(harness, two_motos):
    alpha, beta = two_motos
    a, b = alpha.client(), beta.client()
    a.create_bucket(Bucket="alpha-data")
    b.create_bucket(Bucket="beta-data")
    b.create_bucket(Bucket="gamma")
    a.put_object(Bucket="alpha-data", Key="in.txt", Body=b"A")
    b.put_object(Bucket="beta-data", Key="in.txt", Body=b"B")
    b.put_object(Bucket="gamma", Key="in.txt", Body=b"G")
    host = beta.url.split("//")[1]
    config = storage_config(harness, endpoints(alpha, beta))
    run = harness.run(harness.task(
        inputs=[{"path": "/in/a", "url": "s3://alpha-data/in.txt"},
                {"path": "/in/b", "url": "s3://beta-data/in.txt"},
                {"path": "/in/g", "url": f"s3://{host}/gamma/in.txt"}],
        outputs=[{"path": "/out/all", "url": "s3://alpha-data/out/all"},
                 {"path": "/out/all", "url": "s3://beta-data/out/all"},
                 {"path": "/out/all", "url": f"s3://{host}/gamma/out/all"}],
        executors=[sh("cat /in/a /in/b /in/g > /out/all")]), config=config)
    assert run.state == "COMPLETE", run.system_logs
    assert a.get_object(Bucket="alpha-data", Key="out/all")["Body"].read() == b"ABG"
    beta_copy = b.get_object(Bucket="beta-data", Key="out/all")
    assert beta_copy["Body"].read() == b"ABG"
    assert beta_copy["ServerSideEncryption"] == "AES256"  # SSE-S3, beta's option
    by_host = b.head_object(Bucket="gamma", Key="out/all")
    assert by_host["ServerSideEncryption"] == "aws:kms"
    assert by_host["SSEKMSKeyId"].endswith("key-1")
    assert "ServerSideEncryption" not in a.head_object(Bucket="alpha-data", Key="out/all")


def test_a_small_object_takes_one_request_each_way(harness, two_motos):
    """Below the multipart threshold: one GetObject (no HEAD first) and one PutObject, not
    boto3's transfer manager (a HEAD per download, threads per call)."""
    alpha, beta = two_motos
    a = alpha.client()
    a.create_bucket(Bucket="one-request")
    a.put_object(Bucket="one-request", Key="in.txt", Body=b"small")
    config = storage_config(harness, endpoints(alpha, beta))
    run = harness.run(harness.task(
        inputs=[{"path": "/in/x", "url": "s3://one-request/in.txt"}],
        outputs=[{"path": "/out/y", "url": "s3://one-request/out.txt"}],
        executors=[sh("cat /in/x /in/x > /out/y")]), config=config)
    assert run.state == "COMPLETE", run.system_logs
    assert a.get_object(Bucket="one-request", Key="out.txt")["Body"].read() == b"smallsmall"
    assert alpha.count("HEAD /one-request/") == 0
    assert alpha.count("GET /one-request/in.txt") == 1
    assert alpha.count("PUT /one-request/out.txt") == 1


def test_large_objects_move_in_parts_and_trees_in_parallel(harness, moto_s3):
    # the session's moto without credential checks: a checking moto_server refuses
    # ListObjectsV2 with a "/" in Prefix (SignatureDoesNotMatch: moto's signing, not ours)
    endpoint, env = moto_s3
    harness.env.update(env)
    a = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    a.create_bucket(Bucket="big-one")
    big = os.urandom(12 << 20)
    a.put_object(Bucket="big-one", Key="in/big.bin", Body=big)
    for index in range(30):
        a.put_object(Bucket="big-one", Key=f"tree/{index // 10}/{index:02}.txt",
                     Body=f"{index}\n".encode())
    config = storage_config(harness, {"max_parallel_transfers": 8, "s3": {
        "endpoint_url": endpoint, "multipart_threshold_mb": 5, "multipart_chunk_mb": 5}})
    run = harness.run(harness.task(
        inputs=[{"path": "/in/big.bin", "url": "s3://big-one/in/big.bin"},
                {"path": "/in/tree", "url": "s3://big-one/tree", "type": "DIRECTORY"}],
        outputs=[{"path": "/out/big.bin", "url": "s3://big-one/out/big.bin"},
                 {"path": "/out/tree", "url": "s3://big-one/out/tree", "type": "DIRECTORY"}],
        executors=[sh("mkdir -p /out && cp /in/big.bin /out/big.bin && "
                      "cp -r /in/tree /out/tree")]), config=config)
    assert run.state == "COMPLETE", run.system_logs
    assert run.host("/in/big.bin").read_bytes() == big
    head = a.head_object(Bucket="big-one", Key="out/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three 5 MB parts: a multipart upload
    assert a.get_object(Bucket="big-one", Key="out/big.bin")["Body"].read() == big
    keys = [o["Key"] for o in a.list_objects_v2(Bucket="big-one", Prefix="out/tree/")
            ["Contents"]]
    assert len(keys) == 30
    logged = [o["path"] for o in run.fold.task_log["outputs"]]
    assert logged == ["/out/big.bin"] + [f"/out/tree/{i // 10}/{i:02}.txt" for i in range(30)]


def test_a_missing_object_fails_at_once_naming_the_url(harness, two_motos):
    alpha, beta = two_motos
    alpha.client().create_bucket(Bucket="empty-one")
    config = storage_config(harness, {"retry_seconds": 120, **endpoints(alpha, beta)})
    run = harness.run(harness.task(inputs=[{"path": "/in/x", "url": "s3://empty-one/nope"}],
                                   executors=[sh("true")]), config=config)
    assert run.state == "SYSTEM_ERROR"
    assert "input /in/x from s3://empty-one/nope: 404 NoSuchKey" in run.system_logs
    assert "still failing" not in run.system_logs
