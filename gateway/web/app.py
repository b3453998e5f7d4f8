"""The Flask application: TES API, legacy routes, OpenAPI, error handling."""

from __future__ import annotations

import logging
import math
import secrets

from flask import Flask, Response, g, redirect, request, session, url_for
from flask.json.provider import DefaultJSONProvider
from flask_smorest import Api
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from funnel_hpc.core import __version__
from funnel_hpc.core.config import TEMPLATES_DIR, Config
from funnel_hpc.gateway.access.auth import Authenticator, AuthError, Throttled
from funnel_hpc.gateway.access.ratelimit import RateLimiter
from funnel_hpc.gateway.ops.readiness import RETRY_AFTER_SECONDS, Repeated
from funnel_hpc.gateway.store import db
from funnel_hpc.gateway.store.tasks import ServiceError, TaskService
from funnel_hpc.gateway.store.tes_schemas import flatten_errors
from funnel_hpc.gateway.web import headers
from funnel_hpc.gateway.web.dashboard import SESSION_ID, sessions
from funnel_hpc.gateway.web.dashboard import blueprint as dashboard_blueprint
from funnel_hpc.gateway.web.events_routes import blueprint as events_blueprint
from funnel_hpc.gateway.web.ops_routes import PUBLIC_ENDPOINTS as OBSERVABILITY_ENDPOINTS
from funnel_hpc.gateway.web.ops_routes import blueprint as observability_blueprint
from funnel_hpc.gateway.web.sessions import SessionStore
from funnel_hpc.gateway.web.tes_routes import (
    FUNNEL_SERVICE_INFO,
    LEGACY_PREFIX,
    TES_PREFIX,
    funnel_service_info,
    json_response,
    legacy_service_info,
    make_blueprint,
)
from funnel_hpc.gateway.web.watch import blueprint as watch_blueprint

log = logging.getLogger(__name__)
_repeated = Repeated(log)  # one line per 30 s for an outage, not one per request

# Reachable without credentials: the dashboard's login form and icon. (No "static" route:
# Flask's default one served the working directory's static/ folder.)
# + /metrics, /healthz, /readyz
PUBLIC_ENDPOINTS = {"dashboard.login", "dashboard.favicon", *OBSERVABILITY_ENDPOINTS}


def _worker_may(principal) -> bool:
    """A worker token's requests: its task's GET (any view) and its event intake."""
    task = principal.task
    allowed = {("GET", f"{TES_PREFIX}/tasks/{task}"), ("GET", f"{LEGACY_PREFIX}/tasks/{task}"),
               ("POST", f"/funnel/v1/tasks/{task}/events")}
    return (request.method, request.path) in allowed


def _dashboard_unavailable() -> Response:
    """The dashboard's page while the database is down: reloads itself every few seconds."""
    page = ("<!doctype html><html><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"refresh\" content=\"{RETRY_AFTER_SECONDS}\">"
            "<title>funnel-hpc: database unavailable</title></head><body>"
            "<h1>Database unavailable, retrying</h1><p>The gateway cannot reach its database "
            f"just now. This page tries again every {RETRY_AFTER_SECONDS} seconds.</p>"
            "</body></html>")
    resp = Response(page, status=503, mimetype="text/html")
    resp.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def make_service(config: Config) -> TaskService:
    engine = db.make_engine(config.database.url, config.database.sqlite_busy_timeout)
    db.upgrade(engine)
    return TaskService(engine, config)


class _UnsortedJSON(DefaultJSONProvider):
    """Flask's JSON, keys in the order the code wrote them."""

    sort_keys = False


class _FunnelFlask(Flask):
    """Flask with its JSON provider chosen at construction."""

    json_provider_class = _UnsortedJSON


def create_app(config: Config, service: TaskService | None = None) -> Flask:
    """The WSGI app over `service` (made from the configuration when not given): the
    Flask settings, the shared objects, the blueprints, the authentication hook and the
    error handlers, in that order (headers.install's hook must come first)."""
    app = _make_flask(config)
    authenticator = Authenticator(config.auth, config.work_dir)
    service = service or make_service(config)
    limiter = RateLimiter(config.server.rate_limit_per_second,
                          config.server.rate_limit_burst)
    auth = config.auth
    app.extensions.update({
        "funnel.auth": authenticator,
        "funnel.config": config,
        "funnel.service": service,
        "funnel.sessions": SessionStore(service.engine, auth.session_max_age_seconds),
        "funnel.limiter": limiter,  # shared with gRPC (gateway/cli/server.py)
    })
    headers.install(app, list(config.server.cors_origins))
    _register_routes(app)
    _install_authentication(app, authenticator, limiter)
    _install_error_handlers(app, config.server.max_body_bytes)
    return app


def _make_flask(config: Config) -> Flask:
    """The Flask app and its settings: body limit, OpenAPI document, session cookie."""
    auth = config.auth
    app = _FunnelFlask("funnel-hpc", static_folder=None, template_folder=str(TEMPLATES_DIR))
    app.config.update(
        MAX_CONTENT_LENGTH=config.server.max_body_bytes,
        API_TITLE="funnel-hpc Task Execution Service",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX=TES_PREFIX,
        OPENAPI_JSON_PATH="openapi.json",  # rendered by the dashboard's /docs, no CDN
    )
    app.config.update(SECRET_KEY=auth.session_secret or secrets.token_bytes(32),
                      SESSION_COOKIE_NAME="funnel_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax",
                      SESSION_COOKIE_SECURE=auth.session_cookie_secure,
                      PERMANENT_SESSION_LIFETIME=auth.session_max_age_seconds)
    return app


def _register_routes(app: Flask) -> None:
    """TES 1.1 and legacy routes (flask-smorest), worker events, watch, dashboard, ops."""
    api = Api(app)
    api.register_blueprint(make_blueprint("tes", TES_PREFIX))
    api.register_blueprint(make_blueprint("tes_legacy", LEGACY_PREFIX, legacy=True))
    app.add_url_rule(LEGACY_PREFIX + "/tasks/service-info", "legacy_service_info",
                     legacy_service_info)
    app.add_url_rule(FUNNEL_SERVICE_INFO, "funnel_service_info", funnel_service_info)
    app.register_blueprint(events_blueprint)
    app.register_blueprint(watch_blueprint)
    app.register_blueprint(dashboard_blueprint)
    app.register_blueprint(observability_blueprint)


def _install_authentication(app: Flask, authenticator: Authenticator,
                            limiter: RateLimiter) -> None:
    """Before each request: who is calling (g.funnel_principal), then their rate limit."""

    def rate_limit() -> Response | None:
        if not limiter.enabled:
            return None
        who = g.funnel_principal.user or f"addr:{request.remote_addr}"
        wait = limiter.check(who)
        if wait <= 0:
            return None
        resp = json_response({"code": 429, "message": "too many requests; slow down"}, 429)
        resp.headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return resp

    def session_user() -> str | None:
        """The user of the browser's live session (a user since removed from the
        configuration is signed out)."""
        session_id = session.get(SESSION_ID)
        user = sessions().user_of(session_id) if session_id else None
        return user if user in authenticator.users else None

    @app.before_request
    def _authenticate():
        """Set g.funnel_principal (the caller, for this request only), or answer 401 (API)
        / 429 (throttled) / go to the login page."""
        if request.endpoint in PUBLIC_ENDPOINTS:
            return None
        header = request.headers.get("Authorization")
        try:
            if header or not authenticator.enabled:
                g.funnel_principal = authenticator.authenticate(
                    header, allow_worker=True, client=request.remote_addr or "")
                if g.funnel_principal.task and not _worker_may(g.funnel_principal):
                    return json_response({"code": 403, "message": "a worker token reaches "
                                          "only its own task and event intake"}, 403)
                return rate_limit()
            user = session_user() if request.blueprint == "dashboard" else None
            if user:
                g.funnel_principal = authenticator.principal_for(user)
                return rate_limit()
            raise AuthError("authentication required")
        except Throttled as exc:
            resp = json_response({"code": 429, "message": str(exc)}, 429)
            resp.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
            return resp
        except AuthError as exc:
            if request.blueprint == "dashboard" and not header:
                return redirect(url_for("dashboard.login", next=request.full_path))
            resp = json_response({"code": 401, "message": str(exc)}, 401)
            resp.headers["WWW-Authenticate"] = authenticator.www_authenticate()
            return resp


def _install_error_handlers(app: Flask, max_body_bytes: int) -> None:
    """Every error as TES JSON {code, message}; an unreachable database is a 503 (the
    dashboard's page reloads itself) and every 503 says when to retry."""

    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError):
        return json_response({"code": exc.status, "message": exc.message}, exc.status)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_exc):
        return json_response({"code": 400, "message": f"body: larger than the "
                              f"{max_body_bytes}-byte limit"}, 400)

    @app.errorhandler(OperationalError)
    @app.errorhandler(InterfaceError)
    def _db_unavailable(exc: DBAPIError):
        _repeated.warning("database", "database unavailable: %s",
                          str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip()
                          else type(exc.orig).__name__)
        if request.blueprint == "dashboard":
            return _dashboard_unavailable()
        return json_response({"code": 503, "message": "database busy or unavailable; retry"}, 503)

    @app.after_request
    def _retry_after(resp):
        """Every 503 says when to try again (clients retry on it: core/client.py)."""
        if resp.status_code == 503 and "Retry-After" not in resp.headers:
            resp.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        data = getattr(exc, "data", None) or {}
        messages = data.get("messages")
        if messages:  # webargs validation of query parameters
            flat = flatten_errors(dict(messages))
            # drop the webargs location level ("query.view: ..." -> "view: ...")
            text = "; ".join(m.split(".", 1)[1] if m.split(".", 1)[0] in messages else m
                             for m in flat)
            return json_response({"code": exc.code, "message": text}, exc.code or 400)
        resp = json_response({"code": exc.code, "message": exc.description}, exc.code or 500)
        valid = getattr(exc, "valid_methods", None)
        if valid:  # 405 names what is allowed (RFC 9110)
            resp.headers["Allow"] = ", ".join(sorted(valid))
        return resp
