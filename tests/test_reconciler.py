"""Reconciler and worker/server wiring: a separate `funnel reconcile` process, retries,
workers that fetch their task and report over HTTP, cancels noticed by the worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import requests

from funnel_hpc.core.events import iter_events, read_event_log
from funnel_hpc.gateway.store.task_dirs import RECEIVED_EVENTS, gateway_dir
from tests.e2e_helpers import TERMINAL, create, get, sh, wait_state
from tests.server_helpers import ServerProcess, clean_env, funnel_argv, worker_image_config
from tests.waiting import wait_for


def test_separate_reconcile_process(databases, tmp_path):
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite"), reconcile=False,
                           overrides={"reconciler": {"interval_seconds": 0.3},
                                      "worker": {"container_driver": "bwrap"}}).start()
    reconciler = None
    try:
        task_id = create(server, [sh("echo from-separate-reconciler")])
        time.sleep(1.5)
        assert get(server, task_id, "MINIMAL")["state"] == "QUEUED"  # nobody drives it yet
        reconciler = subprocess.Popen(funnel_argv("reconcile", "--config", str(server.config_path)),
                                      env=clean_env(), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        task = wait_state(server, task_id, TERMINAL, timeout=60)
        assert task["state"] == "COMPLETE"
        assert task["logs"][0]["logs"][0]["stdout"] == "from-separate-reconciler\n"
    finally:
        if reconciler:
            reconciler.terminate()
            reconciler.wait(10)
        server.stop()


def test_lost_job_is_retried_as_a_new_attempt(databases, tmp_path):
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite"), reconcile=True, overrides={
        "reconciler": {"interval_seconds": 0.3, "max_attempts": 2},
        "worker": {"container_driver": "bwrap"}}).start()
    try:
        task_id = create(server, [sh("sleep 3; echo done")])
        wait_state(server, task_id, "RUNNING")
        pid = json.loads((server.work_dir / task_id / "local.pid").read_text())["pid"]
        os.killpg(pid, signal.SIGKILL)  # the job dies without its worker recording an end
        task = wait_state(server, task_id, TERMINAL, timeout=60)
        assert task["state"] == "COMPLETE"
        assert len(task["logs"]) == 2
        first, second = task["logs"]
        assert any("did not record an end" in line for line in first["system_logs"])
        assert any("retrying: attempt 2 of 2" in line for line in first["system_logs"])
        assert first["metadata"]["attempt"] == "1" and second["metadata"]["attempt"] == "2"
        assert second["logs"][0]["stdout"] == "done\n"
        assert (server.work_dir / task_id / "events.jsonl.attempt1").exists()
    finally:
        server.stop()


def test_worker_fetches_task_by_id_and_reports_over_http(databases, tmp_path):
    """A worker on a machine that does not share the work dir (e.g. a cloud batch job)."""
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite")).start()
    try:
        task_id = create(server, [sh("echo remote")], inputs=[{"path": "/in/a",
                                                               "content": "x"}])
        elsewhere = tmp_path / "elsewhere"
        config = tmp_path / "worker.yaml"
        config.write_text(json.dumps({"worker": {"container_driver": "bwrap",
                                                 **worker_image_config()}}))
        done = subprocess.run(funnel_argv("worker", "run", "--task-id", task_id, "--server",
                                          server.url, "--workdir", str(elsewhere),
                                          "--config", str(config)),
                              env=clean_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        local_events = list(iter_events(elsewhere / task_id / "events.jsonl"))
        received = gateway_dir(server.work_dir, task_id) / RECEIVED_EVENTS
        wait_for(lambda: len(list(iter_events(received))) >= len(local_events), 10,
                 "the server to receive every event", interval=0.1,
                 detail=lambda: f"received: {list(iter_events(received))}")
        assert list(iter_events(received)) == local_events
        fold = read_event_log(received)
        assert fold.state == "COMPLETE"
        assert fold.task_log["logs"][0]["stdout"] == "remote\n"
        bad = requests.post(f"{server.url}/funnel/v1/tasks/{task_id}/events", json={"seq": "x"},
                            timeout=10)
        assert bad.status_code == 400
    finally:
        server.stop()


def test_worker_notices_a_cancel_on_the_server(databases, tmp_path):
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite")).start()
    try:
        task_id = create(server, [sh("sleep 60")])
        config = tmp_path / "worker.yaml"
        config.write_text(json.dumps({"worker": {"container_driver": "bwrap",
                                                 "poll_server_seconds": 0.5,
                                                 **worker_image_config()}}))
        proc = subprocess.Popen(funnel_argv("worker", "run", "--task-id", task_id, "--server",
                                            server.url, "--workdir", str(tmp_path / "w"),
                                            "--config", str(config)),
                                env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        events = tmp_path / "w" / task_id / "events.jsonl"
        wait_for(lambda: read_event_log(events).state == "RUNNING", 30,
                 "the worker to report RUNNING", interval=0.1,
                 detail=lambda: f"state: {read_event_log(events).state}")
        requests.post(f"{server.api}/tasks/{task_id}:cancel", timeout=10)
        proc.communicate(timeout=30)
        assert proc.returncode == 3
        fold = read_event_log(events)
        assert fold.state == "CANCELED"
        assert any("CANCELED on the server" in line for line in fold.task_log["system_logs"])
    finally:
        server.stop()
