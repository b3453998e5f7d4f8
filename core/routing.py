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
message) and compiles each rule's `when` into conditions over frozensets and lowered keys
(core/routing_when.py); a task
is an already validated TES document, but matching never raises on odd data (a value of
the wrong type is no match) and builds no regex from it. Cost of route(): per rule, a
few dict and set look-ups (0.3-0.7 us a rule at 50 rules: benchmarks/routing_bench.py),
plus one pass over the task's backend_parameters keys (lowered) and zones, when a rule
reads them; never a pass per rule over what the task holds.

This module imports nothing of the gateway's or the configuration's (core/config.py
imports it to check `routing:` at load).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from funnel_hpc.core.routing_when import (
    Condition,
    RuleError,
    TaskView,
    compile_when,
    known_keys,
    mapping_of,
    names_of,
    shown,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

INSTANCE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
# the tag a routed task carries, naming its instance
ROUTE_TAG = "funnel-hpc.backend"
# `backend: requested`: the task names its instance in this backend_parameters key
REQUESTED = "requested"
REQUEST_KEY = "backend"
# rules in one configuration, at most (MAX_VALUES: entries in one list or map of a rule)
MAX_RULES = 256
# Unroutable's message for HTTP 400: at most this many characters
MAX_REASON = 600
_RESERVED_TAGS = frozenset({ROUTE_TAG})

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_RULE_KEYS = ("when", "backend", "allowed", "default", "overflow", "max_queue_wait")


class Unroutable(ValueError):
    """No rule accepts the task: the message says why (for HTTP 400)."""


def _task_value(value: object) -> str:
    """A task's value in an Unroutable message: quoted, escaped, cut."""
    text = repr(value[:40] if isinstance(value, str) else value)
    return text if not isinstance(value, str) or len(value) <= 40 else text[:-1] + "...'"


def seconds_text(seconds: float) -> str:
    """30m for 1800, 45s for 45: the way a duration is written in the configuration."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _instances_in(names: tuple[str, ...], instances: Sequence[str], path: str) -> None:
    for index, name in enumerate(names):
        if name not in instances:
            raise RuleError(f"{path}[{index}]: {shown(name)} is no backend instance "
                            f"(instances: {', '.join(instances)})")


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
        self.conditions = compile_when(when, f"routing[{index}].when", _RESERVED_TAGS)

    @property
    def path(self) -> str:
        return f"routing[{self.index}]"

    def matches(self, task: Mapping[str, Any], owner: str | None,
                groups: frozenset[str]) -> bool:
        """Whether `when` accepts the task (for "requested", before its own choice)."""
        return self._unmet(TaskView(task, owner, groups)) is None

    def _unmet(self, view: TaskView) -> Condition | None:
        for condition in self.conditions:
            if not condition.test(view):
                return condition
        return None

    def _choice(self, view: TaskView) -> str | None:
        """With "requested": the instance the task names (Unroutable if not allowed), the
        rule's default when it names none, or None (the rule does not take it)."""
        if REQUEST_KEY not in view.parameters:
            return self.default
        asked = view.parameters[REQUEST_KEY]
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
        raise RuleError(f"routing: expected a list of rules, got {shown(raw)}")
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
    mapping = mapping_of(entry, path)
    known_keys(mapping, _RULE_KEYS, path)
    backend = mapping.get("backend")
    if backend != REQUESTED and backend not in instances:
        raise RuleError(f"{path}.backend: {shown(backend)} is no backend instance "
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
        overflow = names_of(mapping["overflow"], f"{path}.overflow")
        _instances_in(overflow, instances, f"{path}.overflow")
        if backend in overflow:
            raise RuleError(f"{path}.overflow: names the rule's own backend {backend!r}")
    wait = mapping.get("max_queue_wait")
    if wait is not None:
        if not overflow:
            raise RuleError(f"{path}.max_queue_wait: only with overflow (where to go "
                            "after the wait)")
        seconds = duration(wait, f"{path}.max_queue_wait")
        if seconds <= 0:
            raise RuleError(f"{path}.max_queue_wait: expected a duration above 0, "
                            f"got {shown(wait)}")
        wait = seconds
    return Rule(index, mapping.get("when"), backend, allowed, overflow, wait, default)


def _requested(mapping: Mapping, path: str, instances: Sequence[str]
               ) -> tuple[tuple[str, ...], str | None]:
    if "allowed" not in mapping:
        raise RuleError(f"{path}.allowed: backend: {REQUESTED} lists the instances a task "
                        "may ask for")
    allowed = names_of(mapping["allowed"], f"{path}.allowed", one_allowed=False)
    _instances_in(allowed, instances, f"{path}.allowed")
    default = mapping.get("default")
    if default is not None and default not in allowed:
        raise RuleError(f"{path}.default: {shown(default)} is not in allowed "
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
                        f"got {shown(value)}")
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
        view = TaskView(task, owner, groups)
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
        view = TaskView(task, owner, groups)
        return [self._why(rule, view) for rule in self.rules]

    def _why(self, rule: Rule, view: TaskView) -> str:
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

    def _refusal(self, view: TaskView) -> str:
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
        view = TaskView({}, owner, groups)
        out: dict[str, None] = {}
        for rule in self.rules:
            if rule.backend != REQUESTED or any(
                    condition.about_caller and not condition.test(view)
                    for condition in rule.conditions):
                continue
            out.update(dict.fromkeys(rule.allowed))
        return tuple(out)

    def parameter_keys(self) -> frozenset[str]:
        """The backend_parameters keys (lowered) that the rules read: a gateway that drops
        keys its backend does not take must route first or keep these."""
        keys = {REQUEST_KEY for rule in self.rules if rule.backend == REQUESTED}
        for rule in self.rules:
            for condition in rule.conditions:
                keys.update(condition.parameter_keys())
        return frozenset(keys)
