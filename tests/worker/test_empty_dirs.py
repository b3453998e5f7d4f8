"""Directories keep their shape through every store (issue 30): a DIRECTORY input holding
empty directories is staged with them, and a DIRECTORY output's empty directories (the
output itself when empty) arrive: as directories on file://, as zero-byte "name/" marker
objects on S3 (moto) and gs:// (the GCS emulator), which a later input recreates. Each
through a real worker running a real image."""

from __future__ import annotations

import boto3
import pytest

from funnel_hpc.worker.storage import directory_names
from tests.server_helpers import TEST_REGISTRY
from tests.storage_helpers import storage_config

BUSYBOX = f"{TEST_REGISTRY}/library/busybox:latest"
# what a CWL tool does: make nested directories, some left empty, and glob for them
MAKE_TREE = "mkdir -p /work/out/a/b /work/out/c /work/empty && echo x > /work/out/c/f"
CHECK_INPUT = ("test -d /in/tree/e/m/p/t/y && test -d /in/tree/sub/deeper && "
               "test -f /in/tree/sub/f && test -d /in/none && echo shape-kept")


def sh(script: str) -> dict:
    return {"image": BUSYBOX, "command": ["sh", "-c", script]}


def tree_task(harness, in_url: str, none_url: str, out_url: str, empty_url: str) -> dict:
    return harness.task(
        inputs=[{"path": "/in/tree", "url": in_url, "type": "DIRECTORY"},
                {"path": "/in/none", "url": none_url, "type": "DIRECTORY"}],
        outputs=[{"path": "/work/out", "url": out_url, "type": "DIRECTORY"},
                 {"path": "/work/empty", "url": empty_url}],  # untyped: found a directory
        executors=[sh(CHECK_INPUT), sh(MAKE_TREE)])


def done(run) -> None:
    assert run.state == "COMPLETE", (run.system_logs, run.stderr, run.fold.task_log["logs"])
    assert run.executor(0)["stdout"] == "shape-kept\n"


def test_file_urls_keep_empty_directories(harness):
    source = harness.data / "source"
    (source / "e" / "m" / "p" / "t" / "y").mkdir(parents=True)
    (source / "sub" / "deeper").mkdir(parents=True)
    (source / "sub" / "f").write_text("f\n")
    (harness.data / "none").mkdir()
    data = f"file://{harness.data}"
    run = harness.run(tree_task(harness, f"{data}/source", f"{data}/none", f"{data}/out",
                                f"{data}/empty"))
    done(run)
    out = harness.data / "out"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == \
        ["a", "a/b", "c", "c/f"]
    assert (harness.data / "empty").is_dir() and not any((harness.data / "empty").iterdir())
    logged = [o["path"] for o in run.fold.task_log["outputs"]]
    assert logged == ["/work/out/c/f"]  # the output log lists files only


def test_s3_keeps_empty_directories_as_marker_objects(harness, moto_s3):
    endpoint, env = moto_s3
    harness.env.update(env)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="shapes")
    for key in ("source/e/m/p/t/y/", "source/sub/f", "source/sub/deeper/", "none/"):
        s3.put_object(Bucket="shapes", Key=key, Body=b"f\n" if key.endswith("f") else b"")
    config = storage_config(harness, {"s3": {"endpoint_url": endpoint}})
    run = harness.run(tree_task(harness, "s3://shapes/source", "s3://shapes/none",
                                "s3://shapes/out", "s3://shapes/empty"), config=config)
    done(run)
    keys = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket="shapes")["Contents"]}
    assert {k: v for k, v in keys.items() if k.startswith(("out/", "empty"))} == \
        {"out/a/b/": 0, "out/c/f": 2, "empty/": 0}
    # and back: the output, markers and all, is an input with the same shape
    again = harness.run(harness.task(
        inputs=[{"path": "/in/out", "url": "s3://shapes/out", "type": "DIRECTORY"},
                {"path": "/in/empty", "url": "s3://shapes/empty"}],
        executors=[sh("test -d /in/out/a/b && test -f /in/out/c/f && test -d /in/empty "
                      "&& ls -A /in/empty | wc -l")]), config=config)
    assert again.state == "COMPLETE", again.system_logs
    assert again.executor(0)["stdout"].strip() == "0"


def test_gs_keeps_empty_directories_as_marker_objects(harness, emulator):
    client = emulator.client()
    bucket = client.create_bucket("shapes-gs")
    for name in ("source/e/m/p/t/y/", "source/sub/f", "source/sub/deeper/", "none/"):
        bucket.blob(name).upload_from_string(b"f\n" if name.endswith("f") else b"")
    config = storage_config(harness, {"gs": {"endpoint_url": emulator.url,
                                             "anonymous": True}})
    run = harness.run(tree_task(harness, "gs://shapes-gs/source", "gs://shapes-gs/none",
                                "gs://shapes-gs/out", "gs://shapes-gs/empty"), config=config)
    done(run)
    sizes = {b.name: b.size for b in client.list_blobs("shapes-gs")
             if b.name.startswith(("out/", "empty"))}
    assert sizes == {"out/a/b/": 0, "out/c/f": 2, "empty/": 0}


def test_listings_name_files_and_childless_directories():
    """Object names under a prefix -> Store.list's names (S3 and gs:// alike)."""
    assert directory_names(["", "a/", "a/f", "b/", "b/c/", "e/x/", "z"]) == \
        ["a/f", "b/c/", "e/x/", "z"]
    assert directory_names([""]) == []  # the prefix's own marker: an empty directory


def test_file_directories_are_made_and_listed_without_following_symlinks(tmp_path):
    """A task's empty output directory is made beneath the allowed directory, never
    through a symlink planted there; listings name empty directories, never what a
    link leads to."""
    from funnel_hpc.worker.storage import StorageError
    from funnel_hpc.worker.storage.local import LocalStore

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "link").symlink_to(outside)
    store = LocalStore([str(allowed)])
    assert store.make_dir(f"file://{allowed}/made/a/b")
    assert (allowed / "made" / "a" / "b").is_dir()
    with pytest.raises(StorageError, match="symbolic link"):
        store.make_dir(f"file://{allowed}/link/x")
    assert not (outside / "x").exists()
    (allowed / "made" / "f").write_text("f")
    assert store.list(f"file://{allowed}/made") == ["a/b/", "f"]
    (outside / "secret").write_text("s")
    (allowed / "made" / "a" / "l").symlink_to(outside)  # a link to a directory: not followed
    assert store.list(f"file://{allowed}/made") == ["a/b/", "f"]
