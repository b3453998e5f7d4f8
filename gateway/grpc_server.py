"""gRPC `tes.TaskService` on its own port, over the same TaskService as HTTP.

Messages are converted to and from the TES JSON the service speaks with
google.protobuf.json_format, so validation, views, pagination, filters and
cancel are one code path whichever protocol a client uses. Errors map to
INVALID_ARGUMENT (bad input, message names the field), NOT_FOUND,
UNAUTHENTICATED, RESOURCE_EXHAUSTED (rate limit, sign-in throttle) and UNAVAILABLE
(database busy). Server reflection follows ``server.grpc_reflection`` (auto: only
when auth is off); when on with auth, reflection calls need credentials too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_reflection.v1alpha import reflection
from sqlalchemy.exc import OperationalError

from funnel_hpc.gateway.auth import Authenticator, AuthError, Principal, Throttled
from funnel_hpc.gateway.ratelimit import RateLimiter
from funnel_hpc.gateway.service import (
    BadRequest,
    ListQuery,
    NotFound,
    ServiceError,
    TaskService,
    zip_tags,
)
from funnel_hpc.proto import tes_pb2, tes_pb2_grpc

log = logging.getLogger(__name__)
VIEWS = tuple(tes_pb2.View.keys())  # MINIMAL, BASIC, FULL


def to_message(document: dict, message: Any) -> Any:
    """TES JSON (a stored task, service-info) -> message; keys the proto lacks are dropped."""
    return json_format.ParseDict(document, message, ignore_unknown_fields=True)


def to_dict(message: Any) -> dict:
    """Message -> TES JSON. Fields left at their proto3 default (empty string, 0, false,
    first enum value) are not written: that is json_format's default, the
    including_default_value_fields=False of older protobuf releases."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class TaskServicer(tes_pb2_grpc.TaskServiceServicer):
    def __init__(self, service: TaskService, authenticator: Authenticator,
                 limiter: RateLimiter | None = None):
        self.service = service
        self.auth = authenticator
        self.limiter = limiter

    def _call(self, context: grpc.ServicerContext, fn: Callable[[Principal], Any]) -> Any:
        metadata = dict(context.invocation_metadata() or ())
        try:
            principal = self.auth.authenticate(metadata.get("authorization"),
                                               client=_address(context))
            if self.limiter is not None and self.limiter.enabled:
                # the same buckets as HTTP: a client's calls count together on both
                wait = self.limiter.check(principal.user or f"addr:{_address(context)}")
                if wait > 0:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"too many requests; retry in {wait:.1f} s")
            return fn(principal)
        except AuthError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except Throttled as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except BadRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        except NotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, exc.message)
        except ServiceError as exc:
            context.abort(grpc.StatusCode.INTERNAL, exc.message)
        except OperationalError:
            context.abort(grpc.StatusCode.UNAVAILABLE, "database busy or unavailable; retry")

    @staticmethod
    def _view(view: str) -> str:
        view = view or "MINIMAL"
        if view not in VIEWS:
            raise BadRequest(f"view: must be one of {', '.join(VIEWS)}, got {view!r}")
        return view

    def GetServiceInfo(self, request: tes_pb2.GetServiceInfoRequest,
                       context: grpc.ServicerContext) -> tes_pb2.ServiceInfo:
        def run(_who: Principal) -> tes_pb2.ServiceInfo:
            return to_message(self.service.service_info(), tes_pb2.ServiceInfo())
        return self._call(context, run)

    def CreateTask(self, request: tes_pb2.Task,
                   context: grpc.ServicerContext) -> tes_pb2.CreateTaskResponse:
        def run(who: Principal):
            document = to_dict(request)
            return tes_pb2.CreateTaskResponse(id=self.service.create(document, owner=who.user))
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
            tasks, token = self.service.list(query)
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
            if self.auth.authenticate(metadata.get("authorization")).task:
                raise AuthError("a worker token is only for its task's worker endpoints")
        except AuthError as exc:
            message = str(exc)

            def refuse(_request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            return grpc.stream_stream_rpc_method_handler(refuse)
        return continuation(handler_call_details)


def reflection_enabled(config: dict) -> bool:
    """server.grpc_reflection: true, false, or auto (on only when auth is off)."""
    setting = config["server"]["grpc_reflection"]
    if setting == "auto":
        return config["auth"]["mode"] == "none"
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"server.grpc_reflection: must be auto, true or false, got {setting!r}")


def start_grpc_server(service: TaskService, config: dict,
                      authenticator: Authenticator | None = None,
                      limiter: RateLimiter | None = None) -> grpc.Server:
    """Start serving on server.host:server.grpc_port; returns the running server."""
    authenticator = authenticator or Authenticator(config)
    reflect = reflection_enabled(config)
    interceptors = [_ReflectionAuth(authenticator)] if reflect and authenticator.enabled else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config["server"]["threads"]),
                         options=[("grpc.max_receive_message_length",
                                   config["server"]["max_body_bytes"])],
                         interceptors=interceptors)
    tes_pb2_grpc.add_TaskServiceServicer_to_server(
        TaskServicer(service, authenticator, limiter), server)
    if reflect:
        names = (tes_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    address = f"{config['server']['host']}:{config['server']['grpc_port']}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    server.start()
    log.info("gRPC tes.TaskService on %s", address)
    return server
