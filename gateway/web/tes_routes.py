"""TES 1.1 HTTP API (flask-smorest): /ga4gh/tes/v1/... and the legacy /v1/... routes.

Every route calls the shared TaskService; errors are JSON
``{"code": <http status>, "message": "<field>: <what is wrong>"}``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from flask import Response, current_app, g, request
from flask.views import MethodView
from flask_smorest import Blueprint

from funnel_hpc.core.states import LEGACY_STATES
from funnel_hpc.gateway.access.auth import ANONYMOUS_ADMIN, Principal
from funnel_hpc.gateway.store.task_views import tes10_service_info, tes10_task
from funnel_hpc.gateway.store.tasks import BadRequest, ListQuery, TaskService, zip_tags
from funnel_hpc.gateway.store.tes_schemas import (
    ApiErrorSchema,
    CancelTaskResponseSchema,
    CreateTaskResponseSchema,
    ListArgsSchema,
    ListTasksResponseSchema,
    ServiceInfoSchema,
    TaskCreateSchema,
    TaskSchema,
    ViewArgsSchema,
)

# the response header naming what a create ignored (RFC 7234 section 5.5; 299: a
# persistent warning, "-": no agent named)
WARNING = "Warning"

TES_PREFIX = "/ga4gh/tes/v1"
FUNNEL_SERVICE_INFO = "/funnel/v1/service-info"  # with the backend instances
LEGACY_PREFIX = "/v1"


def json_response(payload: Any, status: int = 200) -> Response:
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    # a lone surrogate (from a client's "\udc00", echoed in an error) cannot be UTF-8;
    # backslashreplace writes it back as that same JSON escape
    body = text.encode("utf-8", "backslashreplace")
    return Response(body, status=status, mimetype="application/json")


def service() -> TaskService:
    return current_app.extensions["funnel.service"]


def principal() -> Principal:
    """The caller, set by the app's authentication hook."""
    return g.get("funnel_principal", ANONYMOUS_ADMIN)


def read_json_body() -> Any:
    raw = request.get_data(cache=False)
    if not raw.strip():
        raise BadRequest("body: a JSON task document is required")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body: malformed JSON: {exc}") from None
    except RecursionError:  # "[" * 100000: no TES document nests that deep
        raise BadRequest("body: JSON nested too deeply") from None


Shown = Callable[[dict[str, Any]], dict[str, Any]]  # a task as the routes' clients see it
_ERRORS = {400: "Bad input; message names the field", 404: "No such task",
           403: "The caller may not own tasks here (the owner policy); message names the rule"}


def as_legacy(task: dict[str, Any]) -> dict[str, Any]:
    """The task as a TES 1.0 client on the legacy routes must see it: TES 1.0 states
    (LEGACY_STATES) and fields (views.tes10_task)."""
    state = task.get("state")
    if state in LEGACY_STATES:
        task = {**task, "state": LEGACY_STATES[state]}
    return tes10_task(task)


def make_blueprint(name: str, prefix: str, legacy: bool = False) -> Blueprint:
    """The TES routes under `prefix` (called twice: TES 1.1 and legacy /v1)."""
    shown = as_legacy if legacy else _as_is
    blp = Blueprint(name, __name__, url_prefix=prefix,
                    description="GA4GH TES 1.1" + (" (legacy /v1 routes)" if legacy else ""))
    _add_service_info(blp)
    _add_tasks(blp, shown)
    _add_task(blp, shown)
    _add_cancel(blp)
    return blp


def _as_is(task: dict[str, Any]) -> dict[str, Any]:
    return task


def _errors(blp: Blueprint, *codes: int) -> Callable[[Any], Any]:
    """Document the route's error answers (ApiErrorSchema) in the OpenAPI document."""
    def wrap(fn: Any) -> Any:
        for code in codes:
            fn = blp.alt_response(code, schema=ApiErrorSchema, description=_ERRORS[code])(fn)
        return fn
    return wrap


def _add_service_info(blp: Blueprint) -> None:
    @blp.route("/service-info")
    class ServiceInfo(MethodView):
        @blp.response(200, ServiceInfoSchema)
        @_errors(blp, 400)
        def get(self):
            """GetServiceInfo"""
            return json_response(service().service_info(principal().user))


def _add_tasks(blp: Blueprint, shown: Shown) -> None:
    @blp.route("/tasks")
    class Tasks(MethodView):
        @blp.arguments(ListArgsSchema, location="query", error_status_code=400, as_kwargs=True)
        @blp.response(200, ListTasksResponseSchema)
        @blp.alt_response(431, description="Request headers (the query) too large",
                          content_type="text/plain", schema={"type": "string"})
        @_errors(blp, 400)
        def get(self, view="MINIMAL", **args):
            """ListTasks"""
            query = ListQuery(view=view, page_size=args.get("page_size"),
                              page_token=args.get("page_token"),
                              name_prefix=args.get("name_prefix"), state=args.get("state"),
                              tags=zip_tags(args.get("tag_key"), args.get("tag_value")),
                              owner=principal().scope)
            hold = service().page_budget.hold()
            try:
                tasks, token = service().list(query, hold)
                payload: dict[str, Any] = {"tasks": [shown(task) for task in tasks]}
                if token:
                    payload["next_page_token"] = token
                del tasks
                resp = json_response(payload)
            except BaseException:
                hold.release()
                raise
            resp.call_on_close(hold.release)  # the body is held until it is sent
            return resp

        @blp.doc(requestBody={"required": True,
                              "content": {"application/json": {"schema": TaskCreateSchema}}})
        @blp.response(200, CreateTaskResponseSchema, headers={WARNING: {
            "description": 'Fields the server ignored, e.g. 299 - "unknown fields ignored: '
                           'executors.0.foo, bar" (refused instead with '
                           "server.strict_fields)",
            "schema": {"type": "string"}}})
        @_errors(blp, 400, 403)
        def post(self):
            """CreateTask"""
            task_id, notices = service().create_noting(read_json_body(), owner=principal().user)
            response = json_response({"id": task_id})
            for notice in notices:  # printable ASCII, quotes escaped (ignored_fields_notice)
                response.headers.add(WARNING, f'299 - "{notice}"')
            return response


def _add_task(blp: Blueprint, shown: Shown) -> None:
    @blp.route("/tasks/<string:task_id>")
    class Task(MethodView):
        @blp.arguments(ViewArgsSchema, location="query", error_status_code=400, as_kwargs=True)
        @blp.response(200, TaskSchema)
        @_errors(blp, 400, 404)
        def get(self, task_id, view="MINIMAL"):
            """GetTask"""
            return json_response(shown(service().get(task_id, view, owner=principal().scope)))


def _add_cancel(blp: Blueprint) -> None:
    @blp.route("/tasks/<string:task_id>:cancel")
    class CancelTask(MethodView):
        @blp.response(200, CancelTaskResponseSchema)
        @_errors(blp, 400, 404)
        def post(self, task_id):
            """CancelTask: no change (still 200) when the task already ended."""
            service().cancel(task_id, owner=principal().scope)
            return json_response({})


def funnel_service_info():
    """GET /funnel/v1/service-info: TES 1.1's service-info plus its "funnel_hpc" key, the
    backend instances the caller's tasks may be routed to. /ga4gh/tes/v1/service-info
    leaves that key out: valid TES (service-info allows more properties), but py-tes's
    model refuses any key it lacks."""
    return json_response(service().service_info(principal().user, extended=True))


def legacy_service_info():
    """TES 0.x/1.0 clients (py-tes 0.4.2) ask /v1/tasks/service-info for TES 1.0's
    tesServiceInfo, {name, doc, storage}: its model refuses any other field (not in the
    OpenAPI document; /v1/service-info answers TES 1.1's)."""
    return json_response(tes10_service_info(service().service_info()))
