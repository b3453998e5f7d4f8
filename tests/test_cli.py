"""The `funnel` command line against a real server."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.server_helpers import clean_env, funnel_argv

TASK = {"name": "cli", "executors": [{"image": "busybox", "command": ["echo", "hi"]}]}


def funnel(server, *args, stdin=None):
    env = clean_env(FUNNEL_SERVER=server.url) if server else clean_env()
    return subprocess.run(funnel_argv(*args), input=stdin, capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.fixture(scope="module")
def sqlite_server(databases, tmp_path_factory):
    from tests.server_helpers import ServerProcess

    server = ServerProcess(tmp_path_factory.mktemp("cli"), databases.new("sqlite")).start()
    yield server
    server.stop()


def test_create_get_list_cancel(sqlite_server, tmp_path):
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(TASK))
    created = funnel(sqlite_server, "task", "create", str(task_file))
    assert created.returncode == 0, created.stderr
    task_id = created.stdout.strip()

    from_stdin = funnel(sqlite_server, "task", "create", "-", stdin=json.dumps(TASK))
    assert from_stdin.returncode == 0 and from_stdin.stdout.strip() != task_id

    got = funnel(sqlite_server, "task", "get", task_id)
    assert got.returncode == 0
    assert json.loads(got.stdout)["executors"] == TASK["executors"]
    minimal = json.loads(funnel(sqlite_server, "task", "get", task_id, "--view", "minimal").stdout)
    assert minimal == {"id": task_id, "state": "QUEUED"}

    listed = funnel(sqlite_server, "task", "list", "--name-prefix", "cli", "--all")
    assert task_id in {t["id"] for t in json.loads(listed.stdout)["tasks"]}

    canceled = funnel(sqlite_server, "task", "cancel", task_id)
    assert canceled.returncode == 0
    state = json.loads(funnel(sqlite_server, "task", "get", task_id, "--view", "MINIMAL").stdout)
    assert state["state"] == "CANCELED"

    # wait on an ended task that did not COMPLETE: exit status 1, final state printed
    waited = funnel(sqlite_server, "task", "wait", task_id, "--interval", "0.1")
    assert waited.returncode == 1
    assert f"{task_id} CANCELED" in waited.stdout


def test_list_by_tag_and_state(sqlite_server):
    tagged = funnel(sqlite_server, "task", "create", "-",
                    stdin=json.dumps({**TASK, "tags": {"proj": "x1"}})).stdout.strip()
    out = funnel(sqlite_server, "task", "list", "--tag", "proj=x1", "--state", "QUEUED")
    assert [t["id"] for t in json.loads(out.stdout)["tasks"]] == [tagged]


@pytest.mark.parametrize("args,needle", [
    (["task", "get", "nosuchtask"], "404"),
    (["task", "create", "-"], "not valid JSON"),
    (["task", "list", "--state", "NOPE"], "400"),
    (["task", "cancel", "nosuchtask"], "404"),
    (["task", "wait", "nosuchtask", "--interval", "0.1"], "404"),
])
def test_errors_are_one_line_and_nonzero(sqlite_server, args, needle):
    result = funnel(sqlite_server, *args, stdin="{broken")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_bad_task_document_is_refused_with_the_field(sqlite_server):
    result = funnel(sqlite_server, "task", "create", "-", stdin=json.dumps({"name": "x"}))
    assert result.returncode == 1
    assert "executors" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unreachable_server(tmp_path):
    # FUNNEL_RETRY_SECONDS=0: three tries (1 + 2 + 4 s), not the default 120 s window
    env = clean_env(FUNNEL_SERVER="http://127.0.0.1:9", FUNNEL_RETRY_SECONDS="0")
    result = subprocess.run(funnel_argv("task", "list"), capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 1
    assert "cannot reach" in result.stderr


def test_version():
    result = funnel(None, "version")
    assert result.returncode == 0 and result.stdout.startswith("funnel-hpc ")


def test_server_refuses_unknown_config_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  http_prot: 8001\n")
    result = subprocess.run(funnel_argv("server", "run", "--config", str(bad)),
                            capture_output=True, text=True, env=clean_env(), timeout=30)
    assert result.returncode == 1
    assert "server.http_prot" in result.stderr


def funnel_as(server, env, *args):
    return subprocess.run(funnel_argv(*args), capture_output=True, text=True,
                          env=clean_env(FUNNEL_SERVER=server.url, **env), timeout=60)


@pytest.mark.parametrize("env", [{"FUNNEL_USER": "alice", "FUNNEL_PASSWORD": "alice-pw"},
                                 {"FUNNEL_TOKEN": "alice-token"}])
def test_credentials_come_from_the_environment(alice_server, env):
    created = funnel_as(alice_server, env, "run", "true", "--image", "busybox")
    assert created.returncode == 0, created.stderr
    task_id = created.stdout.strip()
    got = funnel_as(alice_server, env, "task", "get", task_id)
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout)["id"] == task_id
    listed = funnel_as(alice_server, env, "task", "list", "-o", "json")
    assert task_id in {t["id"] for t in json.loads(listed.stdout)["tasks"]}


@pytest.mark.parametrize("env", [{}, {"FUNNEL_USER": "alice", "FUNNEL_PASSWORD": "wrong"},
                                 {"FUNNEL_PASSWORD": "alice-pw"}])
def test_missing_or_wrong_credentials_fail_in_one_line(alice_server, env):
    result = funnel_as(alice_server, env, "task", "list")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "alice-pw" not in result.stderr
