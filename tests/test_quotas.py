"""Per-owner limits and fair share (limits.per_owner; core/quotas.py,
gateway/reconcile/quotas.py): real local users, auth on, a real server with the local
backend and the real worker behind a gate the test opens (tests/quota_helpers.py), so what
is in flight when is decided by the test, not by timing."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import insert, text

from funnel_hpc.core import config as config_mod
from funnel_hpc.core.quotas import OwnerUsage, QuotaPolicy
from funnel_hpc.gateway.store import db, owner_counts
from funnel_hpc.gateway.store.placement import OwnerGroups
from tests.components import (
    BWRAP,
    BWRAP_REASON,
    POSTGRES,
    POSTGRES_REASON,
    SLURM,
    SLURM_REASON,
    bwrap_ready,
    need,
    slurm_answers,
)
from tests.image_helpers import drop_group, drop_user, local_group, local_user
from tests.quota_helpers import Gates, Sampler, jobs_in_flight, waiting_lines
from tests.server_helpers import ServerProcess, _postgres_reachable
from tests.waiting import wait_for, wait_for_state

TIMEOUT = 120.0
TRUE = {"executors": [{"image": "busybox", "command": ["true"]}]}


def need_root_and_bwrap() -> None:
    need("root", os.geteuid() == 0, "these tests make local users (useradd)")
    need(BWRAP, bwrap_ready(), BWRAP_REASON)


class Site:
    """A running server and its users: name -> bearer token."""

    def __init__(self, server: ServerProcess, gates: Gates, tokens: dict[str, str]):
        self.server = server
        self.gates = gates
        self.tokens = tokens

    @property
    def db_file(self) -> Path:
        return self.server.work_dir / "funnel.db"

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def create(self, user: str, cores: int | None = None) -> str:
        body: dict[str, object] = dict(TRUE)
        if cores is not None:
            body["resources"] = {"cpu_cores": cores}
        resp = requests.post(self.server.api + "/tasks", json=body, headers=self.headers(user),
                             timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()["id"]

    def get(self, task_id: str, user: str = "root") -> dict:
        resp = requests.get(f"{self.server.api}/tasks/{task_id}", params={"view": "FULL"},
                            headers=self.headers(user), timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def wait_state(self, task_id: str, states: str | tuple[str, ...]) -> dict:
        return wait_for_state(self.server.api, task_id, states, TIMEOUT,
                              auth=lambda request: _bearer(request, self.tokens["root"]),
                              detail=lambda: self.server.log()[-3000:])

    def wait_started(self, task_id: str) -> None:
        wait_for(lambda: task_id in self.gates.started(), TIMEOUT, f"task {task_id}'s job",
                 detail=lambda: self.server.log()[-3000:])

    def wait_told(self, task_id: str) -> list[str]:
        return wait_for(lambda: waiting_lines(self.get(task_id)), TIMEOUT,
                        f"task {task_id} to say why it waits",
                        detail=lambda: self.server.log()[-3000:])

    def metrics(self) -> str:
        return requests.get(self.server.url + "/metrics", timeout=30).text

    def ticks(self) -> float:
        found = re.search(r"^funnel_reconciler_tick_seconds_count (\S+)$", self.metrics(), re.M)
        return float(found.group(1)) if found else 0.0

    def wait_ticks(self, count: int) -> None:
        start = self.ticks()
        wait_for(lambda: self.ticks() >= start + count, TIMEOUT, f"{count} reconciler ticks")


def _bearer(request, token: str):
    request.headers["Authorization"] = f"Bearer {token}"
    return request


def start_site(work: Path, users: list[str], per_owner: dict, *, max_concurrent: int = 16,
               reconcile: bool = True, backend: str = "local") -> Site:
    tokens = {user: f"tok-{user}" for user in users} | {"root": "tok-root"}
    gates = Gates(work / "gates")
    overrides: dict[str, object] = {
        "auth": {"mode": "bearer", "tokens": {token: user for user, token in tokens.items()},
                 "admins": ["root"]},
        "backend": {"name": backend, "local": {"max_concurrent": max_concurrent}},
        "reconciler": {"interval_seconds": 0.2},
        "limits": {"per_owner": per_owner},
        "worker": {"container_driver": "bwrap", "poll_server_seconds": 1,
                   "command": gates.command()}}
    server = ServerProcess(work, f"sqlite:///{work}/funnel.db", reconcile=reconcile,
                           overrides=overrides)
    server.start()
    return Site(server, gates, tokens)


@pytest.fixture(scope="module")
def people() -> Iterator[dict[str, str]]:
    """Real local users alice, bob and carol (carol in a group of her own) and the group."""
    need_root_and_bwrap()
    group = local_group("qg")
    names = {"alice": local_user("qa"), "bob": local_user("qb"),
             "carol": local_user("qc", (group,)), "group": group}
    yield names
    for key, name in names.items():
        if key != "group":
            drop_user(name)
    drop_group(group)


@pytest.fixture(scope="module")
def site(people, tmp_path_factory) -> Iterator[Site]:
    """alice: 1 task in flight (her own limit); bob: none; carol's group: 4 cpu cores in
    flight on the local instance; per-owner metrics labelled."""
    alice, carol_group = people["alice"], people["group"]
    srv = start_site(tmp_path_factory.mktemp("quotas"),
                     [people["alice"], people["bob"], people["carol"]], {
                         "owners": {alice: {"max_tasks_in_flight": 1}},
                         "groups": {carol_group: {"instances": {
                             "local": {"max_cpu_cores_in_flight": 4}}}},
                         "metrics_by_owner": True})
    yield srv
    srv.gates.open()
    srv.server.stop()


# ---- a real server, real users, the real worker ----

def test_owner_limit_holds_and_other_owners_do_not_wait(site: Site, people) -> None:
    alice, bob = people["alice"], people["bob"]
    with Sampler(site.db_file, alice) as sampler:
        mine = [site.create(alice) for _ in range(4)]
        bobs = site.create(bob)
        # bob's job starts while alice's first holds her only place
        site.wait_started(bobs)
        site.wait_started(mine[0])
        told = site.wait_told(mine[1])
        assert told[0].split(" ", 1)[1] == (
            f"waiting: {alice} has 1 of 1 tasks in flight "
            f"(limits.per_owner.owners.{alice}.max_tasks_in_flight)")
        # shown once, not every tick (its row is not written again); the tasks behind it
        # are not its head: no line yet
        written = row_written_at(site, mine[1])
        site.wait_ticks(10)
        assert row_written_at(site, mine[1]) == written
        assert len(waiting_lines(site.get(mine[1]))) == 1
        assert waiting_lines(site.get(mine[2])) == waiting_lines(site.get(mine[3])) == []
        # the owner sees it in her own FULL view too
        assert waiting_lines(site.get(mine[1], alice)) == told
        assert site.get(mine[1], alice)["state"] == "QUEUED"
        check_metrics_by_owner(site, alice)
        check_owners_page(site, alice, bob)
        for index, task_id in enumerate(mine):
            assert [t for t in site.gates.started() if t in mine] == mine[:index + 1]
            site.gates.open(task_id)
            site.wait_state(task_id, "COMPLETE")
            if index + 1 < len(mine):
                site.wait_started(mine[index + 1])
        site.gates.open(bobs)
        site.wait_state(bobs, "COMPLETE")
    assert sampler.samples > 10 and sampler.most == 1
    assert waiting_lines(site.get(mine[0])) == []
    for task_id in mine[1:]:  # each waited at the head of her queue once, and said so once
        assert len(waiting_lines(site.get(task_id))) == 1
    assert waiting_lines(site.get(bobs)) == []


def row_written_at(site: Site, task_id: str) -> str:
    """The task row's updated_at: every write of it moves it."""
    engine = db.make_engine(f"sqlite:///{site.db_file}")
    try:
        with db.reading(engine) as conn:
            return conn.execute(text("SELECT updated_at FROM tasks WHERE id = :id"),
                                {"id": task_id}).scalar_one()
    finally:
        engine.dispose()


def check_metrics_by_owner(site: Site, alice: str) -> None:
    text = site.metrics()
    assert f'funnel_owner_tasks_in_flight{{owner="{alice}"}} 1.0' in text
    assert f'funnel_owner_at_limit{{owner="{alice}"}} 1.0' in text
    at_limit = re.search(r"^funnel_owners_at_limit (\S+)$", text, re.M)
    assert at_limit is not None and float(at_limit.group(1)) >= 1


def check_owners_page(site: Site, alice: str, bob: str) -> None:
    page = requests.get(site.server.url + "/owners", headers=site.headers("root"), timeout=30)
    assert page.status_code == 200, page.text
    row = re.search(rf'<tr class="owner at-limit" data-owner="{alice}">(.*?)</tr>', page.text,
                    re.S)
    assert row is not None, page.text
    assert '<td class="tasks">1 of 1</td>' in row.group(1)
    assert '<td class="waiting">3</td>' in row.group(1)
    refused = requests.get(site.server.url + "/owners", headers=site.headers(bob), timeout=30)
    assert refused.status_code == 403
    assert alice not in refused.text
    home = requests.get(site.server.url + "/", headers=site.headers(bob), timeout=30)
    assert "/owners" not in home.text  # the link is for admins only


def test_cpu_cores_group_and_instance_limit(site: Site, people) -> None:
    carol, group = people["carol"], people["group"]
    first = site.create(carol, cores=3)
    oversized = site.create(carol, cores=8)
    fits = site.create(carol, cores=1)
    last = site.create(carol, cores=1)
    key = f"limits.per_owner.groups.{group}.instances.local.max_cpu_cores_in_flight"
    # a task that could never fit is passed over, not a wall for the rest of her queue
    assert site.wait_told(oversized)[0].split(" ", 1)[1] == (
        f"waiting: this task needs 8 cpu cores, more than {carol} may have in flight on "
        f"local (4: {key}); it starts only if that limit is raised")
    site.wait_started(first)
    site.wait_started(fits)
    assert site.wait_told(last)[0].split(" ", 1)[1] == (
        f"waiting: {carol} has 4 of 4 cpu cores in flight on local and this task needs 1 "
        f"({key})")
    assert last not in site.gates.started()
    assert jobs_in_flight(site.db_file, carol) == 2
    site.gates.open(first)
    site.wait_state(first, "COMPLETE")
    site.wait_started(last)
    resp = requests.post(f"{site.server.api}/tasks/{oversized}:cancel",
                         headers=site.headers(carol), timeout=30)
    assert resp.status_code == 200
    for task_id in (fits, last):
        site.gates.open(task_id)
        site.wait_state(task_id, "COMPLETE")
    assert site.get(oversized)["state"] == "CANCELED"


def test_owners_take_turns(people, tmp_path) -> None:
    """10 of alice's tasks, then 2 of bob's, all QUEUED before the reconciler starts: its
    first submissions alternate, oldest owner first; jobs start one at a time, in the order
    they were submitted (the local backend's queue), so the start order is that order."""
    alice, bob = people["alice"], people["bob"]
    site = start_site(tmp_path, [alice, bob], {}, max_concurrent=1, reconcile=False)
    try:
        hers = [site.create(alice) for _ in range(10)]
        his = [site.create(bob) for _ in range(2)]
        site.server.stop()
        site.server.reconcile = True
        site.gates.open()
        site.server.start()
        for task_id in [*hers, *his]:
            site.wait_state(task_id, "COMPLETE")
        assert site.gates.started() == [hers[0], his[0], hers[1], his[1], *hers[2:]]
        text = site.metrics()  # no limits.per_owner.metrics_by_owner: no owner names
        assert 'owner="' not in text and alice not in text
        assert re.search(r"^funnel_owners_in_flight 0\.0$", text, re.M)
        assert re.search(r"^funnel_owners_at_limit 0\.0$", text, re.M)
    finally:
        site.gates.open()
        site.server.stop()


@pytest.mark.slurm
def test_owner_limit_on_real_slurm(people, tmp_path) -> None:
    """The same bound with a real scheduler: a job PENDING or RUNNING in Slurm holds the
    owner's place; the next task gets no job until the first one ends."""
    need(SLURM, slurm_answers(), SLURM_REASON)
    alice = people["alice"]
    site = start_site(tmp_path, [alice], {"owners": {alice: {"max_tasks_in_flight": 1}}},
                      backend="slurm")
    try:
        with Sampler(site.db_file, alice) as sampler:
            first, second = site.create(alice), site.create(alice)
            site.wait_started(first)
            assert site.wait_told(second)[0].split(" ", 1)[1] == (
                f"waiting: {alice} has 1 of 1 tasks in flight "
                f"(limits.per_owner.owners.{alice}.max_tasks_in_flight)")
            assert second not in site.gates.started()
            site.gates.open(first)
            site.wait_state(first, "COMPLETE")
            site.wait_started(second)
            site.gates.open(second)
            site.wait_state(second, "COMPLETE")
        assert sampler.most == 1
    finally:
        site.gates.open()
        site.server.stop()


# ---- the limits, resolved (core/quotas.py) ----

def policy(members: dict[str, frozenset[str]] | None = None,
           **per_owner: object) -> QuotaPolicy:
    """limits.per_owner as loaded; `members`: owner -> their unix groups."""
    loaded = config_mod.load(environ={}, overrides={"limits": {"per_owner": per_owner}})
    return QuotaPolicy(loaded.limits.per_owner,
                       groups_of=lambda owner: (members or {}).get(owner or "", frozenset()))


def test_the_most_specific_level_decides_key_by_key() -> None:
    quotas = policy({"ann": frozenset({"lab", "big", "other"})},
                    max_tasks_in_flight=5, max_cpu_cores_in_flight=50,
                    instances={"local": {"max_tasks_in_flight": 2}},
                    groups={"lab": {"max_tasks_in_flight": 10, "max_cpu_cores_in_flight": 8},
                            "big": {"max_tasks_in_flight": 20,
                                    "instances": {"local": {"max_tasks_in_flight": 0}}},
                            "unrelated": {"max_tasks_in_flight": 99}},
                    owners={"ann": {"max_cpu_cores_in_flight": 16}})
    ann = quotas.limits("ann")
    # the most generous of her groups; her own entry
    assert (ann.tasks.limit, ann.tasks.key) == (
        20, "limits.per_owner.groups.big.max_tasks_in_flight")
    assert (ann.cores.limit, ann.cores.key) == (
        16, "limits.per_owner.owners.ann.max_cpu_cores_in_flight")
    tasks_on_local, cores_on_local = ann.instances["local"]
    assert (tasks_on_local.limit, tasks_on_local.key) == (  # 0: no limit is most generous
        0, "limits.per_owner.groups.big.instances.local.max_tasks_in_flight")
    assert cores_on_local.limit == 0
    other = quotas.limits("bo")  # no entry, no group: the defaults
    assert (other.tasks.limit, other.cores.limit) == (5, 50)
    assert other.instances["local"][0].key == "limits.per_owner.instances.local.max_tasks_in_flight"
    assert quotas.limits(None).tasks.limit == 5  # auth off: one shared owner, the defaults
    used = OwnerUsage()
    used.add("local", 2, 2)
    refusal = quotas.refusal("bo", other, used, "local", 1)
    assert refusal is not None and refusal.reason == (
        "waiting: bo has 2 of 2 tasks in flight on local "
        "(limits.per_owner.instances.local.max_tasks_in_flight)")
    assert quotas.refusal("ann", ann, used, "local", 1) is None
    assert quotas.enabled and not policy().enabled
    forged = quotas.refusal("x\nINFO forged line", other, used, "local", 1)
    assert forged is not None and "\n" not in forged.reason
    assert '"x\\nINFO forged line" has 2 of 2' in forged.reason


def test_group_limits_of_a_real_user(people) -> None:
    """The gateway's own lookup (gateway/store/placement.py's OwnerGroups) of real users;
    hostile names (a token's, an OIDC subject's) have no groups."""
    group = people["group"]
    quotas = QuotaPolicy(config_mod.load(environ={}, overrides={"limits": {"per_owner": {
        "groups": {group: {"max_tasks_in_flight": 3}, "unrelated": {}}}}}).limits.per_owner,
        OwnerGroups())
    assert quotas.groups(people["carol"]) == {group}
    assert quotas.limits(people["carol"]).tasks.key == (
        f"limits.per_owner.groups.{group}.max_tasks_in_flight")
    for name in (people["alice"], "no-such-user-here", "a\x00b", "../etc", "é" * 300):
        assert quotas.groups(name) == frozenset()
        assert quotas.limits(name).tasks.limit == 0


@pytest.mark.parametrize(("per_owner", "message"), [
    ({"owners": {"alice": {"max_tasks_in_flight": "x"}}},
     ('limits.per_owner.owners.alice.max_tasks_in_flight: expected an integer or null, '
      'got "x"')),
    ({"groups": {"lab": {"instances": {"local": {"max_cpu_cores_in_flight": 1.5}}}}},
     ("limits.per_owner.groups.lab.instances.local.max_cpu_cores_in_flight: expected an "
      "integer or null, got 1.5")),
    ({"owners": {"alice": {"max_task_in_flight": 1}}},
     "unknown configuration key: limits.per_owner.owners.alice.max_task_in_flight"),
    ({"instances": {"gpu": {"max_tasks_in_flight": 1}}},
     "limits.per_owner.instances.gpu: no backend instance 'gpu' (instances: local)"),
    ({"owners": {"alice": {"max_cpu_cores_in_flight": -1}}},
     "limits.per_owner.owners.alice.max_cpu_cores_in_flight: 0 (no limit) or more, got -1"),
    ({"max_tasks_in_flight": True},
     "limits.per_owner.max_tasks_in_flight: expected an integer or null, got true"),
    ({"metrics_by_owner": "yes"},
     'limits.per_owner.metrics_by_owner: expected true or false, got "yes"'),
])
def test_configuration_errors_name_the_key(per_owner: dict, message: str) -> None:
    with pytest.raises(config_mod.ConfigError) as caught:
        config_mod.load(environ={}, overrides={"limits": {"per_owner": per_owner}})
    assert str(caught.value) == message


# ---- the store: cpu_cores at create, the migration, the grouped count ----

@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres",
                                                         marks=pytest.mark.postgres)])
def test_migration_fills_cpu_cores_of_active_tasks(kind: str, databases) -> None:
    if kind == "postgres":
        need(POSTGRES, _postgres_reachable(), POSTGRES_REASON)
    engine = db.make_engine(databases.new(kind))
    db.upgrade(engine, "0007_backend_health_ticks")
    rows = [("a", "RUNNING", {"resources": {"cpu_cores": 6}}, "j1"),
            ("b", "QUEUED", {"resources": {}}, None),
            ("c", "COMPLETE", {"resources": {"cpu_cores": 3}}, "j3"),
            ("d", "QUEUED", {"resources": {"cpu_cores": "9"}}, "j4"),
            ("f", "QUEUED", {}, "j5")]
    with db.writing(engine) as conn:  # as 0007's gateway wrote them: no cpu_cores column
        conn.execute(text(
            "INSERT INTO tasks (id, state, owner, creation_time, spec, logs, backend, job_id, "
            "attempt, event_seq, updated_at) VALUES (:id, :state, 'ann', 't', :spec, '[]', "
            "'local', :job, 1, 0, 't')"),
            [{"id": i, "state": s, "spec": json.dumps(spec), "job": job}
             for i, s, spec, job in rows])
    db.upgrade(engine)
    with db.reading(engine) as conn:
        read = conn.execute(text("SELECT id, cpu_cores FROM tasks"))
        found = {row.id: row.cpu_cores for row in read}
    assert found == {"a": 6, "b": None, "c": None, "d": None, "f": None}
    usage = owner_counts.in_flight(engine)["ann"]  # a, d and f hold jobs; NULL counts 1
    assert (usage.overall.tasks, usage.overall.cores) == (3, 8)
    with db.writing(engine) as conn:
        conn.execute(insert(db.tasks), [{
            "id": "e", "state": "INITIALIZING", "owner": "ann", "creation_time": "t",
            "spec": {}, "logs": [], "backend": "gpu", "job_id": "", "attempt": 1,
            "event_seq": 0, "updated_at": "t", "cpu_cores": 4}])
    usage = owner_counts.in_flight(engine)["ann"]  # a claim counts
    assert (usage.on("gpu").tasks, usage.on("gpu").cores, usage.overall.cores) == (1, 4, 12)
    assert owner_counts.waiting(engine) == {"ann": 1}
    engine.dispose()
