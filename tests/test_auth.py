"""Authentication and per-user isolation on HTTP and the dashboard."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from werkzeug.security import generate_password_hash

from funnel_hpc.gateway.store.task_dirs import RECEIVED_EVENTS, gateway_dir
from tests.server_helpers import ServerProcess, clean_env
from tests.waiting import calls_until, wait_for, wait_for_state

TASK = {"executors": [{"image": "busybox", "command": ["true"]}]}
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "root": "root-pw"}


@pytest.fixture(scope="module")
def keys():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return private, other


@pytest.fixture(scope="module")
def server(databases, tmp_path_factory, keys):
    work = tmp_path_factory.mktemp("auth")
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys[0].public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")
    (work / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    htpasswd = work / "htpasswd"
    htpasswd.write_text(f"bob:{generate_password_hash(PASSWORDS['bob'])}\n")
    srv = ServerProcess(work, databases.new("sqlite"), overrides={"auth": {
        "mode": "basic+bearer",
        "users": {"alice": generate_password_hash(PASSWORDS["alice"]),
                  "root": generate_password_hash(PASSWORDS["root"])},
        "htpasswd_file": str(htpasswd),
        "tokens": {"alice-static-token": "alice"},
        "admins": ["root"],
        "oidc": {"jwks_file": str(work / "jwks.json"), "issuer": "https://idp.test",
                 "audience": "funnel", "admin_claim": "groups", "admin_values": ["tes-admins"]},
        # this module's many deliberate failures would lock 127.0.0.1 out: the throttle
        # has its own servers in tests/test_security_gateway.py
        "login_free_failures": 1000, "login_rate_per_second": 0,
    }}).start()
    yield srv
    srv.stop()


def basic(user):
    return (user, PASSWORDS[user])


def token(key, sub="carol", exp_in=300, kid="k1", **claims):
    now = int(time.time())
    payload = {"sub": sub, "iss": "https://idp.test", "aud": "funnel", "iat": now,
               "exp": now + exp_in, **claims}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


def create(server, auth=None, headers=None, **fields):
    resp = requests.post(server.api + "/tasks", json={**TASK, **fields}, auth=auth,
                         headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


ROUTES = [
    ("GET", "/ga4gh/tes/v1/service-info"), ("GET", "/ga4gh/tes/v1/tasks"),
    ("POST", "/ga4gh/tes/v1/tasks"), ("GET", "/ga4gh/tes/v1/tasks/x"),
    ("POST", "/ga4gh/tes/v1/tasks/x:cancel"), ("GET", "/ga4gh/tes/v1/openapi.json"),
    ("GET", "/v1/tasks"), ("POST", "/v1/tasks"), ("GET", "/v1/tasks/x"),
    ("POST", "/v1/tasks/x:cancel"), ("GET", "/v1/service-info"),
    ("POST", "/funnel/v1/tasks/x/events"),
]


@pytest.mark.parametrize("method,path", ROUTES)
def test_401_without_credentials_on_every_route(server, method, path):
    resp = requests.request(method, server.url + path, json=TASK, timeout=10)
    assert resp.status_code == 401
    assert "WWW-Authenticate" in resp.headers
    assert resp.json()["message"]


@pytest.mark.parametrize("auth", [("alice", "wrong"), ("nobody", "x"), ("", "")])
def test_wrong_password_is_401(server, auth):
    assert requests.get(server.api + "/tasks", auth=auth, timeout=10).status_code == 401


def test_users_see_only_their_own_tasks(server):
    mine = create(server, auth=basic("alice"), name="alice-task")
    theirs = create(server, auth=basic("bob"), name="bob-task")  # bob is in the htpasswd file

    # get: another user's task does not exist for alice (404, not 403)
    assert requests.get(f"{server.api}/tasks/{mine}", auth=basic("alice"), timeout=10).ok
    assert requests.get(f"{server.api}/tasks/{theirs}", auth=basic("alice"),
                        timeout=10).status_code == 404
    # list
    listed = requests.get(server.api + "/tasks", auth=basic("alice"), timeout=10).json()
    ids = {t["id"] for t in listed["tasks"]}
    assert mine in ids and theirs not in ids
    # cancel
    resp = requests.post(f"{server.api}/tasks/{theirs}:cancel", auth=basic("alice"), timeout=10)
    assert resp.status_code == 404
    state = requests.get(f"{server.api}/tasks/{theirs}", auth=basic("bob"), timeout=10).json()
    assert state["state"] == "QUEUED"
    # the admin sees both and may cancel either
    admin_ids = {t["id"] for t in requests.get(server.api + "/tasks?page_size=1000",
                                               auth=basic("root"), timeout=10).json()["tasks"]}
    assert {mine, theirs} <= admin_ids
    assert requests.post(f"{server.api}/tasks/{theirs}:cancel", auth=basic("root"),
                         timeout=10).ok


def test_static_bearer_token_is_that_user(server):
    headers = {"Authorization": "Bearer alice-static-token"}
    task_id = create(server, headers=headers)
    assert requests.get(f"{server.api}/tasks/{task_id}", auth=basic("alice"), timeout=10).ok
    bad = requests.get(server.api + "/tasks", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert bad.status_code == 401


def test_jwt_from_the_jwks(server, keys):
    headers = {"Authorization": f"Bearer {token(keys[0], sub='carol')}"}
    task_id = create(server, headers=headers)
    assert requests.get(f"{server.api}/tasks/{task_id}", headers=headers, timeout=10).ok
    assert requests.get(f"{server.api}/tasks/{task_id}", auth=basic("alice"),
                        timeout=10).status_code == 404
    admin = {"Authorization": f"Bearer {token(keys[0], sub='dave', groups=['tes-admins'])}"}
    assert requests.get(f"{server.api}/tasks/{task_id}", headers=admin, timeout=10).ok


@pytest.mark.parametrize("case", ["expired", "other key", "wrong audience", "wrong issuer",
                                  "garbage"])
def test_bad_jwts_are_401(server, keys, case):
    value = {
        "expired": lambda: token(keys[0], exp_in=-60),
        "other key": lambda: token(keys[1]),
        "wrong audience": lambda: token(keys[0], aud="other"),
        "wrong issuer": lambda: token(keys[0], iss="https://evil.test"),
        "garbage": lambda: "a.b.c",
    }[case]()
    resp = requests.get(server.api + "/tasks", headers={"Authorization": f"Bearer {value}"},
                        timeout=10)
    assert resp.status_code == 401


def _csrf_token(page: str) -> str:
    """The CSRF token of a dashboard form."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, page[:2000]
    return match.group(1)


def _login(server, user, password):
    session = requests.Session()
    page = session.get(server.url + "/login", timeout=10)
    csrf = _csrf_token(page.text)
    resp = session.post(server.url + "/login", timeout=10, allow_redirects=False,
                        data={"csrf_token": csrf, "username": user, "password": password})
    return session, resp


def test_dashboard_requires_login_and_isolates_users(server):
    alice_task = create(server, auth=basic("alice"), name="dash-alice")
    bob_task = create(server, auth=basic("bob"), name="dash-bob")

    anonymous = requests.get(server.url + "/", timeout=10, allow_redirects=False)
    assert anonymous.status_code == 302 and "/login" in anonymous.headers["Location"]

    _, failed = _login(server, "alice", "wrong")
    assert failed.status_code == 401

    session, resp = _login(server, "alice", PASSWORDS["alice"])
    assert resp.status_code == 303
    listing = session.get(server.url + "/?page_size=50", timeout=10).text
    assert alice_task in listing and bob_task not in listing
    assert session.get(f"{server.url}/tasks/{bob_task}", timeout=10).status_code == 404
    page = session.get(f"{server.url}/tasks/{alice_task}", timeout=10)
    csrf = _csrf_token(page.text)
    denied = session.post(f"{server.url}/tasks/{bob_task}/cancel", data={"csrf_token": csrf},
                          timeout=10)
    assert denied.status_code == 404
    bob_state = requests.get(f"{server.api}/tasks/{bob_task}", auth=basic("bob"), timeout=10)
    assert bob_state.json()["state"] == "QUEUED"


def test_login_redirect_stays_on_site(server):
    session = requests.Session()
    page = session.get(server.url + "/login", timeout=10)
    csrf = _csrf_token(page.text)
    resp = session.post(server.url + "/login?next=//evil.example/x", timeout=10,
                        allow_redirects=False,
                        data={"csrf_token": csrf, "username": "alice",
                              "password": PASSWORDS["alice"]})
    assert resp.status_code == 303 and resp.headers["Location"] == "/"


def test_grpc_requires_credentials_and_isolates_users(server):
    import base64

    import grpc

    from funnel_hpc.proto import tes_pb2, tes_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = tes_pb2_grpc.TaskServiceStub(channel)

    def creds(user):
        raw = base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
        return (("authorization", f"Basic {raw}"),)

    with pytest.raises(grpc.RpcError) as caught:
        stub.ListTasks(tes_pb2.ListTasksRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    task = tes_pb2.Task(executors=[tes_pb2.Executor(image="busybox", command=["true"])])
    bobs = stub.CreateTask(task, metadata=creds("bob")).id
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetTask(tes_pb2.GetTaskRequest(id=bobs), metadata=creds("alice"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as caught:
        stub.CancelTask(tes_pb2.CancelTaskRequest(id=bobs), metadata=creds("alice"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    alice_sees = stub.ListTasks(tes_pb2.ListTasksRequest(page_size=1000), metadata=creds("alice"))
    assert bobs not in {t.id for t in alice_sees.tasks}
    assert stub.GetTask(tes_pb2.GetTaskRequest(id=bobs), metadata=creds("root")).id == bobs
    channel.close()


def test_rate_limit_per_client(databases, tmp_path):
    srv = ServerProcess(tmp_path / "rl", databases.new("sqlite"), overrides={"server": {
        "rate_limit_per_second": 2, "rate_limit_burst": 5}}).start()
    try:
        session = requests.Session()
        # at least 15 requests, and on until one is refused (a slow machine spends more
        # time on them, so its bucket refills more meanwhile)
        responses, seconds = calls_until(lambda: session.get(srv.api + "/tasks", timeout=10),
                                         lambda resp: resp.status_code == 429)
        limited = [r for r in responses if r.status_code == 429]
        # burst 5 (the start-up probe of the fixture may have used one), then 2 per second
        assert 3 <= sum(r.status_code == 200 for r in responses) <= 5 + 2 * seconds and limited
        assert int(limited[0].headers["Retry-After"]) >= 1
        assert limited[0].json()["message"].startswith("too many requests")
        wait_for(lambda: session.get(srv.api + "/tasks", timeout=10).status_code == 200, 10,
                 "the bucket to refill")
        # gRPC calls draw on the same bucket (anonymous: per address)
        import grpc

        from funnel_hpc.proto import tes_pb2, tes_pb2_grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}")
        stub = tes_pb2_grpc.TaskServiceStub(channel)

        def list_tasks() -> str:
            try:
                stub.ListTasks(tes_pb2.ListTasksRequest())
            except grpc.RpcError as exc:
                assert exc.details().startswith("too many requests")
                return exc.code().name
            return "OK"

        started = time.monotonic()
        wait_for(lambda: list_tasks() == "OK", 10, "a gRPC call the bucket allows")
        codes, _ = calls_until(list_tasks, lambda code: code == "RESOURCE_EXHAUSTED")
        codes.insert(0, "OK")  # the call wait_for saw allowed
        seconds = time.monotonic() - started
        assert "RESOURCE_EXHAUSTED" in codes and 1 <= codes.count("OK") <= 5 + 2 * seconds
        channel.close()
    finally:
        srv.stop()


# ---- worker tokens (core/worker_tokens.py) ----

def test_worker_token_reaches_only_its_own_task(server):
    from funnel_hpc.core import worker_tokens

    alices = create(server, auth=basic("alice"))
    bobs = create(server, auth=basic("bob"))
    key = worker_tokens.load_key(server.work_dir)  # the server's own key file
    worker = {"Authorization": f"Bearer {worker_tokens.token_for(key, alices)}"}
    event = {"seq": 1, "type": "state", "state": "INITIALIZING", "task_id": alices}

    def call(method, path, **kwargs):
        return requests.request(method, server.url + path, headers=worker, timeout=10,
                                **kwargs).status_code

    assert call("GET", f"/ga4gh/tes/v1/tasks/{alices}") == 200
    assert call("GET", f"/v1/tasks/{alices}") == 200
    assert call("POST", f"/funnel/v1/tasks/{alices}/events", json=event) == 200
    for method, path in [("GET", f"/ga4gh/tes/v1/tasks/{bobs}"), ("GET", "/ga4gh/tes/v1/tasks"),
                         ("POST", "/ga4gh/tes/v1/tasks"),
                         ("POST", f"/ga4gh/tes/v1/tasks/{alices}:cancel"),
                         ("POST", f"/funnel/v1/tasks/{bobs}/events")]:
        assert call(method, path, json=TASK) == 403, (method, path)
    forged = worker_tokens.token_for(b"not the key", alices)
    resp = requests.get(f"{server.api}/tasks/{alices}", timeout=10,
                        headers={"Authorization": f"Bearer {forged}"})
    assert resp.status_code == 401 and "invalid worker token" in resp.text


def test_users_cannot_write_another_tasks_events(server):
    bobs = create(server, auth=basic("bob"))
    event = {"seq": 1, "type": "state", "state": "COMPLETE", "task_id": bobs}
    for who in ("alice", "bob"):  # not even the owner: only its worker, or an admin
        resp = requests.post(f"{server.url}/funnel/v1/tasks/{bobs}/events", json=event,
                             auth=basic(who), timeout=10)
        assert resp.status_code == 403, resp.text
    assert requests.post(f"{server.url}/funnel/v1/tasks/{bobs}/events", json=event,
                         auth=basic("root"), timeout=10).status_code == 200


def test_worker_token_is_refused_on_grpc(server):
    import grpc

    from funnel_hpc.core import worker_tokens
    from funnel_hpc.proto import tes_pb2, tes_pb2_grpc

    alices = create(server, auth=basic("alice"))
    token = worker_tokens.token_for(worker_tokens.load_key(server.work_dir), alices)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    stub = tes_pb2_grpc.TaskServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetTask(tes_pb2.GetTaskRequest(id=alices),
                     metadata=(("authorization", f"Bearer {token}"),))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


def test_workers_report_over_http_with_auth_on(databases, tmp_path):
    """A real worker (local backend) with --server: events reach the intake with its token,
    and a worker fetching its task by id uses the token as well."""
    srv = ServerProcess(tmp_path / "w", databases.new("sqlite"), reconcile=True, overrides={
        "auth": {"mode": "basic", "users": {"alice": generate_password_hash("pw")}},
        "reconciler": {"interval_seconds": 0.3},
        "worker": {"container_driver": "bwrap", "poll_server_seconds": 0.5}}).start()
    try:
        auth = ("alice", "pw")
        done = create(srv, auth=auth, executors=[
            {"image": "busybox", "command": ["sh", "-c", "sleep 1; echo reported"]}])
        task_dir = srv.work_dir / done
        wait_for_state(srv.api, done, "COMPLETE", timeout=60, auth=auth,
                       detail=lambda: srv.log()[-2000:])
        assert (task_dir / "worker.token").stat().st_mode & 0o777 == 0o600
        intake = gateway_dir(srv.work_dir, done) / RECEIVED_EVENTS
        received = [json.loads(line) for line in intake.open()]
        # sent with the token (the intake stops taking events once the task has ended,
        # and the reconciler may learn the end from the file first)
        assert {"task_start", "executor_start"} <= {event["type"] for event in received}
        # a worker that fetches its task by id presents the token too
        argv = [sys.executable, "-m", "funnel_hpc.worker", "run", "--task-id", done,
                "--server", srv.url]
        fetched = subprocess.run([*argv, "--workdir", str(srv.work_dir)], env=clean_env(),
                                 capture_output=True, text=True, timeout=60)
        assert fetched.returncode == 0 and fetched.stdout.strip() == "COMPLETE", fetched.stderr
        refused = subprocess.run([*argv, "--workdir", str(tmp_path / "elsewhere")],
                                 env=clean_env(), capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1
        assert refused.stderr.strip().endswith(": 401: authentication required")
    finally:
        srv.stop()
