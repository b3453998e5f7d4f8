"""Worker event intake: POST /funnel/v1/tasks/<id>/events.

A worker started with --server sends each event it appends to its own
events.jsonl here as well. The gateway checks it (core/events.py check_event: a
known type, a worker state, an executor index within the task's executors,
bounded sizes, its task's id or none; anything else is a 400 naming the field) and
appends it to <work_dir>/.gateway/<id>/events.received.jsonl (gateway/reconcile/event_tail.py: a
700 directory of the gateway's, never the task dir, which may be the owner's: no link,
FIFO or file planted there can redirect or block the write), which the reconciler folds
together with the worker's own file (events are de-duplicated by their seq), so tasks on
machines that do not share the work dir are tracked too, and tells the reconciler
which task to look at (service.reconciler_queries.note_worker_event). Cost: one row
read and one appended line per event, plus one single-row UPDATE when the reconciler
runs in another process.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flask import Blueprint, current_app, g, request

from funnel_hpc.backends import files
from funnel_hpc.core.events import MAX_EVENT_BYTES, check_event, parse_line
from funnel_hpc.core.states import is_terminal
from funnel_hpc.gateway.store.task_dirs import GATEWAY_DIR, RECEIVED_EVENTS
from funnel_hpc.gateway.store.tasks import BadRequest, TaskService
from funnel_hpc.gateway.web.tes_routes import json_response

blueprint = Blueprint("funnel_events", __name__, url_prefix="/funnel/v1")

def _read_event() -> dict:
    raw = request.get_data(cache=False)
    if len(raw) > MAX_EVENT_BYTES:
        raise BadRequest(f"body: an event is at most {MAX_EVENT_BYTES} bytes")
    event = parse_line(raw)
    if event is None:
        raise BadRequest("body: a JSON event object is required")
    return event


@blueprint.post("/tasks/<string:task_id>/events")
def receive_event(task_id: str):
    service: TaskService = current_app.extensions["funnel.service"]
    principal = g.funnel_principal
    if not (principal.admin or principal.task == task_id):
        # a user could otherwise write the events (and so the outcome) of a task
        return json_response({"code": 403, "message": "events are accepted from the "
                              "task's worker (its worker token) or an admin only"}, 403)
    row = service.get_row(task_id)  # 404 for unknown ids
    event = _read_event()
    executors = row.spec.get("executors") if isinstance(row.spec, dict) else None
    problem = check_event(event, len(executors) if isinstance(executors, list) else None)
    if problem:
        raise BadRequest(problem)
    if event.get("task_id") not in (None, task_id):
        raise BadRequest("task_id: does not match the URL")
    if is_terminal(row.state):
        return json_response({"accepted": False, "state": row.state})
    line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
    append_received(current_app.extensions["funnel.config"].work_dir, task_id, line)
    # the reconciler reads this task's logs next tick
    service.reconciler_queries.note_worker_event(task_id)
    return json_response({"accepted": True, "state": row.state})


def append_received(work_dir: str | Path, task_id: str, line: bytes) -> None:
    """line appended to <work_dir>/.gateway/<task id>/events.received.jsonl, in one write;
    the directories are made 700 when missing, nothing is followed or opened that is not
    a regular file of the gateway's. Raises OSError."""
    work_fd = files.open_work_dir(work_dir)
    try:
        gateway_fd = files.make_subdir(work_fd, GATEWAY_DIR)
    finally:
        os.close(work_fd)
    try:
        dir_fd = files.make_subdir(gateway_fd, task_id)
    finally:
        os.close(gateway_fd)
    try:
        fd = files.open_append(dir_fd, RECEIVED_EVENTS, os.geteuid())
    finally:
        os.close(dir_fd)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
