"""The Python client of funnel-hpc's gRPC port (README "Python client").

``TesGrpcClient`` has the calls of the HTTP client (``funnel_hpc.core.client.TaskClient``:
create, get, list pages or all, cancel, wait, watch, service_info) and answers alike:
tasks as TES JSON dicts, events as the watch stream's dicts, every failure a
``ClientError`` whose ``status`` is the HTTP status of the gRPC code (NOT_FOUND: 404,
UNAVAILABLE: 503, ...) and ``server_message`` the server's own words. One difference:
proto3 cannot carry a field left at its default, so a task over gRPC lacks the fields
whose value is 0, "" or false (an exit_code of 0, say) where HTTP has them.

Credentials go in the ``authorization`` metadata entry (a bearer token, or a user name
and password as HTTP Basic). With ``retries`` > 0, UNAVAILABLE and RESOURCE_EXHAUSTED
are tried again after the server's ``retry-after`` trailing metadata (else 1, 2, 4... s;
at most ``max_retry_wait``). Cost: one channel (one HTTP/2 connection) per client;
``close()`` it, or use the client as a context manager.
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections.abc import Callable, Generator, Iterable
from typing import Any

import grpc
from google.protobuf import json_format

from funnel_hpc.core.client import ClientError, TaskClient, retry_after
from funnel_hpc.proto import funnel_events_pb2, funnel_events_pb2_grpc, tes_pb2, tes_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:9090"
AUTHORIZATION = "authorization"  # metadata keys (gRPC metadata keys are lower case)
RETRY_AFTER = "retry-after"      # whole seconds, set by the server with the error
LIST_PARAMS = ("name_prefix", "state", "tag_key", "tag_value", "page_size", "page_token",
               "view")
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
# A watch resumes after these (the server went away or shut the stream down).
RECONNECT_CODES = (*RETRY_CODES, grpc.StatusCode.CANCELLED)
KEEPALIVE_MS = 60_000  # pings on a quiet stream; the server's heartbeats are more often
# google.rpc.Code's HTTP mapping (google/rpc/code.proto)
HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DATA_LOSS: 500,
}


class TesGrpcClient(TaskClient):
    """A funnel-hpc server's gRPC port: tes.TaskService and funnel.v1.EventService."""

    def __init__(self, target: str = DEFAULT_TARGET, timeout: float = 30,
                 token: str | None = None, *, username: str | None = None,
                 password: str | None = None, retries: int = 0, max_retry_wait: float = 60,
                 credentials: grpc.ChannelCredentials | None = None):
        """``target``: host:port of ``server.grpc_port``. ``timeout``: seconds per call
        (a watch has none). ``token``: a bearer token, else ``username`` and
        ``password``: HTTP Basic, as the HTTP API. ``retries``: how often UNAVAILABLE or
        RESOURCE_EXHAUSTED is tried again (a CreateTask whose connection broke after the
        server took it may then create the task twice). ``credentials``: TLS (e.g.
        ``grpc.ssl_channel_credentials()``) to a proxy in front of the port; None: plain."""
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        options = [("grpc.max_receive_message_length", -1),  # FULL pages may be large
                   ("grpc.keepalive_time_ms", KEEPALIVE_MS),
                   # a restarted server is tried again within the client's longest wait
                   ("grpc.max_reconnect_backoff_ms", int(max(1.0, max_retry_wait) * 1000))]
        self.channel = (grpc.insecure_channel(target, options) if credentials is None
                        else grpc.secure_channel(target, credentials, options))
        self.tasks = tes_pb2_grpc.TaskServiceStub(self.channel)
        self.events = funnel_events_pb2_grpc.EventServiceStub(self.channel)
        self.closed = False
        self.metadata: tuple[tuple[str, str], ...] = ()
        if token:
            self.metadata = ((AUTHORIZATION, f"Bearer {token}"),)
        elif username is not None:
            basic = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self.metadata = ((AUTHORIZATION, f"Basic {basic}"),)

    def close(self) -> None:
        """Close the channel; open watches end (their generators return)."""
        self.closed = True
        self.channel.close()

    def __enter__(self) -> TesGrpcClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        """One unary call, tried again on RETRY_CODES while retries last; a ClientError
        for any failure."""
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout, metadata=self.metadata)
            except grpc.RpcError as exc:
                if exc.code() in RETRY_CODES and attempt < self.retries:
                    time.sleep(self._pause(exc, attempt))
                    continue
                raise client_error(exc) from None
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _pause(self, exc: grpc.RpcError, attempt: int) -> float:
        trailing = dict(exc.trailing_metadata() or ())
        return retry_after(trailing.get(RETRY_AFTER), attempt, self.max_retry_wait)

    def create(self, task: Any) -> str:
        """Create a task (a tesTask document, as for HTTP); return its id. A document
        that does not fit tes.Task is a ClientError (status 400) before anything is sent."""
        try:
            message = json_format.ParseDict(task, tes_pb2.Task())
        except json_format.ParseError as exc:
            raise ClientError(f"task: {exc}", 400) from None
        return str(self._call(self.tasks.CreateTask, message).id)

    def get(self, task_id: str, view: str = "MINIMAL") -> dict:
        """One task in a view: MINIMAL (id, state), BASIC or FULL."""
        return to_dict(self._call(self.tasks.GetTask,
                                  tes_pb2.GetTaskRequest(id=task_id, view=view)))

    def list_page(self, **params: Any) -> dict:
        """One ListTasks page: {"tasks": [...], "next_page_token": ...} (no token on the
        last page). Parameters as the HTTP API's: name_prefix, state (a state name),
        tag_key and tag_value (a string or a list), page_size, page_token, view; empty
        ones are left out; another name is a TypeError."""
        unknown = set(params) - set(LIST_PARAMS)
        if unknown:
            raise TypeError(f"list_page: unknown parameters {', '.join(sorted(unknown))}")
        given = {name: value for name, value in params.items() if value}
        request = tes_pb2.ListTasksRequest(
            name_prefix=given.get("name_prefix", ""), page_size=int(given.get("page_size", 0)),
            page_token=given.get("page_token", ""), view=given.get("view", ""),
            tag_key=_strings(given.get("tag_key", ())),
            tag_value=_strings(given.get("tag_value", ())))
        if "state" in given:
            if given["state"] not in tes_pb2.State.keys():
                raise ClientError(f"state: not a TES state: {given['state']!r}", 400)
            request.state = tes_pb2.State.Value(given["state"])
        page = to_dict(self._call(self.tasks.ListTasks, request))
        page.setdefault("tasks", [])
        return page

    def cancel(self, task_id: str) -> None:
        """Cancel a task (an ended task is left as it is)."""
        self._call(self.tasks.CancelTask, tes_pb2.CancelTaskRequest(id=task_id))

    def service_info(self) -> dict:
        """The server's GA4GH service-info document (the fields tes.proto has)."""
        return to_dict(self._call(self.tasks.GetServiceInfo, tes_pb2.GetServiceInfoRequest()))

    def watch(self, task_id: str | None = None, *, last_event_id: int | None = None,
              reconnect: bool = True) -> Generator[dict, None, None]:
        """Events of the caller's tasks (or one task) as they are recorded
        (funnel.v1.EventService/WatchEvents): dicts with id, task_id, owner, kind, time
        and payload, as the HTTP watch. ``last_event_id``: go on after that event (None:
        from now; 0: from the oldest kept). A stream the server drops (UNAVAILABLE,
        CANCELLED, RESOURCE_EXHAUSTED) is resumed from the last position seen while
        ``reconnect``, opening it tried again as any call while ``retries`` last;
        ``close()`` the generator to end the stream."""
        position = last_event_id
        while True:
            request = funnel_events_pb2.WatchEventsRequest(task_ids=[task_id] if task_id else [])
            if position is not None:
                request.after_id = position
            stream, first = self._open_watch(request)
            try:
                for response in itertools.chain([first], stream):
                    for event in response.events:
                        position = event.id
                        yield event_dict(event)
                    position = max(position or 0, response.position)
            except grpc.RpcError as exc:
                if self.closed:
                    return
                if not reconnect or exc.code() not in RECONNECT_CODES:
                    raise client_error(exc) from None
            finally:
                stream.cancel()
            if not reconnect or self.closed:
                return

    def _open_watch(self, request: funnel_events_pb2.WatchEventsRequest,
                    ) -> tuple[Any, funnel_events_pb2.WatchEventsResponse]:
        """A WatchEvents stream and its first message (its start position), tried again
        as a unary call is: the first message is what says the stream is open."""
        for attempt in range(self.retries + 1):
            stream = self.events.WatchEvents(request, metadata=self.metadata)
            try:
                return stream, next(stream)
            except grpc.RpcError as exc:
                stream.cancel()
                if exc.code() in RETRY_CODES and attempt < self.retries:
                    time.sleep(self._pause(exc, attempt))
                    continue
                raise client_error(exc) from None
            except StopIteration:
                raise ClientError(f"{self.target} ended the event stream at once") from None
        raise AssertionError("unreachable")  # the last attempt returns or raises


def client_error(exc: grpc.RpcError) -> ClientError:
    """A ClientError for a failed call: "<CODE>: <server's details>", the HTTP status of
    the code, the details as the server's message."""
    code, details = exc.code(), exc.details() or ""
    return ClientError(f"{code.name}: {details}", HTTP_STATUS.get(code, 500), details)


def to_dict(message: Any) -> dict:
    """A tes message as TES JSON (the field names of the proto, as HTTP's)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def event_dict(event: funnel_events_pb2.Event) -> dict:
    """A funnel.v1.Event as the watch stream's JSON document (README "Events format")."""
    return {"id": event.id, "task_id": event.task_id,
            "owner": event.owner if event.HasField("owner") else None,
            "kind": event.kind, "time": event.time, "payload": json.loads(event.payload_json)}


def _strings(value: str | Iterable[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)
