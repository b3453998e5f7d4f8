"""Routing at POST (issue #28, items 2 and 6): a real server with auth on, two real local
users (bob in a group of his own making) and a third API user who is no local account,
and four local-kind backend instances chosen by tag rules. What POST stores says where a
task goes (the backend column, the route tag, the first system log line); a task no rule
accepts is a 400 and is not stored; backend_parameters follow the routed instance's
allow-list; a client's route tag chooses nothing; service-info lists, per caller, the
instances its tasks may reach, and TES clients still parse it; gRPC routes the same;
`funnel render` routes like POST. No reconciler runs there: the reconcile side of several
instances is tested elsewhere. One task runs to COMPLETE on the default single instance."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import grpc
import pytest
import requests
import tes
import yaml
from werkzeug.security import generate_password_hash

from funnel_hpc.gateway.store.placement import OwnerGroups
from funnel_hpc.proto import tes_pb2, tes_pb2_grpc
from tests.components import BWRAP, BWRAP_REASON, bwrap_ready, need
from tests.owner_helpers import drop_user, make_user, need_root
from tests.routing_post_helpers import (
    PASSWORD,
    ROUTE_TAG,
    TASK,
    basic_metadata,
    created,
    full,
    post,
    routing_overrides,
    row_count,
    stored,
)
from tests.server_helpers import ServerProcess, clean_env, funnel_argv
from tests.tes_schema_helpers import service_info_errors
from tests.waiting import wait_for_state

CAROL = "carol-api"  # an API user with no local account: no unix groups


@pytest.fixture(scope="module")
def people() -> Iterator[tuple[str, str, str]]:
    """(alice, bob, bob's extra group): real local accounts."""
    need_root()
    group = make_user("g")  # a user's own group (useradd -U) doubles as bob's extra one
    alice, bob = make_user("a"), make_user("b", groups=(group,))
    yield alice, bob, group
    for name in (alice, bob, group):
        drop_user(name)


@pytest.fixture(scope="module")
def server(people, databases, tmp_path_factory) -> Iterator[ServerProcess]:
    alice, bob, group = people
    users = {name: generate_password_hash(PASSWORD) for name in (alice, bob, CAROL)}
    srv = ServerProcess(tmp_path_factory.mktemp("routing-post"), databases.new("sqlite"),
                        overrides=routing_overrides(alice, group, users)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def stub(server) -> Iterator[tes_pb2_grpc.TaskServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield tes_pb2_grpc.TaskServiceStub(channel)
    channel.close()


def test_tag_rules_pick_the_instance_stored_tagged_and_logged(server, people):
    alice = people[0]
    for site, rule in (("other", 0), ("here", 1)):
        task_id = created(server, alice, {**TASK, "tags": {"site": site}})
        row = stored(server, task_id)
        assert row.backend == site and row.owner == alice
        assert row.spec["tags"] == {"site": site, ROUTE_TAG: site}
        task = full(server, alice, task_id)
        assert task["tags"][ROUTE_TAG] == site
        assert task["logs"][0]["system_logs"][0] == f"routed to {site} by routing[{rule}]"


def test_unroutable_task_is_400_naming_why_and_not_stored(server, people, stub):
    alice = people[0]
    before = row_count(server)
    for tags in ({}, {"site": "elsewhere"}, {"sight": "here"}):
        resp = post(server, alice, {**TASK, "tags": tags})
        assert resp.status_code == 400, resp.text
        message = resp.json()["message"]
        assert message.startswith("routing: ") and "no routing rule accepts" in message
    with pytest.raises(grpc.RpcError) as refused:
        stub.CreateTask(tes_pb2.Task(executors=[tes_pb2.Executor(image="busybox",
                                                                  command=["true"])]),
                        metadata=basic_metadata(alice), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no routing rule accepts" in refused.value.details()
    assert row_count(server) == before


def test_backend_parameters_follow_the_routed_instance(server, people):
    alice = people[0]
    asked = {"backend_parameters": {"queue": "fast"}}
    kept = created(server, alice, {**TASK, "tags": {"site": "other"}, "resources": asked})
    task = full(server, alice, kept)
    assert task["resources"]["backend_parameters"] == {"queue": "fast"}
    assert task["logs"][0]["system_logs"] == ["routed to other by routing[0]"]

    dropped = created(server, alice, {**TASK, "tags": {"site": "here"}, "resources": asked})
    task = full(server, alice, dropped)
    assert not task["resources"].get("backend_parameters")
    assert task["logs"][0]["system_logs"] == [
        "routed to here by routing[1]",
        "backend_parameters not supported by backend 'here' were ignored: queue"]

    before = row_count(server)
    strict = post(server, alice, {**TASK, "tags": {"site": "here"}, "resources": {
        **asked, "backend_parameters_strict": True}})
    assert strict.status_code == 400
    assert strict.json()["message"] == (
        "resources.backend_parameters: unsupported by backend 'here': queue "
        "(supported: gpus)")
    assert row_count(server) == before


def test_a_client_cannot_choose_its_instance(server, people):
    alice = people[0]
    # its own value of the route tag is replaced by the instance the rules chose
    task_id = created(server, alice, {**TASK, "tags": {"site": "here", ROUTE_TAG: "other"}})
    row = stored(server, task_id)
    assert row.backend == "here" and row.spec["tags"][ROUTE_TAG] == "here"
    # ... and never reaches a rule written on that tag: alone, it routes nowhere
    before = row_count(server)
    resp = post(server, alice, {**TASK, "tags": {ROUTE_TAG: "other"}})
    assert resp.status_code == 400 and "no routing rule accepts" in resp.json()["message"]
    assert row_count(server) == before
    # backend_parameters.backend chooses only under a `backend: requested` rule (none
    # here): it is a backend parameter like another, dropped by the allow-list
    task_id = created(server, alice, {**TASK, "tags": {"site": "here"},
                                      "resources": {"backend_parameters": {"backend": "other"}}})
    assert stored(server, task_id).backend == "here"
    assert full(server, alice, task_id)["logs"][0]["system_logs"][1] == \
        "backend_parameters not supported by backend 'here' were ignored: backend"


@pytest.mark.parametrize("tags, needle", [
    ({"site\x00": "here"}, "holds a NUL character"),
    ({"site": "here\x00other"}, "holds a NUL character"),
    ({"k" * 20_000: "here", "site": "here"}, "key: Length must be between 1 and 1024"),
    ({f"t{i}": "x" for i in range(10_000)}, "exceed limits.max_tags"),
    ({"site": "оther"}, "no routing rule accepts"),  # a Cyrillic о
    ({"site": "other\n"}, "no routing rule accepts"),
])
def test_hostile_tags_are_refused_cleanly(server, people, tags, needle):
    alice = people[0]
    before = row_count(server)
    resp = post(server, alice, {**TASK, "tags": tags})
    assert resp.status_code == 400 and needle in resp.json()["message"], resp.text[:300]
    assert row_count(server) == before


def test_service_info_lists_what_each_caller_may_reach(server, people):
    alice, bob, _ = people
    reach = {alice: ["here", "other", "solo"], bob: ["here", "other", "third"],
             CAROL: ["here", "other"]}
    keys = {"here": ["gpus"], "other": ["gpus", "queue"], "third": ["gpus"], "solo": ["gpus"]}
    for user, names in reach.items():
        resp = requests.get(f"{server.url}/funnel/v1/service-info", auth=(user, PASSWORD),
                            timeout=30)
        info = resp.json()
        assert service_info_errors(info) == []  # an extension TES 1.1 allows
        assert info["funnel_hpc"]["backends"] == [
            {"name": name, "kind": "local", "backend_parameters": keys[name],
             "requestable": False} for name in names]
        assert info["tesResources_backend_parameters"] == ["gpus", "queue"]
        plain = requests.get(f"{server.api}/service-info", auth=(user, PASSWORD),
                             timeout=30).json()
        assert plain == {k: v for k, v in info.items() if k != "funnel_hpc"}
    # py-tes's model refuses any key it lacks: the TES route leaves the extension out
    parsed = tes.HTTPClient(server.url, user=alice, password=PASSWORD,
                            timeout=30).get_service_info()
    assert parsed.name == "funnel-hpc" and parsed.storage
    assert parsed.tes_resources_backend_parameters == ["gpus", "queue"]


def test_grpc_routes_the_same(server, people, stub):
    alice = people[0]
    response = stub.CreateTask(tes_pb2.Task(
        executors=[tes_pb2.Executor(image="busybox", command=["true"])],
        tags={"site": "other", ROUTE_TAG: "here"}), metadata=basic_metadata(alice), timeout=30)
    row = stored(server, response.id)
    assert row.backend == "other" and row.spec["tags"][ROUTE_TAG] == "other"
    assert row.logs[0]["system_logs"][0] == "routed to other by routing[0]"
    info = stub.GetServiceInfo(tes_pb2.GetServiceInfoRequest(),
                               metadata=basic_metadata(alice), timeout=30)
    assert list(info.tesResources_backend_parameters) == ["gpus", "queue"]


def test_dashboard_shows_each_task_instance(server, people):
    alice = people[0]
    task_id = created(server, alice, {**TASK, "name": "dash", "tags": {"site": "other"}})
    auth = (alice, PASSWORD)
    listing = requests.get(server.url + "/", params={"name_prefix": "dash"}, auth=auth,
                           timeout=30)
    assert listing.status_code == 200
    assert f'data-task-id="{task_id}"' in listing.text
    assert '<td class="backend"><code>other</code></td>' in listing.text
    page = requests.get(f"{server.url}/tasks/{task_id}", auth=auth, timeout=30)
    assert '<code id="backend">other</code>' in page.text
    service = requests.get(server.url + "/service", auth=auth, timeout=30)
    assert '<tr data-backend="solo">' in service.text and 'data-backend="third"' not in \
        service.text
    backends = requests.get(server.url + "/backends", auth=auth, timeout=30)
    assert backends.status_code == 200 and "<th>Kind</th>" in backends.text


def test_owner_groups_are_the_real_unix_groups(people):
    alice, bob, group = people
    groups = OwnerGroups(max_owners=2)
    assert groups(bob) == {bob, group} and groups(alice) == {alice}
    assert groups(None) == frozenset() and groups(CAROL) == frozenset()
    assert groups("a\x00b") == frozenset() and groups("x" * 10_000) == frozenset()
    assert len(groups._cache) <= 2  # bounded: the oldest owners went first


def render(config, task: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*funnel_argv("render", "-", "--config", str(config), *args)],
                          input=json.dumps(task), capture_output=True, text=True,
                          env=clean_env(), timeout=120)


def test_render_routes_like_post(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "work_dir": str(tmp_path / "work"),
        "backends": {"cpu": {"kind": "slurm", "partition": "debug"},
                     "gpu": {"kind": "slurm", "partition": "gpupart"},
                     "here": {"kind": "local"}},
        "routing": [{"when": {"tags": {"site": "gpu"}}, "backend": "gpu"},
                    {"when": {"tags": {"site": "here"}}, "backend": "here"},
                    {"when": {"tags": {"site": "cpu"}}, "backend": "cpu"}]}))
    routed = render(config, {**TASK, "tags": {"site": "gpu", ROUTE_TAG: "cpu"}})
    assert routed.returncode == 0, routed.stderr
    assert routed.stderr == "routed to gpu by routing[0]\n"
    assert "#SBATCH --partition=gpupart" in routed.stdout
    forced = render(config, {**TASK, "tags": {"site": "gpu"}}, "--backend", "cpu")
    assert forced.returncode == 0, forced.stderr
    assert forced.stderr == "forced to cpu by --backend (routing: routed to gpu by routing[0])\n"
    assert "#SBATCH --partition=debug" in forced.stdout
    for task, args, needle in (
            ({**TASK, "tags": {"site": "here"}}, (), "kind local) submits no script"),
            (TASK, (), "routing: no routing rule accepts"),
            (TASK, ("--backend", "nosuch"), "no backend instance 'nosuch' (instances: cpu")):
        bad = render(config, task, *args)
        assert bad.returncode == 1 and bad.stdout == "", bad.stdout
        assert needle in bad.stderr and len(bad.stderr.splitlines()) == 1, bad.stderr


def test_single_instance_task_runs_to_complete(databases, tmp_path):
    """Nothing regressed without `backends:`: one instance named after backend.name, a
    client's tags kept as sent."""
    need(BWRAP, bwrap_ready(), BWRAP_REASON)
    srv = ServerProcess(tmp_path / "srv", databases.new("sqlite"), reconcile=True, overrides={
        "backend": {"name": "local", "local": {"max_concurrent": 1}},
        "reconciler": {"interval_seconds": 0.5},
        "worker": {"container_driver": "bwrap", "poll_server_seconds": 1}}).start()
    try:
        resp = requests.post(f"{srv.api}/tasks", json={
            "executors": [{"image": "busybox", "command": ["echo", "hi"]}]}, timeout=30)
        assert resp.status_code == 200, resp.text
        task_id = resp.json()["id"]
        task = wait_for_state(srv.api, task_id, "COMPLETE", 300, detail=lambda: srv.log()[-3000:])
        # one instance: stored as sent (no route tag, no route line: nothing to say)
        assert "tags" not in task and not any("routed to" in line for entry in task["logs"]
                                              for line in entry.get("system_logs") or [])
        assert task["logs"][0]["logs"][0]["stdout"] == "hi\n"
        assert stored(srv, task_id).backend == "local"
    finally:
        srv.stop()
        shutil.rmtree(tmp_path / "srv", ignore_errors=True)
