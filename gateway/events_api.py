"""Worker event intake: POST /funnel/v1/tasks/<id>/events.

A worker started with --server sends each event it appends to its own
events.jsonl here as well. The gateway appends it to
<work_dir>/<id>/events.received.jsonl, which the reconciler folds together with
the worker's own file (events are de-duplicated by their seq), so tasks on
machines that do not share the work dir are tracked too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flask import Blueprint, current_app, request

from funnel_hpc.gateway.api import json_response, read_json_body
from funnel_hpc.gateway.service import BadRequest, TaskService
from funnel_hpc.core.states import is_terminal

blueprint = Blueprint("funnel_events", __name__, url_prefix="/funnel/v1")


@blueprint.post("/tasks/<string:task_id>/events")
def receive_event(task_id: str):
    service: TaskService = current_app.extensions["funnel.service"]
    principal = request.funnel_principal
    if not (principal.admin or principal.task == task_id):
        # a user could otherwise write the events (and so the outcome) of a task
        return json_response({"code": 403, "message": "events are accepted from the "
                              "task's worker (its worker token) or an admin only"}, 403)
    row = service.get_row(task_id)  # 404 for unknown ids
    event = read_json_body()
    if not isinstance(event, dict) or not isinstance(event.get("seq"), int) or event["seq"] < 1:
        raise BadRequest("body: an event object with a positive integer seq is required")
    if event.get("task_id") not in (None, task_id):
        raise BadRequest("task_id: does not match the URL")
    if is_terminal(row.state):
        return json_response({"accepted": False, "state": row.state})
    directory = Path(current_app.extensions["funnel.config"]["work_dir"]) / task_id
    directory.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
    fd = os.open(directory / "events.received.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    service.changed.set()
    return json_response({"accepted": True, "state": row.state})
