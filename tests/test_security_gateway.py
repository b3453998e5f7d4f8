"""Security regressions of the gateway (issue 16 findings 5-7, 10-13; issue 17 item 6).

Every test goes through a real server process. Per-address behaviour (the login
throttle) is tested from distinct loopback source addresses (127.0.0.2, .3, ...), so
the tests share one server without locking each other out; lockouts are long (600 s)
and refill rates tiny, so nothing depends on how fast this machine is.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import sys
from pathlib import Path

import grpc
import pytest
import requests
from werkzeug.security import generate_password_hash

from funnel_hpc.core.events import MAX_TEXT, EventFold, read_event_log
from funnel_hpc.gateway.store.task_dirs import RECEIVED_EVENTS, gateway_dir
from tests.security_helpers import call, csrf_of, form, login, server_cpu_seconds
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for_state

TERMINAL = ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR", "CANCELED", "PREEMPTED")

TASK = {"executors": [{"image": "busybox", "command": ["true"]}]}
PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", **{f"u{i}": f"u{i}-pw" for i in range(6)}}
UI_ORIGIN = "https://ui.example"
SECRET = "test-session-secret"


def basic_header(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


@pytest.fixture(scope="module")
def open_server(databases, tmp_path_factory):
    """auth off, CORS for UI_ORIGIN and "*", started in a directory holding static/."""
    cwd = tmp_path_factory.mktemp("cwd")
    (cwd / "static").mkdir()
    (cwd / "static" / "secret.txt").write_text("not for the web")
    srv = ServerProcess(tmp_path_factory.mktemp("open"), databases.new("sqlite"), cwd=cwd,
                        overrides={"server": {"cors_origins": [UI_ORIGIN, "*"]}}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def auth_server(databases, tmp_path_factory):
    """Basic + bearer; 3 free failures then 600 s lockouts; 5 hash checks per address."""
    srv = ServerProcess(tmp_path_factory.mktemp("auth"), databases.new("sqlite"), overrides={
        "auth": {"mode": "basic+bearer", "session_secret": SECRET,
                 "users": {u: generate_password_hash(p) for u, p in PASSWORDS.items()},
                 "tokens": {"alice-token": "alice"},
                 "login_free_failures": 3, "login_backoff_seconds": 600,
                 "login_backoff_max_seconds": 3600,
                 "login_rate_per_second": 0.0001, "login_burst": 5},
        "server": {"cors_origins": [UI_ORIGIN], "grpc_reflection": True}}).start()
    yield srv
    srv.stop()


def create(server, auth=None) -> str:
    resp = requests.post(server.api + "/tasks", json=TASK, auth=auth, timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


# ---- 5: events are checked at intake; the fold skips what is bad ----

BAD_EVENTS = [
    ({"seq": 100000, "type": "state", "state": "BOGUS"}, "state:"),
    ({"seq": 2, "type": "executor_end", "index": 10_000_000, "exit_code": 0}, "index:"),
    ({"seq": 2, "type": "executor_end", "index": -5, "exit_code": 0}, "index:"),
    ({"seq": 2, "type": "executor_start", "index": 1, "start_time": "t"}, "index:"),
    ({"seq": 2, "type": "no_such_type"}, "type:"),
    ({"seq": "2", "type": "state", "state": "RUNNING"}, "seq:"),
    ({"seq": 2**40, "type": "state", "state": "RUNNING"}, "seq:"),
    ({"seq": 2, "type": "system_log", "message": "x" * (MAX_TEXT + 1)}, "message:"),
    ({"seq": 2, "type": "metadata", "metadata": {str(i): "v" for i in range(1000)}}, "metadata:"),
]


@pytest.mark.parametrize("event,field", BAD_EVENTS, ids=[f for _, f in BAD_EVENTS])
def test_bad_events_are_400_naming_the_field(open_server, event, field):
    task_id = create(open_server)
    resp = requests.post(f"{open_server.url}/funnel/v1/tasks/{task_id}/events", json=event,
                         timeout=30)
    assert resp.status_code == 400, resp.text
    assert resp.json()["message"].startswith(field)
    assert not (gateway_dir(open_server.work_dir, task_id) / RECEIVED_EVENTS).exists()


def test_malformed_event_bodies_are_400_not_500(open_server):
    task_id = create(open_server)
    url = f"{open_server.url}/funnel/v1/tasks/{task_id}/events"
    for body in ("[" * 100_000, "not json", "[1, 2]", ""):
        resp = requests.post(url, data=body, timeout=30,
                             headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, (body[:20], resp.text)
    good = {"seq": 1, "type": "state", "state": "RUNNING"}
    assert requests.post(url, json=good, timeout=10).json()["accepted"] is True
    received = (gateway_dir(open_server.work_dir, task_id) / RECEIVED_EVENTS).read_text()
    assert [json.loads(line) for line in received.splitlines()] == [good]


def test_fold_skips_bad_lines_without_raising_or_growing(tmp_path):
    """What a worker (or anyone holding the task dir) writes to events.jsonl directly."""
    lines = [b'{"seq":100000,"type":"state","state":"BOGUS"}',
             b'{"seq":1,"type":"executor_end","index":10000000,"exit_code":0}',
             b'{"seq":1,"type":"executor_end","index":-5}',
             b"[" * 100_000, b"not json", b'{"seq":1,"type":"metadata","metadata":5}',
             b'{"seq":1,"type":"state"}',
             b'{"seq":1,"type":"state","state":"RUNNING"}',
             b'{"seq":2,"type":"executor_end","index":0,"exit_code":3,"stdout":"out"}']
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    fold = read_event_log(path, executors=1)
    assert fold.state == "RUNNING" and fold.last_seq == 2
    assert fold.task_log["logs"] == [{"exit_code": 3, "stdout": "out"}]
    assert fold.skipped == 5  # the two unparsable lines never reach the fold
    unbounded = EventFold()  # executors unknown: still bounded by MAX_EXECUTORS
    assert not unbounded.apply({"seq": 1, "type": "executor_start", "index": 10_000_000,
                                "start_time": "t"})
    assert unbounded.task_log["logs"] == []


def test_hostile_event_lines_stop_neither_their_task_nor_others(databases, tmp_path):
    """The reconciler folds a log holding a bogus state with seq 100000, executor index
    10,000,000 and -5, deep JSON: the task still completes with one executor log, and a
    task beside it completes too (the old fold took "BOGUS" and every tick failed)."""
    worker = [sys.executable, str(Path(__file__).with_name("hostile_worker.py"))]
    srv = ServerProcess(tmp_path / "fold", databases.new("sqlite"), reconcile=True, overrides={
        "reconciler": {"interval_seconds": 0.3}, "worker": {"command": worker}}).start()
    try:
        hostile = requests.post(srv.api + "/tasks", json={**TASK, "name": "hostile"},
                                timeout=10).json()["id"]
        plain = create(srv)
        detail = srv.log
        for task_id in (hostile, plain):
            task = wait_for_state(srv.api, task_id, TERMINAL, timeout=30, detail=detail)
            assert task["state"] == "COMPLETE", task
        executor_logs = task_of(srv, hostile)["logs"][-1]["logs"]
        assert len(executor_logs) == 1 and executor_logs[0]["exit_code"] == 0
    finally:
        srv.stop()


def task_of(server, task_id: str) -> dict:
    return requests.get(f"{server.api}/tasks/{task_id}", params={"view": "FULL"},
                        timeout=10).json()


# ---- 6: sign-in throttling per address, before credentials are checked ----

def test_basic_failures_lock_the_address_out_before_authentication(auth_server):
    source = "127.0.0.2"
    for _ in range(3):
        status, _, _ = call(auth_server, "GET", "/ga4gh/tes/v1/tasks", source=source,
                            headers=basic_header("alice", "wrong"))
        assert status == 401
    # locked: even the right password is refused, before it is checked
    status, headers, body = call(auth_server, "GET", "/ga4gh/tes/v1/tasks", source=source,
                                 headers=basic_header("alice", PASSWORDS["alice"]))
    assert status == 429, body
    assert int(headers["Retry-After"]) >= 500
    # another address is not affected
    status, _, _ = call(auth_server, "GET", "/ga4gh/tes/v1/tasks", source="127.0.0.1",
                        headers=basic_header("alice", PASSWORDS["alice"]))
    assert status == 200


def test_bearer_failures_lock_the_address_out(auth_server):
    source = "127.0.0.3"
    for _ in range(3):
        status, _, _ = call(auth_server, "GET", "/ga4gh/tes/v1/tasks", source=source,
                            headers={"Authorization": "Bearer guessed"})
        assert status == 401
    status, headers, _ = call(auth_server, "GET", "/ga4gh/tes/v1/tasks", source=source,
                              headers={"Authorization": "Bearer alice-token"})
    assert status == 429 and int(headers["Retry-After"]) >= 500


def test_login_form_failures_lock_the_address_out(auth_server):
    source = "127.0.0.4"
    cookie, token = form(auth_server, source)
    for _ in range(3):
        status, _, _ = login(auth_server, source, cookie, token, "alice", "wrong")
        assert status == 401
    status, headers, body = login(auth_server, source, cookie, token, "alice",
                                  PASSWORDS["alice"])
    assert status == 429 and int(headers["Retry-After"]) >= 500, body
    assert b"Too many sign-in attempts" in body
    # the API from the same address is locked too
    status, _, _ = call(auth_server, "GET", "/ga4gh/tes/v1/tasks", source=source,
                        headers=basic_header("alice", PASSWORDS["alice"]))
    assert status == 429


def test_password_hash_checks_are_rate_limited_per_address(auth_server):
    """Burst 5: a sixth hash check from one address waits; a password already verified
    costs no check and still works."""
    source = "127.0.0.5"
    statuses = [call(auth_server, "GET", "/ga4gh/tes/v1/tasks", source=source,
                     headers=basic_header(user, PASSWORDS[user]))[0]
                for user in ("u0", "u1", "u2", "u3", "u4", "u5")]
    assert statuses == [200] * 5 + [429]
    status, _, _ = call(auth_server, "GET", "/ga4gh/tes/v1/tasks", source=source,
                        headers=basic_header("u0", PASSWORDS["u0"]))
    assert status == 200


def test_grpc_failures_lock_the_address_out(databases, tmp_path):
    """gRPC calls go through the same throttle (its own server: this locks 127.0.0.1)."""
    from funnel_hpc.proto import tes_pb2, tes_pb2_grpc

    srv = ServerProcess(tmp_path / "grpc", databases.new("sqlite"), overrides={"auth": {
        "mode": "basic", "users": {"alice": generate_password_hash(PASSWORDS["alice"])},
        "login_free_failures": 2, "login_backoff_seconds": 600,
        "login_backoff_max_seconds": 3600}}).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
            stub = tes_pb2_grpc.TaskServiceStub(channel)
            codes = []
            for password in ("wrong", "wrong", PASSWORDS["alice"]):
                metadata = (("authorization",
                             basic_header("alice", password)["Authorization"]),)
                try:
                    stub.ListTasks(tes_pb2.ListTasksRequest(), metadata=metadata)
                    codes.append("OK")
                except grpc.RpcError as exc:
                    codes.append(exc.code().name)
        assert codes == ["UNAUTHENTICATED", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED"]
        resp = requests.get(srv.api + "/tasks", auth=("alice", PASSWORDS["alice"]), timeout=10)
        assert resp.status_code == 429  # one address: HTTP is locked out as well
    finally:
        srv.stop()


def test_lockout_doubles_and_is_forgiven_after_a_quiet_spell():
    """The throttle's arithmetic, on a fake clock."""
    from funnel_hpc.gateway.access.ratelimit import LoginThrottle

    now = [1000.0]
    throttle = LoginThrottle(0, 0, free_failures=2, backoff_seconds=1,
                             backoff_max_seconds=8, clock=lambda: now[0])
    throttle.failed("a")
    assert throttle.locked("a") == 0
    waits = []
    for _ in range(5):
        throttle.failed("a")
        waits.append(throttle.locked("a"))
    assert waits == [1, 2, 4, 8, 8]
    assert throttle.locked("b") == 0
    now[0] += 9  # quiet for longer than the longest lockout: old failures forgotten
    throttle.failed("a")
    assert throttle.locked("a") == 0


# ---- 7: unknown users cost what known users cost ----

def test_unknown_users_cost_the_same_hash_work(databases, tmp_path):
    """Known users' hashes are cheap pbkdf2 (1000 rounds): an unknown user must not cost
    a different, dearer hash (the old dummy was pbkdf2 600,000: ~0.3 s of CPU each).
    Measured as the server's CPU time, which a busy machine does not inflate."""
    cheap = {u: generate_password_hash(p, method="pbkdf2:sha256:1000")
             for u, p in PASSWORDS.items()}
    srv = ServerProcess(tmp_path / "cpu", databases.new("sqlite"), overrides={"auth": {
        "mode": "basic", "users": cheap, "login_rate_per_second": 0,
        "login_backoff_seconds": 0}}).start()
    try:
        def cpu_of(user: str) -> float:
            before = server_cpu_seconds(srv)
            for _ in range(10):
                assert requests.get(srv.api + "/tasks", auth=(user, "wrong"),
                                    timeout=30).status_code == 401
            return server_cpu_seconds(srv) - before

        cpu_of("alice")  # warm-up
        known, unknown = cpu_of("alice"), cpu_of("nobody-such")
        assert unknown < 2 * known + 0.5, (known, unknown)
    finally:
        srv.stop()
        shutil.rmtree(tmp_path / "cpu", ignore_errors=True)


# ---- 10: the login redirect stays on the site ----

@pytest.mark.parametrize("target", ["/%09/evil.example", "//evil.example", "/%5Cevil.example",
                                    "/%5C%5Cevil.example", "https://evil.example",
                                    "/%0D%0A/evil.example", "%2F%2Fevil.example"])
def test_login_next_is_only_a_local_path(auth_server, target):
    session, resp = _login_session(auth_server, "alice", next_param=target)
    assert resp.status_code == 303
    assert resp.headers["Location"] == "/", resp.headers["Location"]


def test_login_next_keeps_a_local_path(auth_server):
    _, resp = _login_session(auth_server, "alice", next_param="/tasks/abc%3Fx")
    assert resp.status_code == 303 and resp.headers["Location"] == "/tasks/abc?x"


def _login_session(server, user, next_param=None):
    session = requests.Session()
    token = csrf_of(session.get(server.url + "/login", timeout=10).text)
    url = server.url + "/login" + (f"?next={next_param}" if next_param else "")
    resp = session.post(url, timeout=10, allow_redirects=False,
                        data={"csrf_token": token, "username": user,
                              "password": PASSWORDS[user]})
    return session, resp


# ---- 11: sessions are revoked server-side; CSRF tokens belong to a session ----

def test_session_cookie_flags(auth_server):
    _, resp = _login_session(auth_server, "alice")
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("funnel_session=")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie


@pytest.mark.postgres
def test_logout_revokes_the_session_on_every_replica(auth_server, databases, tmp_path):
    # replicas share a PostgreSQL database (SQLite takes one server per file)
    shared = databases.new("postgres")
    auth = _auth_overrides(auth_server)
    first = ServerProcess(tmp_path / "first", shared, overrides={"auth": auth}).start()
    replica = ServerProcess(tmp_path / "replica", shared, overrides={
        "auth": {**auth, "session_cookie_secure": True}}).start()
    try:
        session, resp = _login_session(first, "alice")
        assert resp.status_code == 303
        stolen = session.cookies.get("funnel_session")
        for srv in (first, replica):
            page = requests.get(srv.url + "/", cookies={"funnel_session": stolen},
                                allow_redirects=False, timeout=10)
            assert page.status_code == 200, srv.url
        token = csrf_of(session.get(first.url + "/", timeout=10).text)
        out = session.post(first.url + "/logout", data={"csrf_token": token},
                           allow_redirects=False, timeout=10)
        assert out.status_code == 303
        for srv in (first, replica):  # the copied cookie is dead everywhere
            page = requests.get(srv.url + "/", cookies={"funnel_session": stolen},
                                allow_redirects=False, timeout=10)
            assert page.status_code == 302 and "/login" in page.headers["Location"], srv.url
        # the replica's cookies are Secure (auth.session_cookie_secure)
        login_page = requests.get(replica.url + "/login", timeout=10)
        assert "Secure" in login_page.headers["Set-Cookie"]
    finally:
        replica.stop()
        first.stop()


def _auth_overrides(server) -> dict:
    import yaml

    return yaml.safe_load(server.config_path.read_text())["auth"]


def test_csrf_token_is_bound_to_the_session(auth_server):
    victim, _ = _login_session(auth_server, "alice")
    attacker, _ = _login_session(auth_server, "bob")
    task_id = create(auth_server, auth=("alice", PASSWORDS["alice"]))
    url = f"{auth_server.url}/tasks/{task_id}/cancel"
    attackers_token = csrf_of(attacker.get(auth_server.url + "/", timeout=10).text)
    for token, cookies in (("attacker", {"funnel_csrf": "attacker"}), (attackers_token, {})):
        resp = victim.post(url, data={"csrf_token": token}, cookies=cookies,
                           allow_redirects=False, timeout=10)
        assert resp.status_code == 403
    state = requests.get(f"{auth_server.api}/tasks/{task_id}", timeout=10,
                         auth=("alice", PASSWORDS["alice"])).json()["state"]
    assert state == "QUEUED"
    own = csrf_of(victim.get(f"{auth_server.url}/tasks/{task_id}", timeout=10).text)
    resp = victim.post(url, data={"csrf_token": own}, allow_redirects=False, timeout=10)
    assert resp.status_code == 303


# ---- 12: security headers; no working-directory /static/; docs without a CDN ----

def test_security_headers_on_pages_and_api(open_server):
    for path in ("/", "/ga4gh/tes/v1/service-info", "/ga4gh/tes/v1/docs"):
        resp = requests.get(open_server.url + path, timeout=10)
        assert resp.status_code == 200, path
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"


def test_no_static_route_from_the_working_directory(open_server):
    resp = requests.get(open_server.url + "/static/secret.txt", timeout=10)
    assert resp.status_code == 404 and "not for the web" not in resp.text


def test_docs_page_loads_nothing_from_other_sites(open_server):
    page = requests.get(open_server.url + "/ga4gh/tes/v1/docs", timeout=10).text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), page
    assert 'href="/ga4gh/tes/v1/openapi.json"' in page
    nonce = re.search(r'<script nonce="([^"]+)"', page)
    assert nonce  # scripts carry the response's CSP nonce


# ---- 13: gRPC reflection ----

def _reflect(server, metadata=()):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=metadata)
        return {s.name for r in responses for s in r.list_services_response.service}


def test_grpc_reflection_needs_credentials_when_on_with_auth(auth_server):
    with pytest.raises(grpc.RpcError) as caught:
        _reflect(auth_server)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    creds = (("authorization", basic_header("alice", PASSWORDS["alice"])["Authorization"]),)
    assert "tes.TaskService" in _reflect(auth_server, creds)


def test_grpc_reflection_is_off_by_default_with_auth(databases, tmp_path):
    srv = ServerProcess(tmp_path / "noreflect", databases.new("sqlite"), overrides={"auth": {
        "mode": "bearer", "tokens": {"t": "alice"}}}).start()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            _reflect(srv, (("authorization", "Bearer t"),))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # and no CORS headers unless server.cors_origins lists the origin
        resp = requests.get(srv.api + "/service-info", headers={"Origin": UI_ORIGIN,
                            "Authorization": "Bearer t"}, timeout=10)
        assert resp.status_code == 200 and "Access-Control-Allow-Origin" not in resp.headers
    finally:
        srv.stop()


# ---- issue 17 item 6: CORS ----

def test_cors_preflight_is_answered_before_authentication(auth_server):
    resp = requests.options(auth_server.api + "/tasks", timeout=10, headers={
        "Origin": UI_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert resp.status_code == 204
    assert resp.headers["Access-Control-Allow-Origin"] == UI_ORIGIN
    assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert "authorization" in resp.headers["Access-Control-Allow-Headers"].lower()
    # an origin not listed gets no CORS headers
    other = requests.options(auth_server.api + "/tasks", timeout=10, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_cors_listed_origin_with_credentials_wildcard_without(open_server):
    listed = requests.get(open_server.api + "/tasks", headers={"Origin": UI_ORIGIN}, timeout=10)
    assert listed.headers["Access-Control-Allow-Origin"] == UI_ORIGIN
    assert listed.headers["Access-Control-Allow-Credentials"] == "true"
    assert "Origin" in listed.headers["Vary"]
    anyone = requests.get(open_server.api + "/tasks", timeout=10,
                          headers={"Origin": "https://elsewhere.example"})
    assert anyone.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in anyone.headers
    # the dashboard is not an API: no CORS there
    page = requests.get(open_server.url + "/", headers={"Origin": UI_ORIGIN}, timeout=10)
    assert "Access-Control-Allow-Origin" not in page.headers
