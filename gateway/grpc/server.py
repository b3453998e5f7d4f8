"""gRPC `tes.TaskService` and `funnel.v1.EventService` on their own port, over the same
TaskService and event outbox as HTTP.

Messages are converted to and from the TES JSON the service speaks with
google.protobuf.json_format, so validation, views, pagination, filters and
cancel are one code path whichever protocol a client uses. Errors map to
INVALID_ARGUMENT (bad input, message names the field), NOT_FOUND,
UNAUTHENTICATED, RESOURCE_EXHAUSTED (rate limit, sign-in throttle) and UNAVAILABLE
(database busy); a wait before trying again goes in the trailing metadata entry
``retry-after`` (whole seconds). EventService.WatchEvents is GET /funnel/v1/events as a
server stream: same owner filter and resume rule, at most ``events.watch.max_clients``
streams (counted apart from HTTP's), each holding one of ``server.threads`` and reading
the outbox every ``events.watch.poll_seconds``. Server reflection follows
``server.grpc_reflection`` (auto: only when auth is off); when on with auth, reflection
calls need credentials too.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_reflection.v1alpha import reflection
from sqlalchemy.exc import OperationalError

from funnel_hpc.core.config import Config
from funnel_hpc.gateway.access.auth import Authenticator, AuthError, Principal, Throttled
from funnel_hpc.gateway.access.ratelimit import RateLimiter
from funnel_hpc.gateway.access.watchers import READ_LIMIT, REFUSED, WatcherSlots
from funnel_hpc.gateway.store import db, outbox
from funnel_hpc.gateway.store.tasks import (
    BadRequest,
    Forbidden,
    ListQuery,
    NotFound,
    ServiceError,
    TaskService,
    Unavailable,
    zip_tags,
)
from funnel_hpc.proto import funnel_events_pb2, funnel_events_pb2_grpc, tes_pb2, tes_pb2_grpc
from funnel_hpc.proto.client import AUTHORIZATION, RETRY_AFTER

log = logging.getLogger(__name__)
VIEWS = tuple(tes_pb2.View.keys())  # MINIMAL, BASIC, FULL
WatchResponse = funnel_events_pb2.WatchEventsResponse
MAX_WATCHED_TASKS = 1000       # task_ids of one WatchEvents call (each is looked up)
STREAMS_FULL_RETRY_AFTER = 5   # seconds, as HTTP's 503 when max_clients streams are open
BATCH_BYTES = 1 << 20          # events per WatchEvents message (a single event may be more)
WARNING = "warning"            # trailing metadata: what CreateTask ignored (HTTP's Warning)


def to_message(document: dict, message: Any) -> Any:
    """TES JSON (a stored task, service-info) -> message; keys the proto lacks are dropped."""
    return json_format.ParseDict(document, message, ignore_unknown_fields=True)


def unknown_fields(message: Any, path: tuple[str, ...] = ()) -> list[str]:
    """Where a message holds fields its proto lacks, e.g. "executors.0.#17" (field 17 of
    the first executor): the client's proto is newer. Maps hold strings only: skipped."""
    numbers = sorted({field.field_number for field in UnknownFieldSet(message)})
    found = [".".join((*path, f"#{number}")) for number in numbers]
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None or descriptor.message_type.GetOptions().map_entry:
            continue
        if descriptor.is_repeated:
            for index, item in enumerate(value):
                found += unknown_fields(item, (*path, descriptor.name, str(index)))
        else:
            found += unknown_fields(value, (*path, descriptor.name))
    return found


def to_dict(message: Any) -> dict:
    """Message -> TES JSON. Fields left at their proto3 default (empty string, 0, false,
    first enum value) are not written: that is json_format's default, the
    including_default_value_fields=False of older protobuf releases."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class _Guarded:
    """What every call goes through: credentials, the rate limit, errors as status codes."""

    def __init__(self, service: TaskService, authenticator: Authenticator,
                 limiter: RateLimiter | None = None):
        self.service = service
        self.auth = authenticator
        self.limiter = limiter

    def _principal(self, context: grpc.ServicerContext) -> Principal:
        metadata = dict(context.invocation_metadata() or ())
        principal = self.auth.authenticate(metadata.get(AUTHORIZATION),
                                           client=_address(context))
        if self.limiter is not None and self.limiter.enabled:
            # the same buckets as HTTP: a client's calls count together on both
            wait = self.limiter.check(principal.user or f"addr:{_address(context)}")
            if wait > 0:
                abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"too many requests; retry in {wait:.1f} s", retry_after=wait)
        return principal

    @contextmanager
    def _statuses(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Aborts the call with the status code of a failure of its body."""
        try:
            yield
        except AuthError as exc:
            abort(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except Throttled as exc:
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                  retry_after=exc.retry_after)
        except BadRequest as exc:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        except NotFound as exc:
            abort(context, grpc.StatusCode.NOT_FOUND, exc.message)
        except Forbidden as exc:
            abort(context, grpc.StatusCode.PERMISSION_DENIED, exc.message)
        except Unavailable as exc:
            abort(context, grpc.StatusCode.UNAVAILABLE, exc.message,
                  retry_after=STREAMS_FULL_RETRY_AFTER)
        except ServiceError as exc:
            abort(context, grpc.StatusCode.INTERNAL, exc.message)
        except OperationalError:
            abort(context, grpc.StatusCode.UNAVAILABLE, "database busy or unavailable; retry")

    def _call(self, context: grpc.ServicerContext, fn: Callable[[Principal], Any]) -> Any:
        with self._statuses(context):
            return fn(self._principal(context))


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str,
          retry_after: float | None = None) -> NoReturn:
    """End the call with code and message; ``retry_after`` seconds go to the client as
    the trailing metadata entry RETRY_AFTER (whole seconds, as HTTP's Retry-After)."""
    if retry_after is not None:
        context.set_trailing_metadata(((RETRY_AFTER, str(max(1, math.ceil(retry_after)))),))
    context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


class TaskServicer(_Guarded, tes_pb2_grpc.TaskServiceServicer):
    """tes.TaskService over the TaskService of HTTP."""

    @staticmethod
    def _view(view: str) -> str:
        view = view or "MINIMAL"
        if view not in VIEWS:
            raise BadRequest(f"view: must be one of {', '.join(VIEWS)}, got {view!r}")
        return view

    def GetServiceInfo(self, request: tes_pb2.GetServiceInfoRequest,
                       context: grpc.ServicerContext) -> tes_pb2.ServiceInfo:
        def run(who: Principal) -> tes_pb2.ServiceInfo:
            return to_message(self.service.service_info(who.user), tes_pb2.ServiceInfo())
        return self._call(context, run)

    def CreateTask(self, request: tes_pb2.Task,
                   context: grpc.ServicerContext) -> tes_pb2.CreateTaskResponse:
        """A field this proto lacks (a later TES's) is ignored and named in the trailing
        metadata entry WARNING and the system logs, or refused (server.strict_fields)."""
        def run(who: Principal):
            task_id, notices = self.service.create_noting(
                to_dict(request), owner=who.user, unknown=unknown_fields(request))
            if notices:
                context.set_trailing_metadata([(WARNING, notice) for notice in notices])
            return tes_pb2.CreateTaskResponse(id=task_id)
        return self._call(context, run)

    def GetTask(self, request: tes_pb2.GetTaskRequest,
                context: grpc.ServicerContext) -> tes_pb2.Task:
        def run(who: Principal):
            task = self.service.get(request.id, self._view(request.view), owner=who.scope)
            return to_message(task, tes_pb2.Task())
        return self._call(context, run)

    def ListTasks(self, request: tes_pb2.ListTasksRequest,
                  context: grpc.ServicerContext) -> tes_pb2.ListTasksResponse:
        def run(who: Principal):
            state = tes_pb2.State.Name(request.state) if request.state else None
            query = ListQuery(view=self._view(request.view), page_size=request.page_size or None,
                              page_token=request.page_token or None,
                              name_prefix=request.name_prefix or None, state=state,
                              tags=zip_tags(request.tag_key, request.tag_value), owner=who.scope)
            with self.service.page_budget.hold() as hold:
                tasks, token = self.service.list(query, hold)
                response = tes_pb2.ListTasksResponse(
                    tasks=[to_message(t, tes_pb2.Task()) for t in tasks])
            if token:
                response.next_page_token = token
            return response
        return self._call(context, run)

    def CancelTask(self, request: tes_pb2.CancelTaskRequest,
                   context: grpc.ServicerContext) -> tes_pb2.CancelTaskResponse:
        def run(who: Principal):
            self.service.cancel(request.id, owner=who.scope)
            return tes_pb2.CancelTaskResponse()
        return self._call(context, run)


class EventServicer(_Guarded, funnel_events_pb2_grpc.EventServiceServicer):
    """funnel.v1.EventService: the watch stream of GET /funnel/v1/events (gateway/web/watch.py)
    as a server stream, with the same owner filter and resume rule."""

    def __init__(self, service: TaskService, authenticator: Authenticator,
                 limiter: RateLimiter | None = None):
        super().__init__(service, authenticator, limiter)
        self.settings = service.config.events.watch
        # counted apart from HTTP's streams: each holds one of this server's threads
        self.slots = WatcherSlots(self.settings.max_clients, self.settings.max_clients_per_user)

    def WatchEvents(self, request: funnel_events_pb2.WatchEventsRequest,
                    context: grpc.ServicerContext) -> Iterator[WatchResponse]:
        with self._statuses(context):
            who = self._principal(context)
            task_ids = self._readable(request.task_ids, who)
            if request.HasField("after_id") and request.after_id < 0:
                raise BadRequest("after_id: an event id (a non-negative integer) is required")
            with db.reading(self.service.engine) as conn:
                after = request.after_id if request.HasField("after_id") else \
                    outbox.last_id(conn)
        refused = self.slots.take(who.user)
        if refused is not None:
            abort(context, grpc.StatusCode.UNAVAILABLE, REFUSED[refused],
                  retry_after=STREAMS_FULL_RETRY_AFTER)
        ended = threading.Event()
        try:
            if not context.add_callback(ended.set):
                return  # the call has ended already
            with self._statuses(context):
                yield from self._follow(after, who.scope, task_ids, ended)
        finally:
            self.slots.give(who.user)

    def _readable(self, task_ids: Sequence[str], who: Principal) -> frozenset[str]:
        """The task ids asked for, each one the caller may read (else NotFound)."""
        if len(task_ids) > MAX_WATCHED_TASKS:
            raise BadRequest(f"task_ids: at most {MAX_WATCHED_TASKS} tasks")
        for task_id in task_ids:
            self.service.get_row(task_id, who.scope)
        return frozenset(task_ids)

    def _follow(self, after: int, owner: str | None, task_ids: frozenset[str],
                ended: threading.Event) -> Iterator[WatchResponse]:
        """The stream body: the start position, events after it, then new ones as they
        are recorded, and the position again after heartbeat_seconds without an event."""
        poll, heartbeat = self.settings.poll_seconds, self.settings.heartbeat_seconds
        gaps = outbox.GapGuard(self.service.config.events.gap_grace_seconds)
        only = next(iter(task_ids)) if len(task_ids) == 1 else None
        yield WatchResponse(position=after)
        quiet_since = time.monotonic()
        while not ended.is_set():
            with db.reading(self.service.engine) as conn:
                upto = gaps.settled(conn, after, READ_LIMIT * 2)
                events = outbox.read(conn, after, upto, owner=owner, task_id=only,
                                     limit=READ_LIMIT)
            if len(events) == READ_LIMIT:
                upto = events[-1].id  # more to read before the horizon
            wanted = [event for event in events if not task_ids or event.task_id in task_ids]
            if wanted:
                yield from batches(wanted, upto)
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= heartbeat:
                yield WatchResponse(position=upto)
                quiet_since = time.monotonic()
            moved = upto != after
            after = upto
            if not moved:
                ended.wait(poll)


def batches(events: list[outbox.Event], upto: int) -> Iterator[WatchResponse]:
    """The events in messages of about BATCH_BYTES (one message per event costs gRPC
    twice the time of SSE on a replay); the last one's position is ``upto``."""
    batch: list[funnel_events_pb2.Event] = []
    size = 0
    for event in events:
        batch.append(event_message(event))
        size += batch[-1].ByteSize()
        if size >= BATCH_BYTES:
            yield WatchResponse(events=batch, position=event.id)
            batch, size = [], 0
    if batch:
        yield WatchResponse(events=batch, position=upto)
    else:  # the last batch was full: a message without events moves the position
        yield WatchResponse(position=upto)


def event_message(event: outbox.Event) -> funnel_events_pb2.Event:
    """An outbox event as a funnel.v1.Event (the payload as compact JSON text)."""
    message = funnel_events_pb2.Event(id=event.id, task_id=event.task_id, kind=event.kind,
                                      time=event.time,
                                      payload_json=json.dumps(event.payload,
                                                              separators=(",", ":")))
    if event.owner is not None:
        message.owner = event.owner
    return message


def _address(context: grpc.ServicerContext) -> str:
    """The client's address without its port (peer is e.g. "ipv4:127.0.0.1:5555")."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    return rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else peer


class _ReflectionAuth(grpc.ServerInterceptor):
    """Reflection calls carry credentials like TaskService calls (when auth is on)."""

    def __init__(self, authenticator: Authenticator):
        self.auth = authenticator

    def intercept_service(self, continuation, handler_call_details):
        if not handler_call_details.method.startswith(f"/{reflection.SERVICE_NAME}/"):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        try:
            # no client address here (the interceptor has no peer): not throttled per
            # address, but a locked-out address cannot reach TaskService either
            if self.auth.authenticate(metadata.get(AUTHORIZATION)).task:
                raise AuthError("a worker token is only for its task's worker endpoints")
        except AuthError as exc:
            message = str(exc)

            def refuse(_request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            return grpc.stream_stream_rpc_method_handler(refuse)
        return continuation(handler_call_details)


def reflection_enabled(config: Config) -> bool:
    """server.grpc_reflection: true, false, or auto (on only when auth is off)."""
    setting = config.server.grpc_reflection
    if setting == "auto":
        return config.auth.mode == "none"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"server.grpc_reflection: must be auto, true or false, got {setting!r}")


def start_grpc_server(service: TaskService, config: Config,
                      authenticator: Authenticator | None = None,
                      limiter: RateLimiter | None = None) -> grpc.Server:
    """Start serving on server.host:server.grpc_port; returns the running server."""
    authenticator = authenticator or Authenticator(config.auth, config.work_dir)
    reflect = reflection_enabled(config)
    interceptors = [_ReflectionAuth(authenticator)] if reflect and authenticator.enabled else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.server.threads),
                         options=[("grpc.max_receive_message_length",
                                   config.server.max_body_bytes)],
                         interceptors=interceptors)
    tes_pb2_grpc.add_TaskServiceServicer_to_server(
        TaskServicer(service, authenticator, limiter), server)
    funnel_events_pb2_grpc.add_EventServiceServicer_to_server(
        EventServicer(service, authenticator, limiter), server)
    if reflect:
        names = (tes_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
                 funnel_events_pb2.DESCRIPTOR.services_by_name["EventService"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    address = f"{config.server.host}:{config.server.grpc_port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    server.start()
    log.info("gRPC tes.TaskService and funnel.v1.EventService on %s", address)
    return server
