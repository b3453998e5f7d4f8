"""Routing rules (core/routing.py): the rule language, its validation with key paths, first
match wins, `backend: requested`, the 400 text, and hostile task values. The rules are
loaded through the real configuration loader where a test is about the configuration."""

from __future__ import annotations

import pytest

from funnel_hpc.core import config
from funnel_hpc.core.routing import (
    MAX_REASON,
    MAX_RULES,
    ROUTE_TAG,
    Route,
    Router,
    RuleError,
    Unroutable,
    duration,
    parse_rules,
)
from funnel_hpc.core.routing_when import MAX_VALUES

INSTANCES = ["here", "gpu", "partner", "big"]
# the example, with every `when` key
EXAMPLE = [
    {"when": {"tags": {"site": "partner"}}, "backend": "partner"},
    {"when": {"backend_parameters": {"gpus": "any"}}, "backend": "gpu",
     "overflow": ["partner"], "max_queue_wait": "30m"},
    {"when": {"resources": {"cpu_cores": {"min": 8}, "ram_gb": {"max": 512},
                            "preemptible": True, "zones": ["eu-1", "eu-2"]}},
     "backend": "big"},
    {"when": {"owner": ["alice", "bob"]}, "backend": "here"},
    {"when": {"group": "gpu-users"}, "backend": "gpu"},
    {"backend": "requested", "allowed": ["here", "gpu"], "default": "here"},
    {"backend": "here"},
]


def router(rules: list, default: str = "here") -> Router:
    return Router(parse_rules(rules, INSTANCES), default)


def one(when: dict) -> Router:
    """A router whose only rule sends what `when` accepts to big (else Unroutable)."""
    return router([{"when": when, "backend": "big"}])


def taken(when: dict, task: dict, owner: str | None = None,
          groups: frozenset[str] = frozenset()) -> bool:
    try:
        return one(when).route(task, owner, groups).instance == "big"
    except Unroutable:
        return False


def params(**values: str) -> dict:
    return {"resources": {"backend_parameters": values}}


# ---- the example, through the configuration loader ----

EXAMPLE_YAML = """\
backends:
  here: {kind: local}
  gpu: {kind: slurm, partition: gpu}
  partner: {kind: local}
  big: {kind: slurm, partition: big}
routing:
  - {when: {tags: {site: partner}}, backend: partner}
  - {when: {backend_parameters: {gpus: any}}, backend: gpu, overflow: [partner],
     max_queue_wait: 30m}
  - {when: {resources: {cpu_cores: {min: 8}, ram_gb: {max: 512}, preemptible: true,
                        zones: [eu-1, eu-2]}}, backend: big}
  - {when: {owner: [alice, bob]}, backend: here}
  - {when: {group: gpu-users}, backend: gpu}
  - {backend: requested, allowed: [here, gpu], default: here}
  - {backend: here}
"""


def test_the_example_loads_and_routes(tmp_path):
    path = tmp_path / "funnel.yaml"
    path.write_text(EXAMPLE_YAML)
    loaded = config.load(path, environ={}).router()
    big = {"resources": {"cpu_cores": 16, "ram_gb": 64, "preemptible": True,
                         "zones": ["us-1", "eu-2"]}}
    cases = [
        ({"tags": {"site": "partner"}}, None, "partner", 0),
        (params(GPUs="1"), None, "gpu", 1),
        (big, None, "big", 2),
        ({}, "bob", "here", 3),
        ({}, "carol", "here", 5),
        (params(backend="gpu"), "carol", "gpu", 5),
    ]
    for task, owner, instance, rule in cases:
        route = loaded.route(task, owner, frozenset())
        assert (route.instance, route.rule) == (instance, rule), task
    route = loaded.route({}, "carol", frozenset({"gpu-users"}))
    assert (route.instance, route.rule) == ("gpu", 4)
    gpu = loaded.route(params(gpus="2"))
    assert gpu.fallbacks == ("partner",) and gpu.max_queue_wait == 1800


def test_a_bad_rule_is_a_config_error_naming_its_key(tmp_path):
    path = tmp_path / "funnel.yaml"
    path.write_text(EXAMPLE_YAML.replace("{min: 8}", "{min: eight}"))
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, environ={})
    assert str(caught.value) == \
        'routing[2].when.resources.cpu_cores.min: expected a number, got "eight"'


def test_no_rules_send_everything_to_the_default():
    route = Router(parse_rules([], INSTANCES), "gpu").route({"tags": {"x": "y"}})
    assert (route.instance, route.rule, route.fallbacks) == ("gpu", None, ())
    assert route.describe() == "routed to gpu by the default"


# ---- order and the `when` keys ----

def test_first_match_wins_and_empty_when_matches_all():
    rules = router([{"when": {"tags": {"a": "any"}}, "backend": "gpu"},
                    {"when": {"tags": {"b": "any"}}, "backend": "partner"},
                    {"when": {}, "backend": "big"}])
    assert rules.route({"tags": {"a": "1", "b": "1"}}).instance == "gpu"
    assert rules.route({"tags": {"b": "1"}}).rule == 1
    assert rules.route({"tags": {"c": "1"}}).rule == 2


def test_all_when_keys_must_match():
    when = {"tags": {"site": "x"}, "owner": "alice"}
    assert taken(when, {"tags": {"site": "x"}}, "alice")
    assert not taken(when, {"tags": {"site": "x"}}, "bob")
    assert not taken(when, {"tags": {"site": "y"}}, "alice")


@pytest.mark.parametrize("task,expected", [
    ({"tags": {"site": "partner"}}, True),
    ({"tags": {"site": "partner", "other": "1"}}, True),
    ({"tags": {"site": "Partner"}}, False),       # values are exact
    ({"tags": {"Site": "partner"}}, False),       # tag keys are exact too
    ({"tags": {"site": ""}}, False),
    ({"tags": {}}, False),
    ({}, False),
])
def test_tags_exact(task, expected):
    assert taken({"tags": {"site": "partner"}}, task) is expected


def test_tags_any_means_present():
    assert taken({"tags": {"site": "any"}}, {"tags": {"site": ""}})
    assert not taken({"tags": {"site": "any"}}, {"tags": {"sitex": "1"}})
    assert taken({"tags": {"a": "any", "b": "2"}}, {"tags": {"a": "x", "b": "2"}})
    assert not taken({"tags": {"a": "any", "b": "2"}}, {"tags": {"a": "x"}})


@pytest.mark.parametrize("task,expected", [
    (params(gpus="2"), True),
    (params(GPUS="2"), True),                     # keys are case-insensitive
    (params(Gpus="3"), False),                    # values are exact
    (params(other="2"), False),
    ({"resources": {}}, False),
])
def test_backend_parameters(task, expected):
    assert taken({"backend_parameters": {"GPUs": "2"}}, task) is expected


@pytest.mark.parametrize("when,task,expected", [
    ({"cpu_cores": {"min": 8}}, {"cpu_cores": 8}, True),
    ({"cpu_cores": {"min": 8}}, {"cpu_cores": 7}, False),
    ({"cpu_cores": {"max": 8}}, {"cpu_cores": 8}, True),
    ({"cpu_cores": {"max": 8}}, {"cpu_cores": 9}, False),
    ({"cpu_cores": {"min": 2, "max": 4}}, {"cpu_cores": 3}, True),
    ({"cpu_cores": 4}, {"cpu_cores": 4}, True),
    ({"cpu_cores": 4}, {"cpu_cores": 5}, False),
    ({"cpu_cores": 1}, {}, True),                 # a task without it: 1 core
    ({"cpu_cores": {"min": 2}}, {}, False),
    ({"ram_gb": {"max": 512}}, {"ram_gb": 512.0}, True),
    ({"ram_gb": {"max": 512}}, {"ram_gb": 512.5}, False),
    ({"ram_gb": {"max": 512}}, {}, True),         # without it: 0
    ({"ram_gb": {"min": 0.5}}, {}, False),
    ({"disk_gb": {"min": 100}}, {"disk_gb": 100}, True),
    ({"disk_gb": 0}, {}, True),
    ({"preemptible": True}, {"preemptible": True}, True),
    ({"preemptible": True}, {}, False),           # without it: false
    ({"preemptible": False}, {}, True),
    ({"preemptible": False}, {"preemptible": True}, False),
    ({"zones": ["eu-1", "eu-2"]}, {"zones": ["us-1", "eu-2"]}, True),
    ({"zones": ["eu-1", "eu-2"]}, {"zones": ["us-1"]}, False),
    ({"zones": ["eu-1"]}, {"zones": []}, False),  # no zones: no match (documented)
    ({"zones": ["eu-1"]}, {}, False),
])
def test_resources(when, task, expected):
    assert taken({"resources": when}, {"resources": task}) is expected


@pytest.mark.parametrize("when,owner,groups,expected", [
    ({"owner": "alice"}, "alice", (), True),
    ({"owner": ["alice", "bob"]}, "bob", (), True),
    ({"owner": "alice"}, "Alice", (), False),
    ({"owner": "alice"}, None, (), False),        # auth off: no owner
    ({"group": "gpu"}, "x", ("users", "gpu"), True),
    ({"group": ["a", "b"]}, "x", ("b",), True),
    ({"group": "gpu"}, "x", ("users",), False),
    ({"group": "gpu"}, None, (), False),
])
def test_owner_and_group(when, owner, groups, expected):
    assert taken(when, {}, owner, frozenset(groups)) is expected


def test_groups_may_come_as_any_iterable():
    rules = one({"group": "gpu"})
    assert rules.route({}, "x", ["gpu", 3, None]).instance == "big"  # type: ignore[arg-type]


# ---- backend: requested ----

REQUESTED = [{"when": {"group": "staff"}, "backend": "requested", "allowed": ["here", "gpu"]},
             {"backend": "requested", "allowed": ["here", "gpu"], "default": "here"}]


def test_requested_takes_an_allowed_instance():
    rules = router(REQUESTED)
    route = rules.route(params(Backend="gpu"))
    assert (route.instance, route.rule, route.requested) == ("gpu", 1, True)
    assert route.describe() == ("routed to gpu by routing[1] (asked for in "
                                "backend_parameters.backend)")
    assert route.fallbacks == () and route.max_queue_wait is None


def test_requested_default_and_fall_through():
    rules = router(REQUESTED)
    # the first rule has no default: a task that names nothing goes on to the next
    route = rules.route({}, "x", frozenset({"staff"}))
    assert (route.instance, route.rule, route.requested) == ("here", 1, False)
    assert route.describe() == "routed to here by routing[1]"
    assert rules.route(params(backend="gpu"), "x", frozenset({"staff"})).rule == 0
    only = router(REQUESTED[:1])
    with pytest.raises(Unroutable, match=r"routing\[0\] needs backend_parameters.backend "
                                         r"\(one of here, gpu\)"):
        only.route({}, "x", frozenset({"staff"}))


@pytest.mark.parametrize("asked", ["foo", "GPU", "gpu ", "", "partner", "requested"])
def test_requested_refuses_what_is_not_allowed(asked):
    with pytest.raises(Unroutable) as caught:
        router(REQUESTED).route(params(backend=asked))
    assert str(caught.value) == (f"resources.backend_parameters.backend: {asked!r} is not an "
                                 "instance you may choose (allowed: here, gpu)")


def test_a_refused_request_does_not_fall_through_to_later_rules():
    rules = router([*REQUESTED, {"backend": "big"}])
    with pytest.raises(Unroutable, match="not an instance you may choose"):
        rules.route(params(backend="big"))


def test_requestable_and_parameter_keys():
    rules = router([*REQUESTED[:1], {"when": {"backend_parameters": {"GPUs": "any"}},
                                     "backend": "gpu"},
                    {"when": {"owner": "bob"}, "backend": "requested",
                     "allowed": ["big", "gpu"]},
                    {"backend": "requested", "allowed": ["partner"]}])
    assert rules.requestable("alice") == ("partner",)
    assert rules.requestable("bob") == ("big", "gpu", "partner")
    assert rules.requestable("alice", frozenset({"staff"})) == ("here", "gpu", "partner")
    assert rules.parameter_keys() == frozenset({"backend", "gpus"})
    assert router([{"backend": "here"}]).parameter_keys() == frozenset()


# ---- the 400 text and explain() ----

def test_unroutable_names_why_each_rule_refused():
    rules = router(EXAMPLE[:5])
    with pytest.raises(Unroutable) as caught:
        rules.route({"resources": {"cpu_cores": 8, "preemptible": True}}, "carol")
    assert str(caught.value) == (
        "no routing rule accepts this task: routing[0] needs tag site=partner; "
        "routing[1] needs backend_parameters.gpus; routing[2] needs a zone among eu-1, "
        "eu-2; routing[3] is for certain owners; routing[4] is for certain groups")


def test_explain_says_why_for_every_rule():
    rules = router([{"when": {"resources": {"cpu_cores": {"min": 2, "max": 4}}},
                     "backend": "big"},
                    {"when": {"resources": {"disk_gb": 10}}, "backend": "big"},
                    {"when": {"backend_parameters": {"queue": "long"}}, "backend": "big"},
                    {"when": {"resources": {"preemptible": True}}, "backend": "big"},
                    *REQUESTED, {"backend": "here"}])
    assert rules.explain({}, "x", frozenset()) == [
        "routing[0] needs cpu_cores 2 to 4",
        "routing[1] needs disk_gb 10",
        "routing[2] needs backend_parameters.queue=long",
        "routing[3] needs preemptible true",
        "routing[4] is for certain groups",
        "routing[5] matches: here",
        "routing[6] matches: here",
    ]
    assert rules.explain(params(backend="nope"))[5] == (
        "routing[5] refuses: resources.backend_parameters.backend: 'nope' is not an "
        "instance you may choose (allowed: here, gpu)")


def test_the_reason_is_bounded():
    rules = router([{"when": {"tags": {f"key{n}": "v" * 200}}, "backend": "big"}
                    for n in range(MAX_RULES)])
    with pytest.raises(Unroutable) as caught:
        rules.route({})
    text = str(caught.value)
    assert len(text) <= MAX_REASON
    assert text.startswith("no routing rule accepts this task: routing[0] needs tag key0=vvv")
    assert text.endswith(" more rules")


def test_a_hostile_request_is_shown_short_and_escaped():
    with pytest.raises(Unroutable) as caught:
        router(REQUESTED).route(params(backend="\x00\n\u202e" + "x" * 100_000))
    text = str(caught.value)
    assert len(text) < 200 and "\x00" not in text and "\n" not in text
    assert "\\x00\\n\\u202e" in text


# ---- describe ----

@pytest.mark.parametrize("route,text", [
    (Route("gpu", 1), "routed to gpu by routing[1]"),
    (Route("here", None), "routed to here by the default"),
    (Route("gpu", 1, ("partner", "big"), 1800.0),
     ("routed to gpu by routing[1]; overflow to partner, big if it is unhealthy or the "
     "task waits QUEUED over 30m")),
    (Route("gpu", 2, ("partner",)),
     "routed to gpu by routing[2]; overflow to partner if it is unhealthy"),
    (Route("gpu", 0, ("big",), 45.0), ("routed to gpu by routing[0]; overflow to big if it "
                                      "is unhealthy or the task waits QUEUED over 45s")),
    (Route("gpu", 0, ("big",), 5400.0), ("routed to gpu by routing[0]; overflow to big if "
                                        "it is unhealthy or the task waits QUEUED over 90m")),
])
def test_describe(route, text):
    assert route.describe() == text


# ---- validation: each error names its key path and the value ----

def rule(**entry: object) -> dict:
    return {"backend": "big", **entry}


@pytest.mark.parametrize("raw,message", [
    ("nope", 'routing: expected a list of rules, got "nope"'),
    ({"backend": "big"}, "routing: expected a list of rules"),
    ([{"backend": "big"}] * (MAX_RULES + 1), (f"routing: {MAX_RULES + 1} rules, at most "
                                             f"{MAX_RULES}")),
    (["big"], 'routing[0]: expected a mapping, got "big"'),
    ([{"backend": "big"}, {"backnd": "big"}], ("routing[1].backnd: unknown key (known: when, "
                                              "backend, allowed, default, overflow, "
                                              "max_queue_wait)")),
    ([{}], ("routing[0].backend: null is no backend instance (instances: here, gpu, "
           "partner, big; or requested)")),
    ([{"backend": "nowhere"}], 'routing[0].backend: "nowhere" is no backend instance'),
    ([{"backend": ["big"]}], 'routing[0].backend: ["big"] is no backend instance'),
    ([rule(when="always")], 'routing[0].when: expected a mapping, got "always"'),
    ([rule(when={"tag": {}})], ("routing[0].when.tag: unknown key (known: owner, group, "
                               "tags, backend_parameters, resources)")),
    ([rule(when={"tags": ["a"]})], 'routing[0].when.tags: expected a mapping, got ["a"]'),
    ([rule(when={"tags": {}})], "routing[0].when.tags: an empty mapping; leave the key out"),
    ([rule(when={"tags": {"gpus": 2}})], ('routing[0].when.tags.gpus: expected a string '
                                         '("any": the key is present), got 2')),
    ([rule(when={"tags": {"a": None}})], "routing[0].when.tags.a: expected a string"),
    ([rule(when={"tags": {1: "x"}})], "routing[0].when.tags: expected string keys, got 1"),
    ([rule(when={"tags": {"": "x"}})], 'routing[0].when.tags: expected string keys, got ""'),
    ([rule(when={"tags": {ROUTE_TAG: "big"}})],
     f"routing[0].when.tags.{ROUTE_TAG}: the gateway sets this tag on every routed task"),
    ([rule(when={"tags": {f"k{n}": "v" for n in range(MAX_VALUES + 1)}})],
     f"routing[0].when.tags: {MAX_VALUES + 1} entries, at most {MAX_VALUES}"),
    ([rule(when={"backend_parameters": {"gpus": True}})],
     "routing[0].when.backend_parameters.gpus: expected a string"),
    ([rule(when={"backend_parameters": {"gpus": "1", "GPUS": "2"}})],
     ("routing[0].when.backend_parameters.GPUS: the same key as another one (keys are "
     "case-insensitive)")),
    ([rule(when={"resources": {"cpus": 2}})], ("routing[0].when.resources.cpus: unknown key "
                                              "(known: cpu_cores, ram_gb, disk_gb, "
                                              "preemptible, zones)")),
    ([rule(when={"resources": {}})], "routing[0].when.resources: an empty mapping"),
    ([rule(when={"resources": 8})], "routing[0].when.resources: expected a mapping, got 8"),
    ([rule(when={"resources": {"cpu_cores": {"min": "eight"}}})],
     'routing[0].when.resources.cpu_cores.min: expected a number, got "eight"'),
    ([rule(when={"resources": {"cpu_cores": "8"}})],
     'routing[0].when.resources.cpu_cores: expected a number, got "8"'),
    ([rule(when={"resources": {"cpu_cores": True}})],
     "routing[0].when.resources.cpu_cores: expected a number, got true"),
    ([rule(when={"resources": {"ram_gb": float("nan")}})],
     "routing[0].when.resources.ram_gb: expected a number, got NaN"),
    ([rule(when={"resources": {"ram_gb": {"max": float("inf")}}})],
     "routing[0].when.resources.ram_gb.max: expected a number, got Infinity"),
    ([rule(when={"resources": {"disk_gb": -1}})],
     "routing[0].when.resources.disk_gb: expected a number of 0 or more, got -1"),
    ([rule(when={"resources": {"cpu_cores": {"min": -2}}})],
     "routing[0].when.resources.cpu_cores.min: expected a number of 0 or more, got -2"),
    ([rule(when={"resources": {"cpu_cores": {"min": 8, "max": 4}}})],
     "routing[0].when.resources.cpu_cores: min 8 is above max 4"),
    ([rule(when={"resources": {"cpu_cores": {}}})],
     "routing[0].when.resources.cpu_cores: expected min, max or both, got {}"),
    ([rule(when={"resources": {"cpu_cores": {"least": 2}}})],
     "routing[0].when.resources.cpu_cores.least: unknown key (known: min, max)"),
    ([rule(when={"resources": {"preemptible": "yes"}})],
     'routing[0].when.resources.preemptible: expected true or false, got "yes"'),
    ([rule(when={"resources": {"zones": "eu-1"}})],
     'routing[0].when.resources.zones: expected a list of names, got "eu-1"'),
    ([rule(when={"resources": {"zones": []}})],
     "routing[0].when.resources.zones: an empty list matches nothing; leave the key out"),
    ([rule(when={"resources": {"zones": ["eu-1", 2]}})],
     "routing[0].when.resources.zones[1]: expected a non-empty string, got 2"),
    ([rule(when={"owner": []})], "routing[0].when.owner: an empty list matches nothing"),
    ([rule(when={"owner": 7})], ("routing[0].when.owner: expected a name or a list of names, "
                                "got 7")),
    ([rule(when={"owner": ["a", "a"]})], 'routing[0].when.owner[1]: "a" is listed twice'),
    ([rule(when={"group": [""]})], ('routing[0].when.group[0]: expected a non-empty string, '
                                   'got ""')),
    ([rule(when={"group": [f"g{n}" for n in range(MAX_VALUES + 1)]})],
     f"routing[0].when.group: {MAX_VALUES + 1} entries, at most {MAX_VALUES}"),
    ([rule(overflow=[])], "routing[0].overflow: an empty list matches nothing"),
    ([rule(overflow=["gpu", "nowhere"])], ('routing[0].overflow[1]: "nowhere" is no backend '
                                          'instance (instances: here, gpu, partner, big)')),
    ([rule(overflow=["gpu", "gpu"])], 'routing[0].overflow[1]: "gpu" is listed twice'),
    ([rule(overflow=["big"])], "routing[0].overflow: names the rule's own backend 'big'"),
    ([rule(max_queue_wait="30m")], "routing[0].max_queue_wait: only with overflow"),
    ([rule(overflow=["gpu"], max_queue_wait="soon")],
     'routing[0].max_queue_wait: expected a duration such as 30m, 2h or 45s, got "soon"'),
    ([rule(overflow=["gpu"], max_queue_wait=-5)],
     "routing[0].max_queue_wait: expected a duration such as 30m, 2h or 45s, got -5"),
    ([rule(overflow=["gpu"], max_queue_wait=0)],
     "routing[0].max_queue_wait: expected a duration above 0, got 0"),
    ([rule(overflow=["gpu"], max_queue_wait="0m")],
     'routing[0].max_queue_wait: expected a duration above 0, got "0m"'),
    ([rule(allowed=["gpu"])], "routing[0].allowed: only with backend: requested"),
    ([rule(default="gpu")], "routing[0].default: only with backend: requested"),
    ([{"backend": "requested"}], ("routing[0].allowed: backend: requested lists the "
                                 "instances a task may ask for")),
    ([{"backend": "requested", "allowed": "gpu"}], ('routing[0].allowed: expected a list of '
                                                   'names, got "gpu"')),
    ([{"backend": "requested", "allowed": []}], "routing[0].allowed: an empty list"),
    ([{"backend": "requested", "allowed": ["gpu", "cloud"]}],
     'routing[0].allowed[1]: "cloud" is no backend instance'),
    ([{"backend": "requested", "allowed": ["gpu"], "default": "here"}],
     'routing[0].default: "here" is not in allowed (gpu)'),
    ([{"backend": "requested", "allowed": ["gpu"], "overflow": ["here"]}],
     "routing[0].overflow: a task that names its instance stays on it"),
    ([{"backend": "requested", "allowed": ["gpu"],
       "when": {"backend_parameters": {"Backend": "gpu"}}}],
     "routing[0].when.backend_parameters.backend: makes no sense on backend: requested"),
])
def test_validation_names_the_key_and_the_value(raw, message):
    with pytest.raises(RuleError) as caught:
        parse_rules(raw, INSTANCES)
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize("first", [{"backend": "here"}, {"when": {}, "backend": "here"},
                                   {"when": None, "backend": "here", "overflow": ["gpu"]}])
def test_a_rule_after_one_that_takes_every_task_is_refused(first):
    with pytest.raises(RuleError) as caught:
        parse_rules([{"backend": "gpu", "when": {"owner": "a"}}, first, {"backend": "big"}],
                    INSTANCES)
    assert str(caught.value) == ("routing[2]: never reached (routing[1] takes every task: "
                                 "give it a `when` or make it the last rule)")
    # `requested` lets tasks that name nothing through (to its default, if any)
    parse_rules([{"backend": "requested", "allowed": ["gpu"]}, {"backend": "big"}], INSTANCES)


def test_an_instance_named_requested_is_refused():
    with pytest.raises(RuleError, match="backends.requested: the name is reserved"):
        parse_rules([], ["here", "requested"])


def test_overflow_may_be_one_name():
    route = router([rule(overflow="gpu", max_queue_wait=90)]).route({})
    assert (route.fallbacks, route.max_queue_wait) == (("gpu",), 90.0)


@pytest.mark.parametrize("value,seconds", [
    ("30m", 1800), ("2h", 7200), ("45s", 45), ("1d", 86400), ("1.5h", 5400), ("90", 90),
    (90, 90), (0.5, 0.5),
])
def test_duration(value, seconds):
    assert duration(value, "x") == seconds


@pytest.mark.parametrize("value", ["30 m", "30min", "-1m", "1e3", "\uff13\uff10m", "30m\n",
                                   True, None, float("inf"), [30]])
def test_duration_refuses(value):
    with pytest.raises(RuleError, match="^x: expected a duration"):
        duration(value, "x")


# ---- hostile task data: never raises but Unroutable, bounded work ----

ODD_TASKS: list[object] = [
    None, "task", [], {"tags": None}, {"tags": ["site"]}, {"tags": {"site": 5}},
    {"tags": {5: "partner"}}, {"resources": "big"}, {"resources": None},
    {"resources": {"cpu_cores": "16"}}, {"resources": {"cpu_cores": True}},
    {"resources": {"cpu_cores": None}}, {"resources": {"cpu_cores": float("nan")}},
    {"resources": {"cpu_cores": 10 ** 400}}, {"resources": {"ram_gb": [1]}},
    {"resources": {"preemptible": "true"}}, {"resources": {"preemptible": 1}},
    {"resources": {"zones": "eu-1"}}, {"resources": {"zones": [{"a": 1}, ["eu-1"], None]}},
    {"resources": {"backend_parameters": ["backend"]}},
    {"resources": {"backend_parameters": {1: "gpu", None: "x"}}},
    {"resources": {"backend_parameters": {"backend": None}}},
    {"resources": {"backend_parameters": {"backend": ["gpu"]}}},
    {"resources": {"backend_parameters": {"backend": {"gpu": 1}}}},
]


@pytest.mark.parametrize("task", ODD_TASKS)
def test_odd_task_data_is_no_match_never_an_error(task):
    strict = router([*EXAMPLE[:5], {"backend": "requested", "allowed": ["here", "gpu"]}])
    for owner, groups in ((None, frozenset()), (["alice"], {"gpu-users": 1}),
                          ("alice", frozenset({"gpu-users"}))):
        try:
            route = strict.route(task, owner, groups)  # type: ignore[arg-type]
        except Unroutable:
            continue
        assert route.instance in INSTANCES
    strict.explain(task)


def test_an_odd_request_is_refused_not_crashed():
    for value in (None, ["gpu"], {"gpu": 1}, 7):
        with pytest.raises(Unroutable, match="is not an instance you may choose"):
            router(REQUESTED).route(params(backend=value))  # type: ignore[arg-type]


class CountingDict(dict):
    """A task map that counts how often routing looks into it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.lookups = 0
        self.walks = 0

    def get(self, *args: object) -> object:
        self.lookups += 1
        return super().get(*args)

    def items(self):
        self.walks += 1
        return super().items()


def hostile_map(count: int) -> CountingDict:
    """count entries with NUL, unicode, huge and near-miss keys and values."""
    out = CountingDict({f"k\x00{n}\u0130\U0001f600": "\x00" * 10 + "v" * 1000
                        for n in range(count)})
    out["SITE"] = "partner"        # case near-miss of a tag key
    out["site"] = "partner\x00"    # value near-miss
    out["gpus"] = "x" * 1_000_000
    return out


def test_work_does_not_grow_with_the_tasks_entries():
    rules = router([{"when": {"tags": {"site": "partner", "rack": "any"}}, "backend": "big"}
                    for _ in range(50)]
                   + [{"when": {"backend_parameters": {"gpus": "2"}}, "backend": "gpu"}
                      for _ in range(50)]
                   + [{"backend": "here"}])
    for count in (10, 10_000):
        tags, parameters = hostile_map(count), hostile_map(count)
        route = rules.route({"tags": tags, "resources": {"backend_parameters": parameters}})
        assert route.rule == 100
        # one look-up per rule reading tags (its first key fails), whatever the task holds
        assert tags.lookups == 50 and tags.walks == 0
        # backend_parameters' keys are lowered once for all the rules that read them
        assert parameters.walks == 1 and parameters.lookups == 0


def test_rules_see_the_hostile_values_exactly():
    tags = hostile_map(10_000)
    assert taken({"tags": {"SITE": "partner"}}, {"tags": tags})
    assert not taken({"tags": {"site": "partner"}}, {"tags": tags})
    assert taken({"tags": {"site": "partner\x00"}}, {"tags": tags})
    key = "k\x00" + "7\u0130\U0001f600"
    assert taken({"tags": {key: "any"}}, {"tags": tags})
    # backend_parameters keys lower as the rules' do (U+0130 lowers to two characters)
    assert taken({"backend_parameters": {key.upper(): "any"}},
                 {"resources": {"backend_parameters": tags}})
    assert taken({"backend_parameters": {"gpus": "any"}},
                 {"resources": {"backend_parameters": tags}})


class CountingList(list):
    """A task list that counts how often routing walks it."""

    walks = 0

    def __iter__(self):
        CountingList.walks += 1
        return super().__iter__()


def test_zones_are_walked_once_for_all_rules():
    rules = router([{"when": {"resources": {"zones": [f"eu-{n}", f"us-{n}"]}},
                     "backend": "big"} for n in range(100)] + [{"backend": "here"}])
    zones = CountingList([f"zone\x00{n}" for n in range(10_000)] + [None, {"a": 1}, ["x"]])
    CountingList.walks = 0
    assert rules.route({"resources": {"zones": zones}}).rule == 100
    assert CountingList.walks == 1
    zones.append("us-99")
    assert rules.route({"resources": {"zones": zones}}).rule == 99


def test_frozen_configuration_shapes_are_accepted():
    from types import MappingProxyType

    frozen = (MappingProxyType({"when": MappingProxyType({"resources": MappingProxyType(
        {"zones": ("eu-1",)})}), "backend": "big", "overflow": ("gpu",)}),
        MappingProxyType({"backend": "requested", "allowed": ("here",)}))
    rules = Router(parse_rules(frozen, INSTANCES), "here")
    assert rules.route({"resources": {"zones": ["eu-1"]}}).fallbacks == ("gpu",)
    assert rules.route(params(backend="here")).rule == 1


def test_documents_as_the_tes_schema_leaves_them():
    """The shapes routing reads are those the create path's schema hands on."""
    import json

    from funnel_hpc.gateway.store.tes_schemas import load_task_lenient

    tags = {f"t\u00e9\U0001f600{n}": "v" * 100 for n in range(10_000)}
    tags["site"] = "partner"
    body = json.loads(json.dumps({
        "executors": [{"image": "busybox", "command": ["true"]}], "tags": tags,
        "resources": {"cpu_cores": 16, "ram_gb": 64.5, "preemptible": True,
                      "zones": ["us-1", "eu-2"],
                      "backend_parameters": {"GPUS": "2", "Backend": "gpu"}}}))
    spec, _ = load_task_lenient(body)
    rules = router(EXAMPLE)
    assert rules.route(spec).rule == 0
    del spec["tags"]["site"]
    assert rules.route(spec).rule == 1
    del spec["resources"]["backend_parameters"]["GPUS"]
    assert rules.route(spec).instance == "big"
    spec["resources"]["ram_gb"] = 512.5
    assert (rules.route(spec).instance, rules.route(spec).requested) == ("gpu", True)
