"""Helpers of the event-sink, watch and client tests: a webhook receiver on 127.0.0.1 (in
this process or its own), an outbox database, a scripted HTTP server, reading a watch."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from funnel_hpc.core import config as config_mod
from funnel_hpc.core.config import EventsSection
from funnel_hpc.gateway.sinks.targets import SIGNATURE_HEADER, signature
from funnel_hpc.gateway.store import db, outbox
from tests.server_helpers import ServerProcess


def events_settings(**changes: Any) -> EventsSection:
    """The default ``events:`` section, with changes (short pauses for tests)."""
    settings = config_mod.replace(config_mod.load(environ={}).events, "events", **{
        "poll_seconds": 0.05, "retry_min_seconds": 0.05, "retry_max_seconds": 0.2, **changes})
    assert isinstance(settings, EventsSection)
    return settings


def outbox_engine(where: Path | str) -> Engine:
    """A migrated database: a database URL, or a path for SQLite."""
    engine = db.make_engine(where if isinstance(where, str) else f"sqlite:///{where}")
    db.upgrade(engine)
    return engine


def record_events(engine: Engine, plan: list[tuple[str, str | None, str, Any]]) -> list[int]:
    """Record (task id, owner, kind, payload) events, one transaction each; their ids."""
    ids = []
    for task_id, owner, kind, payload in plan:
        with db.writing(engine) as conn:
            ids.append(outbox.record(conn, task_id, owner, kind, payload))
    return ids


class WebhookReceiver:
    """An HTTP endpoint on 127.0.0.1 that checks each POST's signature and keeps the events
    (a GET answers ``tally()``); ``stop()`` closes its socket (connections refused),
    ``start()`` opens it again on the same port; ``fail_with`` makes it answer that status
    instead (and keep nothing)."""

    def __init__(self, secret: str, on_event: Callable[[dict], None] | None = None):
        self.secret = secret
        self.on_event = on_event  # called with each accepted event, in arrival order
        self.events: list[dict] = []
        self.bad_signatures = 0
        self.refused = 0          # POSTs answered with fail_with
        self.fail_with: int | None = None
        self.lock = threading.Lock()
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.connections: set[socket.socket] = set()  # kept alive, closed by stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> WebhookReceiver:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Down as a dead receiver is: the listening socket and kept-alive connections."""
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None
        with self.lock:
            open_connections, self.connections = self.connections, set()
        for connection in open_connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the sender closed it first

    def received(self) -> list[dict]:
        with self.lock:
            return list(self.events)

    def tally(self) -> dict:
        """What GET on the receiver answers: events kept, bad signatures, events per task."""
        per_task: dict[str, int] = {}
        with self.lock:
            for event in self.events:
                per_task[event["task_id"]] = per_task.get(event["task_id"], 0) + 1
            return {"events": len(self.events), "bad_signatures": self.bad_signatures,
                    "per_task": per_task}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver offers

            def setup(self) -> None:
                super().setup()
                with receiver.lock:
                    receiver.connections.add(self.connection)

            def finish(self) -> None:
                super().finish()
                with receiver.lock:
                    receiver.connections.discard(self.connection)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    if receiver.fail_with:
                        receiver.refused += 1
                        status = receiver.fail_with
                    elif self.headers.get(SIGNATURE_HEADER) != signature(receiver.secret, body):
                        receiver.bad_signatures += 1
                        status = 401
                    else:
                        event = json.loads(body)
                        receiver.events.append(event)
                        if receiver.on_event is not None:
                            receiver.on_event(event)
                        status = 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:  # for a receiver in another process (benchmarks)
                body = json.dumps(receiver.tally()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


class ReceiverProcess:
    """A WebhookReceiver in a process of its own (a benchmark's receiver then takes no CPU
    from the process it measures): ``url`` to post to, ``tally()`` what it kept so far,
    ``close()`` ends it."""

    def __init__(self, secret: str):
        import subprocess
        import sys

        script = ("import sys\n"
                  "from tests.events_helpers import WebhookReceiver\n"
                  f"hook = WebhookReceiver({secret!r}).start()\n"
                  "print(hook.port, flush=True)\n"
                  "sys.stdin.read()\n")  # until close() closes its stdin
        self.proc = subprocess.Popen([sys.executable, "-c", script], text=True,
                                     cwd=Path(__file__).resolve().parent.parent,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}/hook"

    def tally(self) -> dict:
        """WebhookReceiver.tally() of the receiver."""
        import requests

        return requests.get(self.url, timeout=30).json()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


class ScriptedServer:
    """An HTTP server on 127.0.0.1 whose answers a test scripts: ``answer(method, path,
    query, headers)`` returns (status, headers, JSON body); every request is kept."""

    def __init__(self, answer: Callable[..., tuple[int, dict, Any]]):
        self.answer = answer
        self.requests: list[tuple[str, str, dict]] = []
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                from urllib.parse import parse_qs, urlsplit

                parts = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(parts.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                scripted.requests.append((self.command, parts.path, dict(self.headers)))
                status, headers, body = scripted.answer(self.command, parts.path, query,
                                                        dict(self.headers))
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _reply

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def take(events: Iterator[dict], count: int, timeout: float = 60) -> list[dict]:
    """The next `count` events of a watch, read on a thread so a short stream fails the
    test (after timeout) instead of hanging it."""
    got: list[dict] = []

    def read() -> None:
        for event in events:
            got.append(event)
            if len(got) == count:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert len(got) == count, f"{len(got)} of {count} events in {timeout} s: {got}"
    return got


def record(server: ServerProcess, plan) -> list[int]:
    return record_events(outbox_engine(server.work_dir / "funnel.db"), plan)
