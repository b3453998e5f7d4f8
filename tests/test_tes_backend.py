"""The tes backend (issue #28, item 4) against a real remote TES: a second funnel-hpc server
(its own process, work dir, SQLite database and auth; the local backend running busybox
through bwrap from the test registry) behind a real forwarding gateway (its own process
and database, backend `tes`, a bearer token from a file). Hostile remote answers, which no
real server gives, come from a small HTTP server in this process (tests/tes_helpers.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests

from funnel_hpc.backends.base import BackendError, JobState
from funnel_hpc.backends.tes import TesBackend
from funnel_hpc.backends.tes_events import RemoteEventLog
from funnel_hpc.core.events import read_event_log
from tests.components import BWRAP, BWRAP_REASON, bwrap_ready, needs
from tests.e2e_helpers import port_closed, sh, wait_ticks
from tests.server_helpers import ServerProcess, free_port
from tests.tes_helpers import (
    AUTH,
    REMOTE_AUTH,
    REMOTE_PASSWORD,
    REMOTE_USER,
    HoldingProxy,
    forwarder,
    get,
    remote_id,
    remote_server,
    remote_tasks,
    request_for,
    s3_client,
    submit,
    tes_options,
    token_file,
    wait_job,
    wait_remote_state,
    wait_state,
)
from tests.waiting import wait_for
from tests.worker_helpers import need_registry

pytestmark = [needs(BWRAP, bwrap_ready(), BWRAP_REASON), pytest.mark.registry]


@pytest.fixture(scope="module")
def remote(databases, tmp_path_factory, moto_server):
    need_registry()
    work = tmp_path_factory.mktemp("tes-remote")
    server = remote_server(work, databases.new("sqlite"), s3_url=moto_server.url).start()
    yield server
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def gateway(remote, databases, tmp_path_factory):
    work = tmp_path_factory.mktemp("tes-forwarder")
    token = token_file(tmp_path_factory.mktemp("tes-secrets"))
    server = forwarder(work, databases.new("sqlite"), remote.url, token).start()
    yield server
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


def test_complete_task_with_its_logs_and_outputs(gateway: ServerProcess, remote: ServerProcess):
    task_id = submit(gateway, {"name": "fwd", "tags": {"project": "x"}, "executors": [
        sh("echo hello from the remote; echo warn >&2"), sh("echo second")]})
    task = wait_state(gateway, task_id, {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"},
                      also=remote)
    assert task["state"] == "COMPLETE", task
    attempt = task["logs"][-1]
    assert attempt["logs"][0]["stdout"] == "hello from the remote\n"
    assert attempt["logs"][0]["stderr"] == "warn\n"
    assert attempt["logs"][0]["exit_code"] == 0
    assert attempt["logs"][1]["stdout"] == "second\n"
    assert attempt["start_time"] and attempt["end_time"]
    job = remote_id(task)
    assert attempt["metadata"]["remote_id"] == job
    assert attempt["metadata"]["remote_url"] == remote.url
    there = requests.get(f"{remote.api}/tasks/{job}", params={"view": "FULL"},
                         auth=REMOTE_AUTH, timeout=30).json()
    assert there["state"] == "COMPLETE"
    assert there["tags"]["project"] == "x"
    assert there["tags"]["funnel-hpc-task-id"] == task_id
    assert there["name"] == "fwd"
    assert "id" not in there["tags"]


def test_inputs_and_outputs_on_s3_come_back_in_the_logs(gateway: ServerProcess,
                                                        remote: ServerProcess, moto_server):
    """URLs the remote reaches (a moto S3 here): it stages them, and the outputs it reports
    are the forwarded task's."""
    s3 = s3_client(moto_server.url)
    s3.create_bucket(Bucket="tes-forward")
    s3.put_object(Bucket="tes-forward", Key="in.txt", Body=b"from s3\n")
    task_id = submit(gateway, {
        "inputs": [{"url": "s3://tes-forward/in.txt", "path": "/data/in.txt"}],
        "outputs": [{"url": "s3://tes-forward/out.txt", "path": "/data/out.txt"}],
        "executors": [sh("tr a-z A-Z < /data/in.txt > /data/out.txt; cat /data/out.txt")]})
    task = wait_state(gateway, task_id, {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"},
                      also=remote)
    assert task["state"] == "COMPLETE", task
    assert task["logs"][-1]["logs"][0]["stdout"] == "FROM S3\n"
    assert task["logs"][-1]["outputs"] == [
        {"url": "s3://tes-forward/out.txt", "path": "/data/out.txt", "size_bytes": "8"}]
    body = s3.get_object(Bucket="tes-forward", Key="out.txt")["Body"].read()
    assert body == b"FROM S3\n"


def test_executor_error_keeps_the_exit_code(gateway: ServerProcess, remote: ServerProcess):
    task_id = submit(gateway, {"executors": [sh("echo failing; exit 3")]})
    task = wait_state(gateway, task_id, {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"},
                      also=remote)
    assert task["state"] == "EXECUTOR_ERROR", task
    assert task["logs"][-1]["logs"][0]["exit_code"] == 3
    assert task["logs"][-1]["logs"][0]["stdout"] == "failing\n"


def test_file_urls_are_refused_at_post(gateway: ServerProcess):
    for task, field in (
            ({"inputs": [{"url": "file:///etc/passwd", "path": "/in/x"}]}, "inputs.0.url"),
            ({"outputs": [{"url": "/tmp/out", "path": "/out/x"}]}, "outputs.0.url")):
        resp = requests.post(gateway.api + "/tasks", auth=AUTH, timeout=30,
                             json={"executors": [sh("true")], **task})
        assert resp.status_code == 400, resp.text
        assert f"{field}: file:// URLs cannot reach the remote TES server" in resp.text
    # an input given by its content reaches the remote with the task
    task_id = submit(gateway, {"inputs": [{"content": "inline\n", "path": "/in/x"}],
                               "executors": [sh("cat /in/x")]})
    done = wait_state(gateway, task_id, {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"})
    assert done["state"] == "COMPLETE", done
    assert done["logs"][-1]["logs"][0]["stdout"] == "inline\n"


def test_remote_tasks_are_tagged_for_this_gateway(gateway: ServerProcess, remote: ServerProcess):
    task_id = submit(gateway, {"executors": [sh("true")]})
    task = wait_state(gateway, task_id, {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"})
    tag = (Path(gateway.work_dir) / "tes-gateway-id").read_text().strip()
    mine = remote_tasks(remote, tag_key="funnel-hpc-gateway", tag_value=tag)
    assert remote_id(task) in {t["id"] for t in mine}


def test_cancel_through_the_forwarder_cancels_the_remote(gateway: ServerProcess,
                                                         remote: ServerProcess):
    task_id = submit(gateway, {"executors": [sh("sleep 300")]})
    job = wait_job(gateway, task_id)
    wait_remote_state(remote, job, "RUNNING")
    resp = requests.post(f"{gateway.api}/tasks/{task_id}:cancel", auth=AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    task = wait_state(gateway, task_id, {"CANCELED", "SYSTEM_ERROR", "COMPLETE"}, also=remote)
    assert task["state"] == "CANCELED", task
    assert wait_remote_state(remote, job, {"CANCELED", "COMPLETE"})["state"] == "CANCELED"


def test_a_task_canceled_on_the_remote_is_a_system_error_here(gateway: ServerProcess,
                                                               remote: ServerProcess):
    task_id = submit(gateway, {"executors": [sh("sleep 300")]})
    job = wait_job(gateway, task_id)
    wait_remote_state(remote, job, "RUNNING")
    resp = requests.post(f"{remote.api}/tasks/{job}:cancel", auth=REMOTE_AUTH, timeout=30)
    assert resp.status_code == 200, resp.text
    task = wait_state(gateway, task_id, {"CANCELED", "SYSTEM_ERROR", "COMPLETE"}, also=remote)
    assert task["state"] == "SYSTEM_ERROR", task
    # "stopped outside the gateway ... without a TES cancel" (the poll saw CANCELED) or
    # "ended as CANCELLED ... but the worker did not record an end" (it saw CANCELING)
    logs = "\n".join(task["logs"][-1]["system_logs"])
    assert f"the tes job {job}" in logs and "CANCELLED" in logs, logs


def test_tasks_sent_straight_to_the_remote_are_not_touched(gateway: ServerProcess,
                                                           remote: ServerProcess):
    """Same remote account, no gateway tag: the forwarder's walk never lists it, so
    nothing of it is polled, written or canceled."""
    direct = submit(remote, {"executors": [sh("sleep 2; echo direct")]}, auth=REMOTE_AUTH)
    forwarded = submit(gateway, {"executors": [sh("sleep 2; echo forwarded")]})
    task = wait_state(gateway, forwarded, {"COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR"},
                      also=remote)
    assert task["state"] == "COMPLETE", task
    there = wait_remote_state(remote, direct, {"COMPLETE", "CANCELED", "SYSTEM_ERROR"})
    assert there["state"] == "COMPLETE"
    assert "funnel-hpc-gateway" not in (there.get("tags") or {})
    tag = (Path(gateway.work_dir) / "tes-gateway-id").read_text().strip()
    listed = {t["id"] for t in remote_tasks(remote, tag_key="funnel-hpc-gateway",
                                            tag_value=tag)}
    assert direct not in listed and remote_id(task) in listed
    # the forwarder has no task of that id (its ids are its own) and the remote task was
    # never canceled: its log ends COMPLETE as the remote ran it
    resp = requests.get(f"{gateway.api}/tasks/{direct}", auth=AUTH, timeout=30)
    assert resp.status_code == 404


def test_wrong_credentials_fail_the_task_with_the_remote_answer(remote: ServerProcess,
                                                                 databases, tmp_path):
    """401 is permanent: the task ends SYSTEM_ERROR quoting it (retrying cannot help)."""
    token = token_file(tmp_path / "secrets", token="not-a-token-of-the-remote")
    server = forwarder(tmp_path / "work", databases.new("sqlite"), remote.url, token).start()
    try:
        task_id = submit(server, {"executors": [sh("true")]})
        task = wait_state(server, task_id, {"COMPLETE", "SYSTEM_ERROR"}, also=remote)
        assert task["state"] == "SYSTEM_ERROR"
        logs = "\n".join(task["logs"][-1]["system_logs"])
        assert "submission to tes failed: tes POST /tasks: HTTP 401" in logs, logs
        assert "not-a-token" not in server.log()
    finally:
        server.stop()


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_a_token_file_others_may_read_stops_the_start(remote: ServerProcess, databases,
                                                      tmp_path, mode: int):
    token = token_file(tmp_path / "secrets", mode=mode)
    server = forwarder(tmp_path / "work", databases.new("sqlite"), remote.url, token)
    with pytest.raises(RuntimeError) as failed:
        server.start(timeout=60)
    assert f"backend.tes.token_file: {token} may be read by others" in str(failed.value)
    assert "remote-token" not in str(failed.value)


def test_remote_down_then_back(databases, tmp_path):
    """While the remote is down a running task stays as it was (UNKNOWN polls) and a new
    one stays QUEUED (transient submission); both complete once it is back."""
    need_registry()
    remote = remote_server(tmp_path / "remote", databases.new("sqlite")).start()
    token = token_file(tmp_path / "secrets")
    server = forwarder(tmp_path / "work", databases.new("sqlite"), remote.url, token).start()
    try:
        running = submit(server, {"executors": [sh("sleep 4; echo survived")]})
        job = wait_job(server, running)
        wait_remote_state(remote, job, "RUNNING")
        remote.stop()
        wait_for(lambda: port_closed(remote.port), 30, "the remote to stop listening")
        queued = submit(server, {"executors": [sh("echo later")]})
        wait_for(lambda: "unreachable" in server.log(), 60, "a failed call to the remote")
        wait_ticks(server, 3)
        assert get(server, queued)["state"] == "QUEUED"
        assert get(server, running)["state"] in ("QUEUED", "INITIALIZING", "RUNNING")
        remote.start()
        for task_id, text in ((running, "survived\n"), (queued, "later\n")):
            task = wait_state(server, task_id, {"COMPLETE", "SYSTEM_ERROR", "EXECUTOR_ERROR"},
                              also=remote)
            assert task["state"] == "COMPLETE", task
            assert task["logs"][-1]["logs"][0]["stdout"] == text
    finally:
        server.stop()
        remote.stop()


def test_forwarder_killed_mid_flight_picks_up_where_it_stopped(remote: ServerProcess,
                                                               databases, tmp_path):
    token = token_file(tmp_path / "secrets")
    db_url = databases.new("sqlite")
    first = forwarder(tmp_path / "work", db_url, remote.url, token).start()
    task_id = submit(first, {"executors": [sh("sleep 3; echo one run")]})
    job = wait_job(first, task_id)
    wait_remote_state(remote, job, "RUNNING")
    first.kill()
    second = forwarder(tmp_path / "work", db_url, remote.url, token, port=first.port).start()
    try:
        task = wait_state(second, task_id, {"COMPLETE", "SYSTEM_ERROR", "EXECUTOR_ERROR"},
                          also=remote)
        assert task["state"] == "COMPLETE", task
        assert task["logs"][-1]["logs"][0]["stdout"] == "one run\n"
        assert len(task["logs"]) == 1
        tagged = remote_tasks(remote, tag_key="funnel-hpc-task-id", tag_value=task_id)
        assert [t["id"] for t in tagged] == [job]
    finally:
        second.stop()


# ---- the backend in this process, against the real remote ----

def test_poll_is_one_walk_and_fetches_only_what_changed(remote: ServerProcess, tmp_path):
    token = token_file(tmp_path / "secrets")
    backend = TesBackend(tes_options(remote.url, token_file=str(token), page_size=2),
                         tmp_path / "work")
    other = TesBackend(tes_options(remote.url, token_file=str(token), tag_value="f" * 32),
                       tmp_path / "other")
    try:
        jobs = {f"task{n}": backend.submit(request_for(tmp_path / "work", f"task{n}", {
            "executors": [sh(f"echo {n}")]})) for n in range(5)}
        theirs = other.submit(request_for(tmp_path / "other", "theirs",
                                          {"executors": [sh("true")]}))
        for job in [*jobs.values(), theirs]:
            wait_remote_state(remote, job, "COMPLETE")
        before = backend.client.calls.copy()
        statuses = backend.poll(list(jobs.values()))
        calls = backend.client.calls - before
        assert {s.state for s in statuses.values()} == {JobState.COMPLETED}
        # 5 own tasks at 2 a page: 3 pages; one FULL view per task that changed
        assert calls == {"GET /tasks": 3, "GET /tasks/{id}": 5}, calls
        for n in range(5):
            fold = read_event_log(tmp_path / "work" / f"task{n}" / "events.jsonl")
            assert fold.state == "COMPLETE"
            assert fold.task_log["logs"][0]["stdout"] == f"{n}\n"
        # the newest first (funnel-hpc's order): the walk stops once it saw them all
        before = backend.client.calls.copy()
        newest = jobs["task4"]
        assert backend.poll([newest])[newest].state == JobState.COMPLETED
        assert backend.client.calls - before == {"GET /tasks": 1}
        # the other gateway's walk lists its task only
        before = other.client.calls.copy()
        assert other.poll([theirs])[theirs].state == JobState.COMPLETED
        # a task of this account the walk did not list is looked up, and not taken
        # for one of the other gateway's: its tags name another gateway
        status = other.poll([jobs["task0"]])[jobs["task0"]]
        assert status.state == JobState.UNKNOWN and "not one this gateway" in status.reason
        assert not (tmp_path / "other" / "task0").exists()
    finally:
        backend.close()
        other.close()


def test_recover_finds_the_submission_a_dead_gateway_made(remote: ServerProcess, tmp_path):
    token = token_file(tmp_path / "secrets")
    work = tmp_path / "work"
    options = tes_options(remote.url, token_file=str(token))
    first = TesBackend(options, work)
    job = first.submit(request_for(work, "recorded", {"executors": [sh("true")]}))
    first.close()
    again = TesBackend(options, work)  # a restarted gateway: nothing in memory
    try:
        assert again.recover("recorded", work / "recorded") == job
        # died after the POST, before recording the remote id: found by its nonce
        request = request_for(work, "posted", {"executors": [sh("true")]})
        RemoteEventLog(work, "posted", 1).note({"tes_submission": "0123456789abcdef"})
        body = again.remote_task(request, "0123456789abcdef")
        posted = requests.post(remote.api + "/tasks", json=body, auth=REMOTE_AUTH,
                               timeout=30).json()["id"]
        assert again.recover("posted", work / "posted") == posted
        fold = read_event_log(work / "posted" / "events.jsonl")
        assert fold.task_log["metadata"]["remote_id"] == posted
        # died before the POST: no remote task for that nonce, none for no log at all
        request_for(work, "unsent", {"executors": [sh("true")]})
        RemoteEventLog(work, "unsent", 1).note({"tes_submission": "fedcba9876543210"})
        assert again.recover("unsent", work / "unsent") is None
        request_for(work, "never", {"executors": [sh("true")]})
        assert again.recover("never", work / "never") is None
    finally:
        again.close()


def test_recover_when_the_remote_is_down_asks_again(tmp_path):
    work = tmp_path / "work"
    backend = TesBackend(tes_options(f"http://127.0.0.1:{free_port()}"), work)
    request_for(work, "posted", {"executors": [sh("true")]})
    RemoteEventLog(work, "posted", 1).note({"tes_submission": "0123456789abcdef"})
    with pytest.raises(BackendError) as failed:
        backend.recover("posted", work / "posted")
    assert failed.value.transient
    statuses = backend.poll(["some-remote-id"])
    assert statuses["some-remote-id"].state == JobState.UNKNOWN
    assert "unreachable" in statuses["some-remote-id"].reason


def test_basic_credentials(remote: ServerProcess, tmp_path):
    secrets = tmp_path / "secrets"
    good = token_file(secrets, token=REMOTE_PASSWORD)
    work = tmp_path / "work"
    backend = TesBackend(tes_options(remote.url, username=REMOTE_USER,
                                     password_file=str(good)), work)
    try:
        job = backend.submit(request_for(work, "basic", {"executors": [sh("echo basic")]}))
        wait_remote_state(remote, job, "COMPLETE")
        assert backend.poll([job])[job].state == JobState.COMPLETED
        fold = read_event_log(work / "basic" / "events.jsonl")
        assert fold.task_log["logs"][0]["stdout"] == "basic\n"
    finally:
        backend.close()
    bad = token_file(tmp_path / "bad", token="not-the-password")
    backend = TesBackend(tes_options(remote.url, username=REMOTE_USER,
                                     password_file=str(bad)), work)
    try:
        with pytest.raises(BackendError) as failed:
            backend.submit(request_for(work, "refused", {"executors": [sh("true")]}))
        assert not failed.value.transient and "HTTP 401" in str(failed.value)
        assert "not-the-password" not in str(failed.value)
        status = backend.poll([job])[job]
        assert status.state == JobState.UNKNOWN and "HTTP 401" in status.reason
    finally:
        backend.close()


def test_forwarder_killed_between_post_and_answer_submits_once(remote: ServerProcess,
                                                                databases, tmp_path):
    """The remote made the task but the forwarder died before its answer came: the
    restarted forwarder finds that task by its tags (recover) instead of POSTing again."""
    token = token_file(tmp_path / "secrets")
    db_url = databases.new("sqlite")
    proxy = HoldingProxy(remote.url)
    first = forwarder(tmp_path / "work", db_url, proxy.url, token).start()
    try:
        task_id = submit(first, {"executors": [sh("echo once")]})
        assert proxy.posted.wait(120), first.log()[-3000:]
        first.kill()
    finally:
        proxy.close()
    made = remote_tasks(remote, tag_key="funnel-hpc-task-id", tag_value=task_id)
    assert len(made) == 1
    second = forwarder(tmp_path / "work", db_url, remote.url, token, port=first.port).start()
    try:
        task = wait_state(second, task_id, {"COMPLETE", "SYSTEM_ERROR", "EXECUTOR_ERROR"},
                          also=remote)
        assert task["state"] == "COMPLETE", task
        assert task["logs"][-1]["logs"][0]["stdout"] == "once\n"
        assert remote_id(task) == made[0]["id"]
        again = remote_tasks(remote, tag_key="funnel-hpc-task-id", tag_value=task_id)
        assert [t["id"] for t in again] == [made[0]["id"]]
    finally:
        second.stop()
