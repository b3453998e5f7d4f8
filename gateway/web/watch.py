"""Watch stream: GET /funnel/v1/events, task events as Server-Sent Events.

Each SSE message is one outbox event (gateway/store/outbox.py): ``id`` is its outbox id,
``event`` its kind, ``data`` its JSON document. A caller sees the events of the tasks
it may read through the API (``Principal.scope``: its own, or all for an admin);
``?task_id=`` narrows to one task (404 if the caller cannot read it). Resuming: the
``Last-Event-ID`` header (or ``?last_event_id=``, for a first connect) is the last id
seen; the stream goes on after it, with no gap and no repeat. Without either, it starts
at the newest event (the first block, ``id:`` without data, names that position).
Cost: each stream holds one server thread and reads the outbox
by primary key every ``events.watch.poll_seconds``; ``events.watch.max_clients``
streams at once, more get 503 with Retry-After.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, current_app, g, request

from funnel_hpc.gateway.access.watchers import READ_LIMIT, REFUSED, WatcherSlots
from funnel_hpc.gateway.store import db, outbox
from funnel_hpc.gateway.store.tasks import BadRequest, TaskService
from funnel_hpc.gateway.web.tes_routes import json_response

blueprint = Blueprint("funnel_watch", __name__, url_prefix="/funnel/v1")

EVENT_STREAM = "text/event-stream"
LAST_EVENT_ID = "Last-Event-ID"
RECONNECT_MS = 2000       # the `retry:` hint to EventSource clients
_ID = re.compile(r"[0-9]{1,18}")


def _slots(settings: dict) -> WatcherSlots:
    slots = current_app.extensions.get("funnel.watchers")
    if slots is None:
        slots = current_app.extensions["funnel.watchers"] = WatcherSlots(
            int(settings["max_clients"]), int(settings["max_clients_per_user"]))
    return slots


def _start_after(conn: Any) -> int:
    raw = request.headers.get(LAST_EVENT_ID) or request.args.get("last_event_id")
    if raw is None:
        return outbox.last_id(conn)
    if not _ID.fullmatch(raw.strip()):
        raise BadRequest(f"{LAST_EVENT_ID}: an event id (a non-negative integer) is required")
    return int(raw)


def message(event: outbox.Event) -> str:
    """One SSE message (the JSON has no newline, so one data line)."""
    data = json.dumps(event.document(), separators=(",", ":"))
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"


@blueprint.get("/events")
def watch() -> Response:
    service: TaskService = current_app.extensions["funnel.service"]
    settings = current_app.extensions["funnel.config"]["events"]["watch"]
    owner = g.funnel_principal.scope
    task_id = request.args.get("task_id")
    if task_id is not None:
        service.get_row(task_id, owner)  # 404 unless the caller may read it
    with db.reading(service.engine) as conn:
        after = _start_after(conn)
    slots = _slots(settings)
    user = g.funnel_principal.user
    refused = slots.take(user)
    if refused is not None:
        resp = json_response({"code": 503, "message": REFUSED[refused]}, 503)
        resp.headers["Retry-After"] = "5"
        return resp
    stream = _follow(service, after, owner, task_id, settings, lambda: slots.give(user))
    return Response(stream, mimetype=EVENT_STREAM,
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _follow(service: TaskService, after: int, owner: str | None, task_id: str | None,
            settings: dict, release: Callable[[], None]) -> Iterator[str]:
    """The stream body: events after ``after``, then new ones as they are recorded."""
    poll, heartbeat = float(settings["poll_seconds"]), float(settings["heartbeat_seconds"])
    gaps = outbox.GapGuard(float(service.config["events"]["gap_grace_seconds"]))
    try:
        # where the stream starts: a client reconnecting before any event resumes here
        yield f"retry: {RECONNECT_MS}\nid: {after}\n\n"
        quiet_since = time.monotonic()
        while True:
            with db.reading(service.engine) as conn:
                upto = gaps.settled(conn, after, READ_LIMIT * 2)
                events = outbox.read(conn, after, upto, owner=owner, task_id=task_id,
                                     limit=READ_LIMIT)
            if len(events) == READ_LIMIT:
                upto = events[-1].id  # more to read before the horizon
            if events:
                yield "".join(message(event) for event in events)
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= heartbeat:
                yield ": keep-alive\n\n"  # also how a closed connection is noticed
                quiet_since = time.monotonic()
            moved = upto != after
            after = upto
            if not moved:
                time.sleep(poll)
    finally:
        release()
