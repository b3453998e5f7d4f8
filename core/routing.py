"""Routing rules: which backend instance runs a task, decided once, at POST.

`routing:` in the configuration is a list of rules tried in order; the first whose
`when` matches the task names its instance (`backend`), the instances it may overflow to
(`overflow`) and how long the task may wait QUEUED before it does (`max_queue_wait`).
`backend: requested` lets the task name one of the rule's `allowed` instances in
`resources.backend_parameters.backend`. A task no rule accepts is refused (HTTP 400 with
the reason, Unroutable). No rules at all: every task goes to the first instance.

    rules = parse_rules(raw_list, instance_names)   # RuleError("routing[1].when...: why")
    router = Router(rules, default=first_instance)
    route = router.route(task, owner, groups)      # Unroutable(reason)
    route.instance, route.rule (index or None), route.fallbacks, route.max_queue_wait
    router.explain(task, owner, groups)             # why each rule did or did not match

Contract: parse_rules checks every key and value (the key path and the value in the
message) and compiles each rule into conditions over frozensets and lowered keys; a task
is an already validated TES document, but matching never raises on odd data (a value of
the wrong type is no match) and builds no regex from it. Cost of route(): per rule, a
few dict and set look-ups (0.3-0.7 us a rule at 50 rules: benchmarks/routing_bench.py),
plus one pass over the task's backend_parameters keys (lowered) and zones, when a rule
reads them; never a pass per rule over what the task holds.

This module imports nothing of the gateway's or the configuration's (core/config.py
imports it to check `routing:` at load).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

INSTANCE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# the tag a routed task carries, naming its instance
ROUTE_TAG = "funnel-hpc.backend"
# `backend: requested`: the task names its instance in this backend_parameters key
REQUESTED = "requested"
REQUEST_KEY = "backend"
# a tag or backend_parameters condition with this value: the key is present
ANY = "any"
# sane bounds on what one configuration may hold (each is checked with its key path)
MAX_RULES = 256
MAX_VALUES = 256  # entries in one list or map of a rule
# Unroutable's message for HTTP 400: at most this many characters
MAX_REASON = 600

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_RULE_KEYS = ("when", "backend", "allowed", "default", "overflow", "max_queue_wait")
_WHEN_KEYS = ("owner", "group", "tags", "backend_parameters", "resources")
# resources numbers and what a task without the field counts as (TES: one core, and
# no stated memory or disk)
_ABSENT = {"cpu_cores": 1, "ram_gb": 0, "disk_gb": 0}
_RESOURCE_KEYS = (*_ABSENT, "preemptible", "zones")


class RuleError(ValueError):
    """A routing rule is invalid: the message starts with its key path."""


class Unroutable(ValueError):
    """No rule accepts the task: the message says why (for HTTP 400)."""


def _shown(value: object, limit: int = 60) -> str:
    """A configuration value in an error message: JSON-like, cut at `limit`."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _task_value(value: object) -> str:
    """A task's value in an Unroutable message: quoted, escaped, cut."""
    text = repr(value[:40] if isinstance(value, str) else value)
    return text if not isinstance(value, str) or len(value) <= 40 else text[:-1] + "...'"


def _number_text(value: float) -> str:
    return f"{value:g}"


def seconds_text(seconds: float) -> str:
    """30m for 1800, 45s for 45: the way a duration is written in the configuration."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


# ---- conditions: one compiled `when` key each; test() never raises on task data ----

class _TaskView:
    """What the rules read of one task, each part looked up once per route()."""

    __slots__ = ("tags", "resources", "owner", "groups", "_parameters", "_zones")

    def __init__(self, task: object, owner: object, groups: object):
        task = task if isinstance(task, Mapping) else {}
        tags = task.get("tags")
        self.tags: Mapping = tags if isinstance(tags, Mapping) else {}
        resources = task.get("resources")
        self.resources: Mapping = resources if isinstance(resources, Mapping) else {}
        self.owner = owner if isinstance(owner, str) else None
        if not isinstance(groups, frozenset):
            groups = frozenset(group for group in groups if isinstance(group, str)) \
                if isinstance(groups, Iterable) and not isinstance(groups, str) else frozenset()
        self.groups: frozenset = groups
        self._parameters: dict[str, object] | None = None
        self._zones: frozenset[str] | None = None

    @property
    def parameters(self) -> dict[str, object]:
        """backend_parameters with lowered keys (a later duplicate wins): one pass."""
        if self._parameters is None:
            raw = self.resources.get("backend_parameters")
            self._parameters = {key.lower(): value for key, value in raw.items()
                                if isinstance(key, str)} if isinstance(raw, Mapping) else {}
        return self._parameters

    @property
    def zones(self) -> frozenset[str]:
        """resources.zones as a set: one pass, then each rule costs at most its own size."""
        if self._zones is None:
            raw = self.resources.get("zones")
            self._zones = frozenset(zone for zone in raw if isinstance(zone, str)) \
                if isinstance(raw, (list, tuple)) else frozenset()
        return self._zones


class _Condition:
    """One `when` key of a rule."""

    __slots__ = ()

    def test(self, view: _TaskView) -> bool:
        raise NotImplementedError

    def need(self) -> str:
        """What a task lacks when test() is False: "needs tag site=partner"."""
        raise NotImplementedError


class _Pairs(_Condition):
    """tags or backend_parameters: each key present, with this value unless "any"."""

    __slots__ = ("label", "pairs", "lowered")

    def __init__(self, label: str, pairs: tuple[tuple[str, str | None], ...],
                 lowered: bool):
        self.label = label
        self.pairs = pairs  # (key, value or None for any)
        self.lowered = lowered

    def test(self, view: _TaskView) -> bool:
        present = view.parameters if self.lowered else view.tags
        for key, value in self.pairs:
            got = present.get(key, _MISSING)
            if got is _MISSING or (value is not None and got != value):
                return False
        return True

    def need(self) -> str:
        shown = [key if value is None else f"{key}={value}" for key, value in self.pairs]
        return f"needs {self.label}{', '.join(_cut(text) for text in shown)}"


_MISSING = object()


def _cut(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _Number(_Condition):
    """resources.cpu_cores / ram_gb / disk_gb within [low, high]."""

    __slots__ = ("field", "low", "high", "absent")

    def __init__(self, field: str, low: float, high: float):
        self.field = field
        self.low = low
        self.high = high
        self.absent = _ABSENT[field]

    def test(self, view: _TaskView) -> bool:
        value = view.resources.get(self.field)
        if value is None:
            value = self.absent
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            return False  # the schema says a number; anything else is no match
        return self.low <= value <= self.high

    def need(self) -> str:
        if self.low == self.high:
            return f"needs {self.field} {_number_text(self.low)}"
        if self.high == math.inf:
            return f"needs {self.field} at least {_number_text(self.low)}"
        if self.low == 0:
            return f"needs {self.field} at most {_number_text(self.high)}"
        return f"needs {self.field} {_number_text(self.low)} to {_number_text(self.high)}"


class _Preemptible(_Condition):
    """resources.preemptible is this boolean (a task without it: false)."""

    __slots__ = ("wanted",)

    def __init__(self, wanted: bool):
        self.wanted = wanted

    def test(self, view: _TaskView) -> bool:
        value = view.resources.get("preemptible")
        return (False if value is None else value) is self.wanted

    def need(self) -> str:
        return f"needs preemptible {str(self.wanted).lower()}"


class _Zones(_Condition):
    """resources.zones names one of these (a task without zones: no match)."""

    __slots__ = ("zones", "shown")

    def __init__(self, zones: tuple[str, ...]):
        self.zones = frozenset(zones)
        self.shown = ", ".join(_cut(zone) for zone in zones[:5]) + \
            (", ..." if len(zones) > 5 else "")

    def test(self, view: _TaskView) -> bool:
        # isdisjoint walks the smaller of the two sets
        return not self.zones.isdisjoint(view.zones)

    def need(self) -> str:
        return f"needs a zone among {self.shown}"


class _Owner(_Condition):
    """The task's owner is one of these names."""

    __slots__ = ("names",)

    def __init__(self, names: tuple[str, ...]):
        self.names = frozenset(names)

    def test(self, view: _TaskView) -> bool:
        return view.owner in self.names

    def need(self) -> str:
        return "is for certain owners"  # names stay the admin's: not told to every caller


class _Group(_Condition):
    """The owner is in one of these groups."""

    __slots__ = ("names",)

    def __init__(self, names: tuple[str, ...]):
        self.names = frozenset(names)

    def test(self, view: _TaskView) -> bool:
        return not self.names.isdisjoint(view.groups)

    def need(self) -> str:
        return "is for certain groups"


# ---- parsing: every check names its key path and the value ----

def _mapping(value: object, path: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise RuleError(f"{path}: expected a mapping, got {_shown(value)}")
    if len(value) > MAX_VALUES:
        raise RuleError(f"{path}: {len(value)} entries, at most {MAX_VALUES}")
    for key in value:
        if not isinstance(key, str) or not key:
            raise RuleError(f"{path}: expected string keys, got {_shown(key)}")
    return value


def _known_keys(value: Mapping, known: Sequence[str], path: str) -> None:
    for key in value:
        if key not in known:
            raise RuleError(f"{path}.{key}: unknown key (known: {', '.join(known)})")


def _names(value: object, path: str, one_allowed: bool = True) -> tuple[str, ...]:
    """A non-empty list of distinct non-empty strings (or one string)."""
    if isinstance(value, str) and one_allowed:
        value = [value]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        what = "a name or a list of names" if one_allowed else "a list of names"
        raise RuleError(f"{path}: expected {what}, got {_shown(value)}")
    if not value:
        raise RuleError(f"{path}: an empty list matches nothing; leave the key out")
    if len(value) > MAX_VALUES:
        raise RuleError(f"{path}: {len(value)} entries, at most {MAX_VALUES}")
    seen: set[str] = set()
    for index, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise RuleError(f"{path}[{index}]: expected a non-empty string, got {_shown(name)}")
        if name in seen:
            raise RuleError(f"{path}[{index}]: {_shown(name)} is listed twice")
        seen.add(name)
    return tuple(value)


def _instances_in(names: tuple[str, ...], instances: Sequence[str], path: str) -> None:
    for index, name in enumerate(names):
        if name not in instances:
            raise RuleError(f"{path}[{index}]: {_shown(name)} is no backend instance "
                            f"(instances: {', '.join(instances)})")


def _pairs(value: object, path: str, label: str, lowered: bool) -> _Pairs:
    pairs: dict[str, str | None] = {}
    mapping = _mapping(value, path)
    if not mapping:
        raise RuleError(f"{path}: an empty mapping; leave the key out")
    for key, wanted in mapping.items():
        if not isinstance(wanted, str):
            raise RuleError(f"{path}.{key}: expected a string (\"{ANY}\": the key is present), "
                            f"got {_shown(wanted)}")
        if label == "tag " and key == ROUTE_TAG:
            raise RuleError(f"{path}.{key}: the gateway sets this tag on every routed task; "
                            "a rule cannot read it")
        name = key.lower() if lowered else key
        if name in pairs:
            raise RuleError(f"{path}.{key}: the same key as another one (keys are "
                            "case-insensitive)")
        pairs[name] = None if wanted == ANY else wanted
    return _Pairs(label, tuple(pairs.items()), lowered)


def _number(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise RuleError(f"{path}: expected a number, got {_shown(value)}")
    if value < 0:
        raise RuleError(f"{path}: expected a number of 0 or more, got {_shown(value)}")
    return float(value)


def _range(field: str, value: object, path: str) -> _Number:
    if not isinstance(value, Mapping):
        exact = _number(value, path)
        return _Number(field, exact, exact)
    _known_keys(_mapping(value, path), ("min", "max"), path)
    if not value:
        raise RuleError(f"{path}: expected min, max or both, got {{}}")
    low = _number(value["min"], f"{path}.min") if "min" in value else 0.0
    high = _number(value["max"], f"{path}.max") if "max" in value else math.inf
    if low > high:
        raise RuleError(f"{path}: min {_number_text(low)} is above max {_number_text(high)}")
    return _Number(field, low, high)


def _resources(value: object, path: str) -> list[_Condition]:
    mapping = _mapping(value, path)
    _known_keys(mapping, _RESOURCE_KEYS, path)
    if not mapping:
        raise RuleError(f"{path}: an empty mapping; leave the key out")
    out: list[_Condition] = []
    for field, wanted in mapping.items():
        here = f"{path}.{field}"
        if field == "preemptible":
            if not isinstance(wanted, bool):
                raise RuleError(f"{here}: expected true or false, got {_shown(wanted)}")
            out.append(_Preemptible(wanted))
        elif field == "zones":
            out.append(_Zones(_names(wanted, here, one_allowed=False)))
        else:
            out.append(_range(field, wanted, here))
    return out


def compile_when(when: object, path: str) -> tuple[_Condition, ...]:
    """The conditions of one rule's `when` (None or {}: none, the rule matches all)."""
    if when is None:
        return ()
    mapping = _mapping(when, path)
    _known_keys(mapping, _WHEN_KEYS, path)
    out: list[_Condition] = []
    # in a fixed order, cheapest first: the first unmet one is what explain() says
    for key in _WHEN_KEYS:
        if key not in mapping:
            continue
        value, here = mapping[key], f"{path}.{key}"
        if key == "owner":
            out.append(_Owner(_names(value, here)))
        elif key == "group":
            out.append(_Group(_names(value, here)))
        elif key == "tags":
            out.append(_pairs(value, here, "tag ", lowered=False))
        elif key == "backend_parameters":
            out.append(_pairs(value, here, "backend_parameters.", lowered=True))
        else:
            out.extend(_resources(value, here))
    return tuple(out)


class Rule:
    """One parsed rule: its condition and where it sends a task."""

    __slots__ = ("index", "when", "backend", "allowed", "overflow", "max_queue_wait",
                 "default", "conditions")

    def __init__(self, index: int, when: Mapping[str, object] | None, backend: str,
                 allowed: tuple[str, ...] = (), overflow: tuple[str, ...] = (),
                 max_queue_wait: float | None = None, default: str | None = None):
        self.index = index
        self.when = when or {}
        self.backend = backend          # an instance name, or "requested"
        self.allowed = allowed          # with backend "requested": what a task may ask for
        self.overflow = overflow
        self.max_queue_wait = max_queue_wait  # seconds
        self.default = default          # with "requested": for a task that names none
        # checked and compiled here, so that no Rule exists with an invalid `when`
        self.conditions = compile_when(when, f"routing[{index}].when")

    @property
    def path(self) -> str:
        return f"routing[{self.index}]"

    def matches(self, task: Mapping[str, Any], owner: str | None,
                groups: frozenset[str]) -> bool:
        """Whether `when` accepts the task (for "requested", before its own choice)."""
        return self._unmet(_TaskView(task, owner, groups)) is None

    def _unmet(self, view: _TaskView) -> _Condition | None:
        for condition in self.conditions:
            if not condition.test(view):
                return condition
        return None

    def _choice(self, view: _TaskView) -> str | None:
        """With "requested": the instance the task names (Unroutable if not allowed), the
        rule's default when it names none, or None (the rule does not take it)."""
        asked = view.parameters.get(REQUEST_KEY, _MISSING)
        if asked is _MISSING:
            return self.default
        if not isinstance(asked, str) or asked not in self.allowed:
            raise Unroutable(
                f"resources.backend_parameters.{REQUEST_KEY}: {_task_value(asked)} is not an "
                f"instance you may choose (allowed: {', '.join(self.allowed)})")
        return asked


def parse_rules(raw: Sequence[object], instances: Sequence[str]) -> tuple[Rule, ...]:
    """The rules of `routing:` (plain YAML data), checked against the instance names."""
    if REQUESTED in instances:
        raise RuleError(f"backends.{REQUESTED}: the name is reserved (routing rules' "
                        f"`backend: {REQUESTED}` means the task's own choice)")
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
        raise RuleError(f"routing: expected a list of rules, got {_shown(raw)}")
    if len(raw) > MAX_RULES:
        raise RuleError(f"routing: {len(raw)} rules, at most {MAX_RULES}")
    rules = tuple(_parse_rule(index, entry, instances) for index, entry in enumerate(raw))
    for rule in rules[:-1]:
        if not rule.conditions and rule.backend != REQUESTED:
            raise RuleError(f"routing[{rule.index + 1}]: never reached ({rule.path} takes "
                            "every task: give it a `when` or make it the last rule)")
    return rules


def _parse_rule(index: int, entry: object, instances: Sequence[str]) -> Rule:
    path = f"routing[{index}]"
    mapping = _mapping(entry, path)
    _known_keys(mapping, _RULE_KEYS, path)
    backend = mapping.get("backend")
    if backend != REQUESTED and backend not in instances:
        raise RuleError(f"{path}.backend: {_shown(backend)} is no backend instance "
                        f"(instances: {', '.join(instances)}; or {REQUESTED})")
    assert isinstance(backend, str)
    allowed: tuple[str, ...] = ()
    default = None
    if backend == REQUESTED:
        allowed, default = _requested(mapping, path, instances)
    else:
        for key in ("allowed", "default"):
            if key in mapping:
                raise RuleError(f"{path}.{key}: only with backend: {REQUESTED}")
    overflow: tuple[str, ...] = ()
    if "overflow" in mapping:
        if backend == REQUESTED:
            raise RuleError(f"{path}.overflow: a task that names its instance stays on it "
                            f"(no overflow with backend: {REQUESTED})")
        overflow = _names(mapping["overflow"], f"{path}.overflow")
        _instances_in(overflow, instances, f"{path}.overflow")
        if backend in overflow:
            raise RuleError(f"{path}.overflow: names the rule's own backend {backend!r}")
    wait = mapping.get("max_queue_wait")
    if wait is not None:
        if not overflow:
            raise RuleError(f"{path}.max_queue_wait: only with overflow (where to go "
                            "after the wait)")
        wait = duration(wait, f"{path}.max_queue_wait")
        if wait <= 0:
            raise RuleError(f"{path}.max_queue_wait: expected a duration above 0, got 0")
    return Rule(index, mapping.get("when"), backend, allowed, overflow, wait, default)


def _requested(mapping: Mapping, path: str, instances: Sequence[str]
               ) -> tuple[tuple[str, ...], str | None]:
    if "allowed" not in mapping:
        raise RuleError(f"{path}.allowed: backend: {REQUESTED} lists the instances a task "
                        "may ask for")
    allowed = _names(mapping["allowed"], f"{path}.allowed", one_allowed=False)
    _instances_in(allowed, instances, f"{path}.allowed")
    default = mapping.get("default")
    if default is not None and default not in allowed:
        raise RuleError(f"{path}.default: {_shown(default)} is not in allowed "
                        f"({', '.join(allowed)})")
    when = mapping.get("when")
    parameters = when.get("backend_parameters") if isinstance(when, Mapping) else None
    if isinstance(parameters, Mapping) and any(
            isinstance(key, str) and key.lower() == REQUEST_KEY for key in parameters):
        raise RuleError(f"{path}.when.backend_parameters.{REQUEST_KEY}: makes no sense on "
                        f"backend: {REQUESTED} (the rule reads that key itself: allowed, "
                        "default)")
    return allowed, default


def duration(value: object, path: str) -> float:
    """Seconds of "30m", "2h", "45s", "1d" or a number of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value) and value >= 0:
        return float(value)
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise RuleError(f"{path}: expected a duration such as 30m, 2h or 45s, "
                        f"got {_shown(value)}")
    return float(match.group(1)) * _UNITS[match.group(2)]


class Route:
    """Where a task goes and why."""

    __slots__ = ("instance", "rule", "fallbacks", "max_queue_wait", "requested")

    def __init__(self, instance: str, rule: int | None, fallbacks: tuple[str, ...] = (),
                 max_queue_wait: float | None = None, requested: bool = False):
        self.instance = instance
        self.rule = rule                  # index in routing:, None for the default
        self.fallbacks = fallbacks
        self.max_queue_wait = max_queue_wait
        self.requested = requested        # the task named it (backend: requested)

    def describe(self) -> str:
        """For the task's system logs: "routed to gpu by routing[1]", then what the task
        asked for or where it may overflow."""
        why = f"routing[{self.rule}]" if self.rule is not None else "the default"
        text = f"routed to {self.instance} by {why}"
        if self.requested:
            text += f" (asked for in backend_parameters.{REQUEST_KEY})"
        if self.fallbacks:
            text += f"; overflow to {', '.join(self.fallbacks)} if it is unhealthy"
            if self.max_queue_wait is not None:
                text += f" or the task waits QUEUED over {seconds_text(self.max_queue_wait)}"
        return text


class Router:
    """Rules in order, first match wins."""

    def __init__(self, rules: Sequence[Rule], default: str):
        self.rules = tuple(rules)
        self.default = default  # with no rules at all

    def route(self, task: Mapping[str, Any], owner: str | None = None,
              groups: frozenset[str] = frozenset()) -> Route:
        """The first rule's route; Unroutable when none accepts the task or it asks for an
        instance the first `requested` rule that accepts it does not allow."""
        if not self.rules:
            return Route(self.default, None)
        view = _TaskView(task, owner, groups)
        for rule in self.rules:
            if rule._unmet(view) is not None:
                continue
            if rule.backend != REQUESTED:
                return Route(rule.backend, rule.index, rule.overflow, rule.max_queue_wait)
            chosen = rule._choice(view)
            if chosen is not None:
                return Route(chosen, rule.index,
                             requested=REQUEST_KEY in view.parameters)
        raise Unroutable(self._refusal(view))

    def explain(self, task: Mapping[str, Any], owner: str | None = None,
                groups: frozenset[str] = frozenset()) -> list[str]:
        """Each rule and why it does or does not take the task, in order:
        "routing[0] needs tag site=partner", "routing[2] matches: big"."""
        view = _TaskView(task, owner, groups)
        return [self._why(rule, view) for rule in self.rules]

    def _why(self, rule: Rule, view: _TaskView) -> str:
        unmet = rule._unmet(view)
        if unmet is not None:
            return f"{rule.path} {unmet.need()}"
        if rule.backend != REQUESTED:
            return f"{rule.path} matches: {rule.backend}"
        try:
            chosen = rule._choice(view)
        except Unroutable as exc:
            return f"{rule.path} refuses: {exc}"
        if chosen is None:
            return (f"{rule.path} needs backend_parameters.{REQUEST_KEY} (one of "
                    f"{', '.join(rule.allowed)})")
        return f"{rule.path} matches: {chosen}"

    def _refusal(self, view: _TaskView) -> str:
        """"no routing rule accepts this task: routing[0] needs ...; ..." in MAX_REASON."""
        text = "no routing rule accepts this task: "
        for count, rule in enumerate(self.rules):
            reason = self._why(rule, view)
            more = f"... and {len(self.rules) - count} more rules"
            piece = reason if count == 0 else f"; {reason}"
            if len(text) + len(piece) > MAX_REASON - len(more) - 2:
                return text + ("; " if count else "") + more
            text += piece
        return text

    def requestable(self, owner: str | None = None,
                    groups: frozenset[str] = frozenset()) -> tuple[str, ...]:
        """The instances a caller may name in backend_parameters.backend, in rule order
        (rules whose owner or group conditions leave the caller out are skipped; other
        conditions depend on the task, so their instances are listed)."""
        view = _TaskView({}, owner, groups)
        out: dict[str, None] = {}
        for rule in self.rules:
            if rule.backend != REQUESTED or any(
                    isinstance(c, (_Owner, _Group)) and not c.test(view)
                    for c in rule.conditions):
                continue
            out.update(dict.fromkeys(rule.allowed))
        return tuple(out)

    def parameter_keys(self) -> frozenset[str]:
        """The backend_parameters keys (lowered) that the rules read: a gateway that drops
        keys its backend does not take must route first or keep these."""
        keys = {REQUEST_KEY for rule in self.rules if rule.backend == REQUESTED}
        for rule in self.rules:
            for condition in rule.conditions:
                if isinstance(condition, _Pairs) and condition.lowered:
                    keys.update(key for key, _ in condition.pairs)
        return frozenset(keys)
