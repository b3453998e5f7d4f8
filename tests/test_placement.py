"""gateway/store/placement.py on its own: the route tag, a task that names its instance
(a `backend: requested` rule, whose matching core/routing.py owns), and which instances a
caller may reach, with hand-built rules (the rule language itself: tests/test_routing.py)."""

from __future__ import annotations

import pytest

from funnel_hpc.core.routing import ROUTE_TAG, Route, Router, Rule, RuleError
from funnel_hpc.gateway.store.placement import OwnerGroups, Placement

KINDS = {"here": "local", "gpu": "slurm", "cloud": "aws-batch", "lab": "local"}


class NoGroups(OwnerGroups):
    """Groups by a fixed table, not the account database (the real lookup:
    tests/test_routing_post.py::test_owner_groups_are_the_real_unix_groups)."""

    def __init__(self, table: dict[str, frozenset[str]]):
        super().__init__()
        self.table = table

    def _look_up(self, owner: str) -> frozenset[str]:  # type: ignore[override]
        return self.table.get(owner, frozenset())


def placement(*rules: Rule) -> Placement:
    return Placement(Router(rules, default="here"), KINDS,
                     NoGroups({"bob": frozenset({"gpu-users"})}))


def test_a_requested_route_takes_the_backend_key_out():
    chooser = placement(Rule(0, {}, "requested", allowed=("here", "gpu")))
    spec = {"resources": {"backend_parameters": {"Backend": "gpu", "queue": "q"}}}
    chooser.take_request(spec, Route("gpu", 0))
    assert spec["resources"]["backend_parameters"] == {"queue": "q"}
    # under another rule the key stays: the instance's allow-list decides
    other = placement(Rule(0, {}, "here"))
    spec = {"resources": {"backend_parameters": {"backend": "gpu"}}}
    other.take_request(spec, Route("here", 0))
    assert spec["resources"]["backend_parameters"] == {"backend": "gpu"}


def test_the_route_tag_is_the_instance_never_the_clients():
    # a rule cannot read the route tag (refused at load), and a client's is overwritten
    with pytest.raises(RuleError, match="a rule cannot read it"):
        Rule(0, {"tags": {ROUTE_TAG: "gpu"}}, "gpu")
    rules = placement(Rule(0, {"tags": {"x": "2"}}, "gpu"), Rule(1, {}, "here"))
    spec = {"tags": {ROUTE_TAG: "gpu", "x": "1"}}
    assert rules.route(spec, "alice").instance == "here"
    assert spec["tags"] == {"x": "1", ROUTE_TAG: "here"}
    single = Placement(Router((), default="here"), {"here": "local"})
    spec = {"tags": {ROUTE_TAG: "gpu"}}
    assert single.route(spec, None).instance == "here" and spec["tags"] == {ROUTE_TAG: "gpu"}


def test_reachable_follows_owner_and_group_conditions():
    rules = placement(
        Rule(0, {"group": "gpu-users"}, "gpu", overflow=("cloud",)),
        Rule(1, {"owner": ["alice"]}, "lab"),
        Rule(2, {}, "requested", allowed=("here",)),
    )
    def names(owner):
        return [(r.name, r.kind, r.requestable) for r in rules.reachable(owner)]
    assert names("bob") == [("here", "local", True), ("gpu", "slurm", False),
                            ("cloud", "aws-batch", False)]
    assert names("alice") == [("here", "local", True), ("lab", "local", False)]
    assert names(None) == [("here", "local", True)]
    assert [r.name for r in placement().reachable("anyone")] == ["here"]
