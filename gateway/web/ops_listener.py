"""`funnel reconcile`'s own /metrics, /healthz and /readyz (``reconciler.listen``).

The reconciler records ticks, scheduler calls and finished tasks in its own process
(gateway/ops/metrics.py); this small WSGI app, served by waitress on a daemon thread,
lets Prometheus scrape them there. It has no other route and takes no credentials:
bind it to a private address. Cost: one thread, idle between scrapes.
"""

from __future__ import annotations

import logging
import re
import threading

from flask import Flask

from funnel_hpc.core.config import Config
from funnel_hpc.gateway.ops.readiness import RETRY_AFTER_SECONDS
from funnel_hpc.gateway.store.tasks import TaskService
from funnel_hpc.gateway.web.ops_routes import blueprint

log = logging.getLogger(__name__)

LISTEN = re.compile(r"(?P<host>[A-Za-z0-9.:\[\]-]+):(?P<port>[0-9]{1,5})")


def parse_listen(value: str) -> tuple[str, int]:
    """"host:port" -> (host, port); ValueError naming reconciler.listen otherwise."""
    match = LISTEN.fullmatch(value)
    if match is None or not 0 < int(match.group("port")) < 65536:
        raise ValueError(f"reconciler.listen: {value!r} is not host:port")
    return match.group("host").strip("[]"), int(match.group("port"))


def make_app(config: Config, service: TaskService) -> Flask:
    app = Flask("funnel-hpc-reconciler", static_folder=None, template_folder=None)
    app.extensions["funnel.config"] = config
    app.extensions["funnel.service"] = service
    app.register_blueprint(blueprint)

    @app.after_request
    def _retry_after(resp):
        if resp.status_code == 503 and "Retry-After" not in resp.headers:
            resp.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return resp

    return app


def serve(config: Config, service: TaskService) -> threading.Thread | None:
    """Serve the health endpoints on reconciler.listen (None when it is empty)."""
    listen = config.reconciler.listen
    if not listen:
        return None
    import waitress.server

    host, port = parse_listen(listen)
    server = waitress.server.create_server(make_app(config, service), host=host, port=port,
                                           threads=2, ident="funnel-hpc")
    thread = threading.Thread(target=server.run, name="reconciler-metrics", daemon=True)
    thread.start()
    log.info("reconciler metrics on http://%s:%s/metrics", host, port)
    return thread
