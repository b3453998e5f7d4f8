"""`funnel server run`: HTTP API (waitress) + one reconciler thread per backend instance
(gateway/reconcile/instances.py); `funnel reconcile`: the reconcilers alone."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import waitress

from funnel_hpc.core.config import Config
from funnel_hpc.gateway.store import db, leases
from funnel_hpc.gateway.store.tasks import TaskService
from funnel_hpc.gateway.web.app import create_app, make_service

log = logging.getLogger(__name__)


def make_reconcilers(config: Config, service: TaskService, only: str | None = None):
    """Every backend instance's reconciler (or only the instance `only`), not started."""
    from funnel_hpc.gateway.reconcile.instances import Reconcilers

    return Reconcilers(config, service, only)


def _exit_on_sigterm() -> None:
    """SIGTERM (systemd's stop) ends the process through its finally blocks, so the
    reconciler lease is given up at once instead of expiring."""
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))


def private_state(config: Config) -> None:
    """The work dir 700 (711 when jobs run as their owners, who must reach their task
    dirs, themselves 700) and an SQLite database 600 whatever the umask: they hold every
    task's environment and the worker-token key. SQLite gives -wal/-shm its file's mode."""
    work_dir = Path(config.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # slurm instances are the ones that have it
    as_owner = any(getattr(instance.options, "submit_as_owner", False)
                   for instance in config.instances())
    os.chmod(work_dir, 0o711 if as_owner else 0o700)
    path = db.sqlite_path(config.database.url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if name.exists():
                os.chmod(name, 0o600)


def run_server(config: Config, reconcile: bool = True) -> None:
    leases.lock_sqlite(config.database.url, leases.SERVER_ROLE)
    private_state(config)
    _exit_on_sigterm()
    service = make_service(config)
    app = create_app(config, service)
    grpc_server = None  # held for the life of run_server: a collected server stops
    if config.server.grpc_port:
        from funnel_hpc.gateway.grpc.server import start_grpc_server

        grpc_server = start_grpc_server(service, config, app.extensions["funnel.auth"],
                                        app.extensions["funnel.limiter"])
    from funnel_hpc.gateway.sinks.publisher import start_publisher

    publisher = start_publisher(service.engine, config.events)  # None: events.publish is off
    reconcilers = None
    if reconcile and config.reconciler.enabled:
        reconcilers = make_reconcilers(config, service)
        reconcilers.start()
    else:
        log.info("reconciler disabled: run `funnel reconcile` next to this server")
    server = config.server
    log.info("TES API on http://%s:%s/ga4gh/tes/v1 (database %s, backends %s)",
             server.host, server.http_port, _safe_url(config.database.url),
             ", ".join(f"{instance.name} ({instance.kind})" for instance in config.instances()))
    try:
        waitress.serve(app, host=server.host, port=server.http_port,
                       threads=server.threads, ident="funnel-hpc", _quiet=True,
                       max_request_header_size=4 * 1024 * 1024)
    finally:
        if grpc_server is not None:
            grpc_server.stop(grace=2)
        if publisher is not None:
            publisher.stop()
        if reconcilers is not None:
            reconcilers.release()


def run_reconciler(config: Config, only: str | None = None) -> None:
    from funnel_hpc.gateway.web import ops_listener

    if config.reconciler.listen:
        ops_listener.parse_listen(config.reconciler.listen)  # a bad value stops here
    private_state(config)
    service = make_service(config)
    reconcilers = make_reconcilers(config, service, only)  # KeyError: no such instance
    _exit_on_sigterm()
    ops_listener.serve(config, service)
    try:
        reconcilers.run_forever()
    finally:
        reconcilers.release()


def _safe_url(url: str) -> str:
    """A database URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url
