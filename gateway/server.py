"""`funnel server run`: HTTP API (waitress) + the reconciler thread."""

from __future__ import annotations

import logging

import waitress

from funnel_hpc.gateway.app import create_app, make_service
from funnel_hpc.gateway.service import TaskService

log = logging.getLogger(__name__)


def make_reconciler(config: dict, service: TaskService):
    from funnel_hpc.backends.registry import load_backend
    from funnel_hpc.gateway.reconciler import Reconciler

    return Reconciler(service, load_backend(config), config)


def run_server(config: dict, reconcile: bool = True) -> None:
    service = make_service(config)
    app = create_app(config, service)
    grpc_server = None  # held for the life of run_server: a collected server stops
    if config["server"]["grpc_port"]:
        from funnel_hpc.gateway.grpc_server import start_grpc_server

        grpc_server = start_grpc_server(service, config, app.extensions["funnel.auth"],
                                        app.extensions["funnel.limiter"])
    if reconcile and config["reconciler"]["enabled"]:
        make_reconciler(config, service).start_thread()
    else:
        log.info("reconciler disabled: run `funnel reconcile` next to this server")
    server = config["server"]
    log.info("TES API on http://%s:%s/ga4gh/tes/v1 (database %s, backend %s)",
             server["host"], server["http_port"], _safe_url(config["database"]["url"]),
             config["backend"]["name"])
    try:
        waitress.serve(app, host=server["host"], port=server["http_port"],
                       threads=server["threads"], ident="funnel-hpc", _quiet=True,
                       max_request_header_size=4 * 1024 * 1024)
    finally:
        if grpc_server is not None:
            grpc_server.stop(grace=2)


def run_reconciler(config: dict) -> None:
    make_reconciler(config, make_service(config)).run_forever()


def _safe_url(url: str) -> str:
    """A database URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url
