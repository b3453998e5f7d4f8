"""The CLI and the Python client outlast a restarting server: refused connections and
503s are retried for FUNNEL_RETRY_SECONDS, and a POST is sent again only when it cannot
have reached the server (no task is created twice)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import requests

from funnel_hpc.core.client import ClientError, TesClient
from tests.ops_helpers import HangUpServer
from tests.server_helpers import ServerProcess, clean_env, free_port, funnel_argv
from tests.waiting import wait_for

TASK = {"name": "retry", "executors": [{"image": "busybox", "command": ["true"]}]}


def test_task_create_waits_for_a_server_that_is_not_up_yet(tmp_path):
    port = free_port()
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(TASK))
    create = subprocess.Popen(funnel_argv("task", "create", str(task_file)),
                              env=clean_env(FUNNEL_SERVER=f"http://127.0.0.1:{port}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = ServerProcess(tmp_path / "srv", "", port=port)
    try:
        begun = time.monotonic()
        # the server is down for 5 s (the scenario): connections are refused meanwhile
        wait_for(lambda: time.monotonic() - begun >= 5, 10, "a 5 s outage", interval=0.5)
        assert create.poll() is None, create.communicate()
        server.start()
        out, err = create.communicate(timeout=120)
        assert create.returncode == 0, err
        listed = requests.get(server.api + "/tasks", timeout=10).json()["tasks"]
        assert [task["id"] for task in listed] == [out.strip()]
    finally:
        if create.poll() is None:
            create.kill()
        server.stop()


def test_a_post_whose_answer_was_lost_is_not_sent_again():
    hangup = HangUpServer()
    try:
        client = TesClient(hangup.url, retry_seconds=5)
        with pytest.raises(ClientError, match="cannot reach"):
            client.create(TASK)
        assert hangup.requests == 1  # it reached the server: resending could make two
        with pytest.raises(ClientError):
            TesClient(hangup.url, retries=2, max_retry_wait=0.1).get("x")
        assert hangup.requests == 4  # a GET is tried again
    finally:
        hangup.close()


def test_retry_window_comes_from_the_environment():
    port = free_port()  # nothing listens
    env = clean_env(FUNNEL_SERVER=f"http://127.0.0.1:{port}", FUNNEL_RETRY_SECONDS="2")
    begun = time.monotonic()
    done = subprocess.run(funnel_argv("task", "get", "abc"), env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "cannot reach" in done.stderr, done.stderr
    assert time.monotonic() - begun < 60
    bad = subprocess.run(funnel_argv("task", "get", "abc"), capture_output=True, text=True,
                         env={**env, "FUNNEL_RETRY_SECONDS": "soon"}, timeout=60)
    assert bad.returncode == 1 and "FUNNEL_RETRY_SECONDS" in bad.stderr, bad.stderr
