"""The web dashboard at /: task list, task page, backend health, service info, API docs.

Server-rendered Jinja2 pages (templates/dashboard/, package data); a few lines of
plain JavaScript, loaded with the page's CSP nonce, refresh the changing part of a
page in place (no build step, nothing from another site). Signing in puts a random
session id in the signed session cookie and its hash in the database
(gateway/web/sessions.py): signing out revokes it on every replica. Every POST form
(cancel, sign in, sign out) carries a CSRF token derived from the session: an
HMAC, under the app's secret key, of the session id (or of a random per-browser
nonce before sign-in), so a token is worth nothing with another session's cookie.
The backend health panel (gateway/store/backend_health.py) holds no task data: every
signed-in user sees the same one.

Times show relative to the server's clock ("3 min ago") in a <time> element whose title
holds the absolute UTC time; the list pages with previous/next links and a total
(gateway/web/dashboard_pager.py); the icon is an inline
SVG served at /favicon.ico (public, like the sign-in form).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import socket
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from markupsafe import Markup, escape
from sqlalchemy.exc import OperationalError

from funnel_hpc.core.quotas import QuotaPolicy
from funnel_hpc.core.states import ALL_STATES, TERMINAL, State
from funnel_hpc.gateway.access.auth import Throttled
from funnel_hpc.gateway.store.tasks import (
    BadRequest,
    ListQuery,
    NotFound,
    TaskService,
)
from funnel_hpc.gateway.web import dashboard_chart, dashboard_pager
from funnel_hpc.gateway.web.dashboard_chart import clock
from funnel_hpc.gateway.web.sessions import SessionStore
from funnel_hpc.gateway.web.tes_routes import TES_PREFIX, principal

blueprint = Blueprint("dashboard", __name__, template_folder=None)

PAGE_SIZE = 50
SESSION_ID = "sid"      # session cookie key of a signed-in session's id
BROWSER_NONCE = "nonce"  # session cookie key of the pre-sign-in CSRF nonce
# A local path: one "/", then no "/" or "\" (no //host, /\host), no control
# characters, spaces or backslashes anywhere (browsers drop tabs: "/\t/evil" is //evil).
_LOCAL_PATH = re.compile(r"/(?:[^/\\\x00-\x20\x7f][^\\\x00-\x20\x7f]*)?")
FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
           '<rect width="16" height="16" rx="3" fill="#23395d"/>'
           '<path d="M3 4h10l-4 5v4l-2-1V9z" fill="#fff"/></svg>')


def _service() -> TaskService:
    return current_app.extensions["funnel.service"]


def sessions() -> SessionStore:
    return current_app.extensions["funnel.sessions"]


def _owner() -> str | None:
    """Owner filter of the signed-in user (None: sees every task)."""
    return principal().scope


def csrf_token() -> str:
    """HMAC of this browser's session id (or pre-sign-in nonce) under the secret key."""
    key = session.get(SESSION_ID) or session.get(BROWSER_NONCE)
    if not key:
        key = session[BROWSER_NONCE] = secrets.token_urlsafe(24)
    secret = current_app.secret_key
    assert isinstance(secret, (bytes, str))
    secret_bytes = secret if isinstance(secret, bytes) else secret.encode()
    return hmac.new(secret_bytes, b"csrf\0" + key.encode(), hashlib.sha256).hexdigest()


def _check_csrf() -> bool:
    return hmac.compare_digest(csrf_token(), request.form.get("csrf_token", ""))


def _render(template: str, status: int = 200, **context: Any) -> Response:
    signed_in = principal().user if session.get(SESSION_ID) else None
    # The navigation leads to pages a visitor may see: none while signed out
    show_nav = bool(signed_in) or not current_app.extensions["funnel.auth"].enabled
    body = render_template(f"dashboard/{template}", csrf_token=csrf_token(),
                           csp_nonce=g.get("csp_nonce", ""), signed_in=signed_in,
                           show_nav=show_nav, **context)
    return Response(body, status=status, mimetype="text/html")


def replica() -> str:
    """This process as host:pid, as backend_health and the lease holders name it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _seconds(text: str | None) -> float | None:
    """An RFC 3339 time as the server writes it -> seconds since the epoch."""
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp() \
            if text else None
    except (ValueError, OverflowError, OSError):
        return None


def relative(delta: float) -> str:
    """How long ago, in words a person reads at a glance: "just now", "42 s ago", "3 min
    ago", "2 h 5 min ago", "4 days ago"."""
    if delta < 5:
        return "just now"  # also a little in the future: clocks of replicas differ
    if delta < 60:
        return f"{int(delta)} s ago"
    if delta < 3600:
        return f"{int(delta // 60)} min ago"
    if delta < 86400:
        hours, minutes = divmod(int(delta // 60), 60)
        return f"{hours} h {minutes} min ago" if minutes else f"{hours} h ago"
    days = int(delta // 86400)
    return f"{days} day{'s' if days > 1 else ''} ago"


@blueprint.app_template_filter("when")
def when(value: str | float | None, now: float | None = None) -> Markup | str:
    """An RFC 3339 text or seconds since the epoch as <time datetime=... title=absolute>
    relative</time>; "-" if missing or unreadable. now: the clock to compare with
    (default this machine's)."""
    seconds = value if isinstance(value, (int, float)) else _seconds(value)
    try:  # times in logs come from workers: a year 0 or 10000 must not break the page
        stamp = datetime.fromtimestamp(seconds, UTC) if seconds is not None else None
    except (ValueError, OverflowError, OSError):
        stamp = None
    if stamp is None or seconds is None:
        return "-"
    now = time.time() if now is None else now
    return Markup('<time datetime="{}" title="{}">{}</time>').format(
        stamp.strftime("%Y-%m-%dT%H:%M:%SZ"), stamp.strftime("%Y-%m-%d %H:%M:%S UTC"),
        escape(relative(now - seconds)))


@blueprint.app_template_filter("timing")
def timing(task: dict[str, Any]) -> dict[str, str]:
    """{"queue_wait": creation to the first attempt's start, "run_time": the last attempt's
    start to its end (to now while the task runs)}, as h:mm:ss / m:ss, "-" if unknown."""
    attempts = task.get("logs") or []
    created = _seconds(task.get("creation_time"))
    first = _seconds(attempts[0].get("start_time")) if attempts else None
    start = _seconds(attempts[-1].get("start_time")) if attempts else None
    end = _seconds(attempts[-1].get("end_time")) if attempts else None
    running = task.get("state") not in {state.value for state in TERMINAL}
    if start is not None and end is None and running:
        end = time.time()
    return {"queue_wait": clock(first - created) if first and created else "-",
            "run_time": clock(end - start) if start is not None and end is not None else "-"}


@blueprint.app_template_filter("utc")
def utc(seconds: float | None) -> str:
    """Seconds since the epoch as "YYYY-MM-DD HH:MM:SSZ" ("-" if None)."""
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


@blueprint.app_template_filter("age")
def age(seconds: float | None, now: float) -> str:
    """How long before now (both seconds since the epoch), as h:mm:ss / m:ss."""
    return clock(now - seconds if seconds is not None else None)


def _parse_tag(text: str) -> dict[str, str]:
    if not text:
        return {}
    key, _, value = text.partition("=")
    if not key.strip():
        raise BadRequest("tag: expected KEY=VALUE or KEY")
    return {key.strip(): value.strip()}


@blueprint.get("/")
def task_list():
    state = request.args.get("state", "")
    name_prefix = request.args.get("name_prefix", "")
    tag = request.args.get("tag", "")
    token = request.args.get("page_token", "")
    fragment = request.args.get("fragment") == "1"
    filters = {"state": state, "name_prefix": name_prefix, "tag": tag}
    error = None
    tasks: list[dict] = []
    instances: dict[str, str] = {}  # task id -> its backend instance
    counts: dict[str, int] = {}
    pager: dict[str, Any] = {}
    try:
        if state and state not in ALL_STATES:
            raise BadRequest(f"state: unknown state {state!r}")
        trail = dashboard_pager.parse_trail(request.args.get("back", ""))
        query = ListQuery(view="BASIC", page_size=PAGE_SIZE, page_token=token or None,
                          name_prefix=name_prefix or None, state=state or None,
                          tags=_parse_tag(tag), owner=_owner())
        tasks, next_token = _service().list(query)
        instances = _service().instances_of([task["id"] for task in tasks])
        counts = _service().state_counts(owner=_owner())
        pager = dashboard_pager.pager(_service(), query, counts, trail, len(tasks),
                                      next_token, filters)
    except BadRequest as exc:
        error = exc.message
    # a database outage: the app's 503 page (gateway/web/app.py), which reloads itself
    template = "_task_rows.html" if fragment else "tasks.html"
    chart = None if fragment or error else _chart()
    health = {} if fragment else _health()
    return _render(template, tasks=tasks, instances=instances, pager=pager, counts=counts,
                   chart=chart, states=ALL_STATES, filters=filters, error=error, page_token=token,
                   total=sum(counts.values()), status=400 if error and not fragment else 200,
                   **health)


def _chart() -> dict[str, Any] | None:
    """The activity chart's data (None, and the page without it, if the query fails)."""
    try:
        return dashboard_chart.finished(_service().engine, _owner())
    except OperationalError:
        return None


def _health() -> dict[str, Any]:
    """The backend health panel's variables: backend-level only, the same for every user."""
    from funnel_hpc.gateway.store import backend_health

    try:
        health, now = backend_health.overview(_service().engine, _service().config)
    except OperationalError:
        return {"health": [], "now": time.time(), "replica": replica(), "kinds": _kinds(),
                "health_error": "The database is busy or unavailable; this panel will retry."}
    return {"health": health, "now": now, "health_error": None, "replica": replica(),
            "kinds": _kinds()}


def _kinds() -> dict[str, str]:
    """Each configured backend instance's kind, by name."""
    return {instance.name: instance.kind for instance in _service().config.instances()}


@blueprint.get("/backends")
def backends():
    """Each backend's last poll, last error and reconciler lease (also a fragment)."""
    fragment = request.args.get("fragment") == "1"
    return _render("_health.html" if fragment else "backends.html", **_health())


@blueprint.get("/favicon.ico")
def favicon():
    """The icon, an inline SVG: browsers ask for it on every page, signed in or not."""
    resp = Response(FAVICON, mimetype="image/svg+xml")
    resp.headers["Cache-Control"] = "public, max-age=86400"
    return resp


@blueprint.get("/tasks/<string:task_id>")
def task_page(task_id: str):
    fragment = request.args.get("fragment") == "1"
    try:
        task = _service().get(task_id, "FULL", owner=_owner())
    except NotFound:
        return _render("not_found.html", status=404, task_id=task_id)
    job_ids = [log.get("metadata", {}).get("job_id") for log in task.get("logs", [])]
    instance = _service().instances_of([task_id]).get(task_id)
    return _render("_task_detail.html" if fragment else "task.html", task=task,
                   instance=instance,
                   job_ids=[j for j in job_ids if j], terminal=State(task["state"]) in TERMINAL)


@blueprint.post("/tasks/<string:task_id>/cancel")
def cancel(task_id: str):
    if not _check_csrf():
        abort(Response("CSRF token missing or wrong; reload the page and try again.", 403))
    try:
        _service().cancel(task_id, owner=_owner())
    except NotFound:
        return _render("not_found.html", status=404, task_id=task_id)
    return redirect(url_for("dashboard.task_page", task_id=task_id), code=303)


@blueprint.get("/service")
def service_info():
    return _render("service.html", info=_service().service_info(principal().user,
                                                                  extended=True))


@blueprint.get(TES_PREFIX + "/docs")
def api_docs():
    """The API's operations, rendered in the browser from openapi.json (no CDN)."""
    return _render("docs.html", spec_url=url_for("api-docs.openapi_json"))


def safe_next(target: str | None) -> str:
    """Only local paths: never redirect a signed-in user off this site."""
    if target and _LOCAL_PATH.fullmatch(target):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return url_for("dashboard.task_list")


def _throttled(exc: Throttled, auth: Any) -> Response:
    resp = _render("login.html", status=429, error="Too many sign-in attempts; wait "
                   f"{math.ceil(exc.retry_after)} s and try again.",
                   basic_enabled="basic" in auth.mode,
                   username=request.form.get("username", ""))
    resp.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return resp


@blueprint.route("/login", methods=["GET", "POST"])
def login():
    auth = current_app.extensions["funnel.auth"]
    error = None
    if request.method == "POST":
        if not _check_csrf():
            error = "The form expired; please try again."
        else:
            try:
                who = auth.login(request.form.get("username", ""),
                                 request.form.get("password", ""), request.remote_addr or "")
            except Throttled as exc:
                return _throttled(exc, auth)
            if who is not None:
                session.clear()  # a fresh session id: no fixation
                session[SESSION_ID] = sessions().create(who.user)
                session.permanent = True
                return redirect(safe_next(request.args.get("next")), code=303)
            error = "Wrong user name or password."
    # a failed attempt keeps the user name typed (never the password)
    return _render("login.html", status=401 if error else 200, error=error,
                   basic_enabled="basic" in auth.mode,
                   username=request.form.get("username", "") if error else "")


@blueprint.post("/logout")
def logout():
    if not _check_csrf():
        abort(Response("CSRF token missing or wrong; reload the page and try again.", 403))
    session_id = session.get(SESSION_ID)
    if session_id:
        sessions().revoke(session_id)
    session.clear()
    return redirect(url_for("dashboard.login"), code=303)


@blueprint.app_template_global("is_admin")
def is_admin() -> bool:
    """Whether the caller sees every task (the navigation's admin-only links)."""
    return principal().scope is None


@blueprint.get("/owners")
def owners():
    """Admins: what each owner has in flight and waiting, against limits.per_owner."""
    from funnel_hpc.gateway.web.dashboard_owners import owner_rows

    if not is_admin():
        abort(Response("Only administrators see the owners page.", 403))
    # the service's cached group lookup, as routing's
    policy = QuotaPolicy(_service().config.limits.per_owner, _service().placement.groups)
    rows, total = owner_rows(_service().engine, policy)
    return _render("owners.html", rows=rows, total=total, shown=len(rows),
                   enabled=policy.enabled)
