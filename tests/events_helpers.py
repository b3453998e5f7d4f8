"""Helpers of the event-sink, watch and client tests: a webhook receiver on 127.0.0.1,
an outbox database, a scripted HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from funnel_hpc.core.config import DEFAULT_CONFIG
from funnel_hpc.gateway import db, outbox
from funnel_hpc.gateway.sinks import SIGNATURE_HEADER, signature


def events_settings(**changes: Any) -> dict:
    """The default ``events:`` section, with changes (short pauses for tests)."""
    import yaml

    settings = yaml.safe_load(DEFAULT_CONFIG.read_text())["events"]
    settings.update(poll_seconds=0.05, retry_min_seconds=0.05, retry_max_seconds=0.2)
    settings.update(changes)
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
    """An HTTP endpoint on 127.0.0.1 that checks each POST's signature and keeps the events;
    ``stop()`` closes its socket (connections refused), ``start()`` opens it again on the
    same port; ``fail_with`` makes it answer that status instead (and keep nothing)."""

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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> WebhookReceiver:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None

    def received(self) -> list[dict]:
        with self.lock:
            return list(self.events)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
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

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


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
