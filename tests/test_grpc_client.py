"""The gRPC client (proto/client.py) against a scripted tes.TaskService: UNAVAILABLE and
RESOURCE_EXHAUSTED tried again after the server's retry-after, other codes at once, with
the server's message and the HTTP status of the code; credentials in the metadata. The
calls themselves run on a real server in tests/test_client.py (over both transports)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from funnel_hpc.core.client import ClientError
from funnel_hpc.proto import tes_pb2, tes_pb2_grpc
from funnel_hpc.proto.client import TesGrpcClient
from tests.server_helpers import free_port

Answer = tuple[grpc.StatusCode, str, str | None]  # code, details, retry-after


class ScriptedTaskService(tes_pb2_grpc.TaskServiceServicer):
    """GetTask answers ``answers`` in turn (the last one repeats): an error (code,
    details, retry-after) or, for grpc.StatusCode.OK, the task; every call's metadata
    is kept."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.calls: list[dict] = []

    def GetTask(self, request, context):
        self.calls.append(dict(context.invocation_metadata()))
        code, details, wait = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if code == grpc.StatusCode.OK:
            return tes_pb2.Task(id=request.id, state=tes_pb2.QUEUED)
        if wait is not None:
            context.set_trailing_metadata((("retry-after", wait),))
        context.abort(code, details)


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedTaskService, str]]:
    service = ScriptedTaskService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    tes_pb2_grpc.add_TaskServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(grace=None)


OK: Answer = (grpc.StatusCode.OK, "", None)


def test_unavailable_and_resource_exhausted_are_retried_after_retry_after(scripted):
    service, target = scripted
    service.answers += [(grpc.StatusCode.UNAVAILABLE, "database busy; retry", "0"),
                        (grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests", None), OK]
    with TesGrpcClient(target, retries=3, max_retry_wait=0.1) as api:
        assert api.get("t1") == {"id": "t1", "state": "QUEUED"}
    assert len(service.calls) == 3


def test_when_retries_run_out_the_error_carries_the_servers_message(scripted):
    service, target = scripted
    service.answers.append((grpc.StatusCode.UNAVAILABLE, "db busy", "0"))
    with pytest.raises(ClientError) as caught, TesGrpcClient(target, retries=2) as api:
        api.get("t1")
    assert caught.value.status == 503 and caught.value.transient
    assert caught.value.server_message == "db busy" and "UNAVAILABLE: db busy" in str(caught.value)
    assert len(service.calls) == 3


@pytest.mark.parametrize("code,status", [(grpc.StatusCode.INVALID_ARGUMENT, 400),
                                         (grpc.StatusCode.UNAUTHENTICATED, 401),
                                         (grpc.StatusCode.NOT_FOUND, 404),
                                         (grpc.StatusCode.INTERNAL, 500)])
def test_other_codes_are_not_retried_and_say_why(scripted, code, status):
    service, target = scripted
    service.answers.append((code, "executors: required", "0"))
    with pytest.raises(ClientError) as caught, TesGrpcClient(target, retries=5) as api:
        api.get("t1")
    assert caught.value.status == status and caught.value.transient == (status >= 500)
    assert caught.value.server_message == "executors: required"
    assert len(service.calls) == 1


def test_credentials_basic_and_bearer(scripted):
    service, target = scripted
    service.answers.append(OK)
    with TesGrpcClient(target, username="alice", password="pw") as api:
        api.get("x")
    with TesGrpcClient(target, token="tok") as api:
        api.get("x")
    with TesGrpcClient(target) as api:
        api.get("x")
    basic, bearer, anonymous = service.calls
    assert basic["authorization"] == "Basic YWxpY2U6cHc=" and bearer["authorization"] == \
        "Bearer tok" and "authorization" not in anonymous


def test_no_server_is_a_transient_error_and_bad_input_is_caught_before_sending():
    with TesGrpcClient(f"127.0.0.1:{free_port()}", timeout=5) as api:
        with pytest.raises(ClientError) as caught:
            api.get("t1")
        assert caught.value.transient
        with pytest.raises(ClientError) as caught:
            api.create({"executors": "not a list"})
        assert caught.value.status == 400 and not caught.value.transient
        with pytest.raises(ClientError) as caught:
            api.list_page(state="SLEEPING")
        assert caught.value.status == 400 and "SLEEPING" in str(caught.value)
        with pytest.raises(TypeError):
            api.list_page(colour="blue")
