"""The web dashboard at /: task list, task page, service info.

Server-rendered Jinja2 pages (templates/dashboard/); a few lines of plain
JavaScript refresh the changing part of a page in place (no build step).
Cancel is a POST form protected by a double-submit CSRF token: a random
token in a SameSite=Strict cookie that the form must repeat.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from flask import (Blueprint, Response, abort, current_app, redirect, render_template, request,
                   session, url_for)
from sqlalchemy.exc import OperationalError

from funnel_hpc.gateway.api import principal
from funnel_hpc.gateway.service import BadRequest, ListQuery, NotFound, TaskService
from funnel_hpc.core.states import ALL_STATES, TERMINAL, State

blueprint = Blueprint("dashboard", __name__, template_folder=None)

CSRF_COOKIE = "funnel_csrf"
PAGE_SIZE = 50


def _service() -> TaskService:
    return current_app.extensions["funnel.service"]


def _owner() -> str | None:
    """Owner filter of the signed-in user (None: sees every task)."""
    return principal().scope


def _csrf_token() -> str:
    return request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)


def _render(template: str, status: int = 200, **context: Any) -> Response:
    token = _csrf_token()
    body = render_template(f"dashboard/{template}", csrf_token=token, **context)
    resp = Response(body, status=status, mimetype="text/html")
    if request.cookies.get(CSRF_COOKIE) != token:
        resp.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="Strict")
    return resp


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
    error = None
    tasks: list[dict] = []
    next_token = None
    counts: dict[str, int] = {}
    try:
        if state and state not in ALL_STATES:
            raise BadRequest(f"state: unknown state {state!r}")
        query = ListQuery(view="BASIC", page_size=PAGE_SIZE, page_token=token or None,
                          name_prefix=name_prefix or None, state=state or None,
                          tags=_parse_tag(tag), owner=_owner())
        tasks, next_token = _service().list(query)
        counts = _service().state_counts(owner=_owner())
    except BadRequest as exc:
        error = exc.message
    except OperationalError:
        error = "The database is busy or unavailable; this page will retry."
    filters = {"state": state, "name_prefix": name_prefix, "tag": tag}
    template = "_task_rows.html" if fragment else "tasks.html"
    return _render(template, tasks=tasks, next_token=next_token, counts=counts,
                   states=ALL_STATES, filters=filters, error=error, page_token=token,
                   total=sum(counts.values()), status=400 if error and not fragment else 200)


@blueprint.get("/tasks/<string:task_id>")
def task_page(task_id: str):
    fragment = request.args.get("fragment") == "1"
    try:
        task = _service().get(task_id, "FULL", owner=_owner())
    except NotFound:
        return _render("not_found.html", status=404, task_id=task_id)
    job_ids = [log.get("metadata", {}).get("job_id") for log in task.get("logs", [])]
    context = dict(task=task, job_ids=[j for j in job_ids if j],
                   terminal=State(task["state"]) in TERMINAL)
    return _render("_task_detail.html" if fragment else "task.html", **context)


@blueprint.post("/tasks/<string:task_id>/cancel")
def cancel(task_id: str):
    cookie = request.cookies.get(CSRF_COOKIE, "")
    form = request.form.get("csrf_token", "")
    if not cookie or not hmac.compare_digest(cookie, form):
        abort(Response("CSRF token missing or wrong; reload the page and try again.", 403))
    try:
        _service().cancel(task_id, owner=_owner())
    except NotFound:
        return _render("not_found.html", status=404, task_id=task_id)
    return redirect(url_for("dashboard.task_page", task_id=task_id), code=303)


@blueprint.get("/service")
def service_info():
    return _render("service.html", info=_service().service_info())


def _safe_next(target: str | None) -> str:
    """Only local paths: never redirect a signed-in user off this site."""
    if target and target.startswith("/") and not target.startswith("//"):
        return target
    return url_for("dashboard.task_list")


@blueprint.route("/login", methods=["GET", "POST"])
def login():
    auth = current_app.extensions["funnel.auth"]
    error = None
    if request.method == "POST":
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not cookie or not hmac.compare_digest(cookie, request.form.get("csrf_token", "")):
            error = "The form expired; please try again."
        else:
            who = auth.check_password(request.form.get("username", ""),
                                      request.form.get("password", ""))
            if who is not None:
                session.clear()
                session["user"] = who.user
                return redirect(_safe_next(request.args.get("next")), code=303)
            error = "Wrong user name or password."
    return _render("login.html", status=401 if error else 200, error=error,
                   basic_enabled="basic" in auth.mode)


@blueprint.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("dashboard.login"), code=303)
