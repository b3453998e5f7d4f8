"""http(s):// through the worker: authenticated downloads, PUT/POST uploads of files,
trees and wildcard matches, many transfers at once in a fixed event order."""

from __future__ import annotations

import pytest

from tests.storage_helpers import ObjectServer, storage_config
from tests.worker_helpers import sh

TOKEN = "Bearer s3cr3t-token"


@pytest.fixture
def objects():
    server = ObjectServer(required={"Authorization": TOKEN})
    yield server
    server.stop()


def http_storage(server: ObjectServer, token: str = TOKEN, **extra) -> dict:
    return {"http": {"headers": {server.host: {"Authorization": token}}, **extra}}


def test_download_and_put_upload_with_per_host_headers(harness, objects):
    objects.objects["/in/a.txt"] = b"over http with a token"
    config = storage_config(harness, http_storage(objects))
    run = harness.run(harness.task(
        inputs=[{"path": "/in/a.txt", "url": f"{objects.url}/in/a.txt"}],
        outputs=[{"path": "/out/r.txt", "url": f"{objects.url}/results/r.txt"},
                 {"path": "/out/d", "url": f"{objects.url}/results/d", "type": "DIRECTORY"},
                 {"path": "/out/w/*.log", "path_prefix": "/out/w/",
                  "url": f"{objects.url}/results/logs"}],
        executors=[sh("mkdir -p /out/d/sub /out/w && tr a-z A-Z < /in/a.txt > /out/r.txt && "
                      "echo 1 > /out/d/one && echo 2 > /out/d/sub/two && "
                      "echo x > /out/w/x.log && echo skip > /out/w/y.txt")]), config=config)
    assert run.state == "COMPLETE", run.system_logs
    assert objects.objects["/results/r.txt"] == b"OVER HTTP WITH A TOKEN"
    assert objects.objects["/results/d/one"] == b"1\n"
    assert objects.objects["/results/d/sub/two"] == b"2\n"
    assert objects.objects["/results/logs/x.log"] == b"x\n"
    assert "/results/logs/y.txt" not in objects.objects
    assert {m for m, _p, _s in objects.requests} == {"GET", "PUT"}
    assert all(h.get("Authorization") == TOKEN for h in objects.seen_headers)


def test_post_uploads_when_configured(harness, objects):
    config = storage_config(harness, http_storage(objects, upload_method="POST"))
    run = harness.run(harness.task(
        outputs=[{"path": "/out/r.txt", "url": f"{objects.url}/post/r.txt"}],
        executors=[sh("echo posted > /out/r.txt")]), config=config)
    assert run.state == "COMPLETE", run.system_logs
    assert objects.requests == [("POST", "/post/r.txt", 201)]
    assert objects.objects["/post/r.txt"] == b"posted\n"


def test_an_empty_output_is_sent_with_a_length(harness, objects):
    config = storage_config(harness, http_storage(objects))
    run = harness.run(harness.task(
        outputs=[{"path": "/out/empty", "url": f"{objects.url}/empty"}],
        executors=[sh("mkdir -p /out && : > /out/empty")]), config=config)
    assert run.state == "COMPLETE", run.system_logs
    assert objects.objects["/empty"] == b""
    assert objects.seen_headers[-1].get("Content-Length") == "0"


def test_headers_go_only_to_their_host(harness, objects, http_root):
    root, base = http_root  # another server: it must not see the token
    (root / "plain.txt").write_text("plain")
    objects.objects["/t.txt"] = b"token"
    other = ObjectServer()
    try:
        other.objects["/o.txt"] = b"other"
        config = storage_config(harness, http_storage(objects))
        run = harness.run(harness.task(
            inputs=[{"path": "/in/t.txt", "url": f"{objects.url}/t.txt"},
                    {"path": "/in/o.txt", "url": f"{other.url}/o.txt"},
                    {"path": "/in/p.txt", "url": f"{base}/plain.txt"}],
            executors=[sh("cat /in/t.txt /in/o.txt /in/p.txt")]), config=config)
        assert run.state == "COMPLETE", run.system_logs
        assert run.executor(0)["stdout"] == "tokenotherplain"
        assert all("Authorization" not in h for h in other.seen_headers)
    finally:
        other.stop()


def test_many_inputs_and_outputs_move_in_parallel_in_a_fixed_order(harness):
    server = ObjectServer()
    try:
        for index in range(16):
            server.objects[f"/in/{index:02}.txt"] = f"file {index}\n".encode()
        server.gather = 8  # each transfer waits until 8 were in flight together
        config = storage_config(harness, {"max_parallel_transfers": 8})
        run = harness.run(harness.task(
            inputs=[{"path": f"/in/{i:02}.txt", "url": f"{server.url}/in/{i:02}.txt"}
                    for i in range(16)],
            outputs=[{"path": "/out", "url": f"{server.url}/out", "type": "DIRECTORY"}],
            executors=[sh("mkdir -p /out && for f in /in/*.txt; do "
                          "cp $f /out/$(basename $f); done")]), config=config)
        assert run.state == "COMPLETE", run.system_logs
        assert server.max_in_flight >= 8
        logged = [o["path"] for o in run.fold.task_log["outputs"]]
        assert logged == [f"/out/{i:02}.txt" for i in range(16)]  # the listing's order
        assert all(server.objects[f"/out/{i:02}.txt"] == f"file {i}\n".encode()
                   for i in range(16))
    finally:
        server.stop()
