"""The worker with --server: task fetched by id, events POSTed as written, cancels noticed.

The server here is a small stand-in speaking the three calls the worker makes, so
these tests need no gateway, database or backend.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from funnel_hpc.core.events import iter_events, read_event_log
from tests.server_helpers import clean_env, funnel_argv
from tests.waiting import wait_for
from tests.worker_helpers import processes_with_argv, sh


class FakeTes:
    """GET task (FULL / MINIMAL), POST events, and a slow download at /slow."""

    def __init__(self, port: int = 0) -> None:
        self.tasks: dict[str, dict] = {}
        self.state = "RUNNING"
        self.events: list[dict] = []
        # answer this many more GETs / POSTs 503 (a gateway starting up)
        self.busy = {"GET": 0, "POST": 0}
        self.answered_busy = {"GET": 0, "POST": 0}
        self.slow_started = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def too_busy(self) -> bool:
                if fake.busy[self.command] <= 0:
                    return False
                fake.busy[self.command] -= 1
                fake.answered_busy[self.command] += 1
                self.reply(503, {"message": "starting"})
                return True

            def do_GET(self):
                if self.too_busy():
                    return
                url = urlparse(self.path)
                if url.path == "/slow":
                    fake.slow_started.set()
                    self.send_response(200)
                    self.send_header("Content-Length", str(1 << 30))
                    self.end_headers()
                    try:
                        for _ in range(4096):
                            self.wfile.write(b"x" * (256 << 10))
                            time.sleep(0.1)
                    except OSError:
                        pass  # the worker hung up
                    return
                task_id = url.path.rsplit("/", 1)[-1]
                if url.path.startswith("/ga4gh/tes/v1/tasks/") and task_id in fake.tasks:
                    view = parse_qs(url.query).get("view", ["MINIMAL"])[0]
                    task = fake.tasks[task_id]
                    self.reply(200, task if view == "FULL" else
                               {"id": task_id, "state": fake.state})
                else:
                    self.reply(404, {"msg": "not found"})

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.too_busy():
                    return
                if self.path.startswith("/funnel/v1/tasks/") and self.path.endswith("/events"):
                    fake.events.append(json.loads(body))
                    self.reply(200, {})
                else:
                    self.reply(404, {"msg": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def tes():
    fake = FakeTes()
    yield fake
    fake.server.shutdown()


def start_by_id(harness, tes: FakeTes, task: dict, url: str = "",
                **worker) -> subprocess.Popen:
    tes.tasks[task["id"]] = task
    argv = funnel_argv("worker", "run", "--task-id", task["id"], "--server", url or tes.url,
                       "--workdir", str(harness.workdir),
                       "--config", str(harness.config(**worker)))
    return subprocess.Popen(argv, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_task_fetched_by_id_and_every_event_posted_as_written(harness, tes):
    task = harness.task(executors=[sh("echo one"), sh("echo two >&2")])
    proc = start_by_id(harness, tes, task)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "COMPLETE", err
    written = list(iter_events(harness.workdir / task["id"] / "events.jsonl"))
    assert sorted(tes.events, key=lambda e: e["seq"]) == written
    assert [e["seq"] for e in written] == list(range(1, len(written) + 1))
    assert {e["type"] for e in written} >= {"state", "task_start", "task_end", "metadata",
                                            "executor_start", "executor_end"}
    assert all(e["task_id"] == task["id"] and e["time"].endswith("Z") for e in written)
    fold = read_event_log(harness.workdir / task["id"] / "events.jsonl")
    assert fold.task_log["metadata"]["hostname"]


def test_worker_waits_for_a_server_that_is_not_up_yet(harness, tes):
    """A gateway restarting when the job starts: nothing listens, then 503s; the worker
    keeps asking for its task, then re-sends the events the server refused."""
    task = harness.task(executors=[sh("echo late")])
    with socket.socket() as probe:  # a port nobody listens on, for now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = start_by_id(harness, tes, task, url=f"http://127.0.0.1:{port}")
    time.sleep(1)
    assert proc.poll() is None, proc.communicate()
    later = FakeTes(port)
    try:
        later.tasks[task["id"]] = task
        later.busy = {"GET": 1, "POST": 2}  # then 503 for the fetch and the first event
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0 and out.strip() == "COMPLETE", err
        assert "cannot fetch task" in err, err  # it said why it waited
        assert later.answered_busy == {"GET": 1, "POST": 2}
        written = list(iter_events(harness.workdir / task["id"] / "events.jsonl"))
        assert sorted(later.events, key=lambda e: e["seq"]) == written
    finally:
        later.server.shutdown()


def test_unknown_task_id_fails_at_once_with_one_line(harness, tes):
    task = harness.task(executors=[sh("echo never")])
    argv = funnel_argv("worker", "run", "--task-id", task["id"], "--server", tes.url,
                       "--workdir", str(harness.workdir), "--config", str(harness.config()))
    started = time.monotonic()
    proc = subprocess.run(argv, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and time.monotonic() - started < 20
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: cannot fetch task")
    assert "404" in proc.stderr


def test_cancel_on_the_server_stops_the_executor(harness, tes):
    task = harness.task(executors=[sh("exec sleep 619"), sh("echo never")])
    proc = start_by_id(harness, tes, task, poll_server_seconds=0.2)
    wait_for(lambda: processes_with_argv(["sleep", "619"]), 30, "the executor to start",
             interval=0.1)
    tes.state = "CANCELING"
    out, _err = proc.communicate(timeout=30)
    assert proc.returncode == 3 and out.strip() == "CANCELED"
    fold = read_event_log(harness.workdir / task["id"] / "events.jsonl")
    assert fold.state == "CANCELED" and len(fold.task_log["logs"]) == 1
    assert "CANCELING on the server" in "\n".join(fold.task_log["system_logs"])
    assert processes_with_argv(["sleep", "619"]) == []


def test_sigterm_during_a_download_cancels_without_waiting_for_it(harness, tes):
    task = harness.task(inputs=[{"path": "/in/big", "url": f"{tes.url}/slow"}],
                        executors=[sh("echo never")])
    proc = harness.start(task)
    assert tes.slow_started.wait(30), "the download did not start"
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10
    fold = read_event_log(harness.workdir / task["id"] / "events.jsonl")
    assert proc.returncode == 3 and fold.state == "CANCELED"
    assert fold.task_log["logs"] == []
