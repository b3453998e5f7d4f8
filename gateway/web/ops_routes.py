"""/metrics, /healthz and /readyz: the routes operators and load balancers call.

/healthz says the process answers; /readyz that the database answers a ``SELECT 1``
(and, on SQLite, the write lock), a reconciler holds the backend's lease when
server.readyz_needs_reconciler asks for one, and the backend's last scheduler command
in this process did not fail. None of the three needs credentials or shows anything
about a user (no owners, ids or names; /metrics shows owner names only when
limits.per_owner.metrics_by_owner says so).
"""

from __future__ import annotations

import json
import logging

from flask import Blueprint, Response, current_app
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from funnel_hpc.gateway.ops import readiness
from funnel_hpc.gateway.ops.metrics import (
    REGISTRY,
    OwnerCollector,
    ReconcilerCollector,
    SinkCollector,
    TaskCollector,
    backend_failing,
)
from funnel_hpc.gateway.store.outbox import sink_names

log = logging.getLogger(__name__)
_repeated = readiness.Repeated(log)

blueprint = Blueprint("observability", __name__)
PUBLIC_ENDPOINTS = frozenset({"observability.metrics", "observability.healthz",
                              "observability.readyz"})


def _service_registry() -> CollectorRegistry:
    """This app's scrape-time collector, made at its first scrape."""
    registry = current_app.extensions.get("funnel.metrics")
    if registry is None:
        engine = current_app.extensions["funnel.service"].engine
        registry = CollectorRegistry(auto_describe=False)
        registry.register(TaskCollector(engine))
        registry.register(ReconcilerCollector(engine, current_app.extensions["funnel.config"]))
        registry.register(OwnerCollector(
            engine, current_app.extensions["funnel.config"].limits.per_owner))
        sinks = sink_names(current_app.extensions["funnel.config"].events)
        if sinks:
            registry.register(SinkCollector(engine, sinks))
        current_app.extensions["funnel.metrics"] = registry
    return registry


@blueprint.get("/metrics")
def metrics() -> Response:
    body = generate_latest(_service_registry()) + generate_latest(REGISTRY)
    return Response(body, mimetype=None, content_type=CONTENT_TYPE_PLAIN_0_0_4)


@blueprint.get("/healthz")
def healthz() -> Response:
    return _json({"status": "alive"}, 200)


@blueprint.get("/readyz")
def readyz() -> Response:
    """200 when this replica can serve: the database reads and (SQLite) takes the write
    lock, a reconciler holds this backend's lease (server.readyz_needs_reconciler), and
    this process's last scheduler command (if it makes any) did not fail."""
    config = current_app.extensions["funnel.config"]
    cached = current_app.extensions.get("funnel.readiness")
    if cached is None:
        cached = current_app.extensions["funnel.readiness"] = readiness.Checks(
            current_app.extensions["funnel.service"].engine, config)
    checks = {"database": "ok", "backend": "ok"}
    problem, reconciler = cached.result()
    if problem is not None:
        _repeated.warning("readyz-db", "readyz: database unavailable: %s", problem)
        checks["database"] = "unavailable"
    if config.server.readyz_needs_reconciler:
        checks["reconciler"] = reconciler or "unknown"
    if backend_failing():
        checks["backend"] = "failing"
    ready = all(value == "ok" for value in checks.values())
    resp = _json({"status": "ready" if ready else "not ready", "checks": checks},
                 200 if ready else 503)
    if not ready:
        resp.headers["Retry-After"] = str(readiness.RETRY_AFTER_SECONDS)
    return resp


def _json(data: dict, status: int) -> Response:
    resp = Response(json.dumps(data), status=status, mimetype="application/json")
    resp.headers["Cache-Control"] = "no-store"
    return resp
