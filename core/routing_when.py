"""The `when` of a routing rule (core/routing.py): conditions compiled from YAML data, each
tested against a view of one task and able to say what a task lacks.

    conditions = compile_when(raw_when, "routing[2].when", reserved_tags)  # RuleError
    view = TaskView(task, owner, groups)      # what every rule reads, looked up once
    [c for c in conditions if not c.test(view)][0].need()   # "needs tag site=partner"

Keys: owner, group (of the caller, never from the task), tags (exact keys),
backend_parameters (keys case-insensitive, lowered with str.lower as the rest of the
code does), resources (cpu_cores, ram_gb, disk_gb ranges, preemptible, zones); values
exact or "any" (present). A task without cpu_cores counts as 1, without ram_gb/disk_gb as
0, without preemptible as false; one without zones meets no zones condition.

Contract: compile_when checks every key and value (path and value in the message, caps of
MAX_VALUES a list or map); test() never raises on odd task data (a wrong type is no
match) and builds no regex; TaskView walks backend_parameters and zones at most once per
task, however many rules read them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence

# a tag or backend_parameters condition with this value: the key is present
ANY = "any"
# entries in one list or map of a rule, at most (checked with the key path)
MAX_VALUES = 256
# the order conditions are tested in, cheapest first (explain() says the first unmet one)
WHEN_KEYS = ("owner", "group", "tags", "backend_parameters", "resources")
# resources numbers and what a task without the field counts as (TES: one core, and
# no stated memory or disk)
_ABSENT = {"cpu_cores": 1, "ram_gb": 0, "disk_gb": 0}
_RESOURCE_KEYS = (*_ABSENT, "preemptible", "zones")


class RuleError(ValueError):
    """A routing rule is invalid: the message starts with its key path."""


def shown(value: object, limit: int = 60) -> str:
    """A configuration value in an error message: JSON-like, cut at `limit`."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _number_text(value: float) -> str:
    return f"{value:g}"


# ---- conditions: one compiled `when` key each; test() never raises on task data ----

class TaskView:
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


class Condition:
    """One `when` key of a rule."""

    __slots__ = ()
    # whether it reads the caller (owner, groups) rather than the task
    about_caller = False

    def test(self, view: TaskView) -> bool:
        raise NotImplementedError

    def parameter_keys(self) -> tuple[str, ...]:
        """The backend_parameters keys (lowered) it reads."""
        return ()

    def need(self) -> str:
        """What a task lacks when test() is False: "needs tag site=partner"."""
        raise NotImplementedError


class _Pairs(Condition):
    """tags or backend_parameters: each key present, with this value unless "any"."""

    __slots__ = ("label", "pairs", "lowered")

    def __init__(self, label: str, pairs: tuple[tuple[str, str | None], ...],
                 lowered: bool):
        self.label = label
        self.pairs = pairs  # (key, value or None for any)
        self.lowered = lowered

    def test(self, view: TaskView) -> bool:
        present = view.parameters if self.lowered else view.tags
        for key, value in self.pairs:
            got = present.get(key, _MISSING)
            if got is _MISSING or (value is not None and got != value):
                return False
        return True

    def parameter_keys(self) -> tuple[str, ...]:
        return tuple(key for key, _ in self.pairs) if self.lowered else ()

    def need(self) -> str:
        wanted = [key if value is None else f"{key}={value}" for key, value in self.pairs]
        return f"needs {self.label}{', '.join(_cut(text) for text in wanted)}"


_MISSING = object()


def _cut(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _Number(Condition):
    """resources.cpu_cores / ram_gb / disk_gb within [low, high]."""

    __slots__ = ("field", "low", "high", "absent")

    def __init__(self, field: str, low: float, high: float):
        self.field = field
        self.low = low
        self.high = high
        self.absent = _ABSENT[field]

    def test(self, view: TaskView) -> bool:
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


class _Preemptible(Condition):
    """resources.preemptible is this boolean (a task without it: false)."""

    __slots__ = ("wanted",)

    def __init__(self, wanted: bool):
        self.wanted = wanted

    def test(self, view: TaskView) -> bool:
        value = view.resources.get("preemptible")
        return (False if value is None else value) is self.wanted

    def need(self) -> str:
        return f"needs preemptible {str(self.wanted).lower()}"


class _Zones(Condition):
    """resources.zones names one of these (a task without zones: no match)."""

    __slots__ = ("zones", "shown")

    def __init__(self, zones: tuple[str, ...]):
        self.zones = frozenset(zones)
        self.shown = ", ".join(_cut(zone) for zone in zones[:5]) + \
            (", ..." if len(zones) > 5 else "")

    def test(self, view: TaskView) -> bool:
        # isdisjoint walks the smaller of the two sets
        return not self.zones.isdisjoint(view.zones)

    def need(self) -> str:
        return f"needs a zone among {self.shown}"


class _Owner(Condition):
    """The task's owner is one of these names."""

    __slots__ = ("names",)
    about_caller = True

    def __init__(self, names: tuple[str, ...]):
        self.names = frozenset(names)

    def test(self, view: TaskView) -> bool:
        return view.owner in self.names

    def need(self) -> str:
        return "is for certain owners"  # names stay the admin's: not told to every caller


class _Group(Condition):
    """The owner is in one of these groups."""

    __slots__ = ("names",)
    about_caller = True

    def __init__(self, names: tuple[str, ...]):
        self.names = frozenset(names)

    def test(self, view: TaskView) -> bool:
        return not self.names.isdisjoint(view.groups)

    def need(self) -> str:
        return "is for certain groups"


# ---- parsing: every check names its key path and the value ----

def mapping_of(value: object, path: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise RuleError(f"{path}: expected a mapping, got {shown(value)}")
    if len(value) > MAX_VALUES:
        raise RuleError(f"{path}: {len(value)} entries, at most {MAX_VALUES}")
    for key in value:
        if not isinstance(key, str) or not key:
            raise RuleError(f"{path}: expected string keys, got {shown(key)}")
    return value


def known_keys(value: Mapping, known: Sequence[str], path: str) -> None:
    for key in value:
        if key not in known:
            raise RuleError(f"{path}.{key}: unknown key (known: {', '.join(known)})")


def names_of(value: object, path: str, one_allowed: bool = True) -> tuple[str, ...]:
    """A non-empty list of distinct non-empty strings (or one string)."""
    if isinstance(value, str) and one_allowed:
        value = [value]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        what = "a name or a list of names" if one_allowed else "a list of names"
        raise RuleError(f"{path}: expected {what}, got {shown(value)}")
    if not value:
        raise RuleError(f"{path}: an empty list matches nothing; leave the key out")
    if len(value) > MAX_VALUES:
        raise RuleError(f"{path}: {len(value)} entries, at most {MAX_VALUES}")
    seen: set[str] = set()
    for index, name in enumerate(value):
        if not isinstance(name, str) or not name:
            raise RuleError(f"{path}[{index}]: expected a non-empty string, got {shown(name)}")
        if name in seen:
            raise RuleError(f"{path}[{index}]: {shown(name)} is listed twice")
        seen.add(name)
    return tuple(value)


def _pairs(value: object, path: str, label: str, lowered: bool,
           reserved: frozenset[str] = frozenset()) -> _Pairs:
    pairs: dict[str, str | None] = {}
    mapping = mapping_of(value, path)
    if not mapping:
        raise RuleError(f"{path}: an empty mapping; leave the key out")
    for key, wanted in mapping.items():
        if not isinstance(wanted, str):
            raise RuleError(f"{path}.{key}: expected a string (\"{ANY}\": the key is present), "
                            f"got {shown(wanted)}")
        if key in reserved:
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
        raise RuleError(f"{path}: expected a number, got {shown(value)}")
    if value < 0:
        raise RuleError(f"{path}: expected a number of 0 or more, got {shown(value)}")
    return float(value)


def _range(field: str, value: object, path: str) -> _Number:
    if not isinstance(value, Mapping):
        exact = _number(value, path)
        return _Number(field, exact, exact)
    known_keys(mapping_of(value, path), ("min", "max"), path)
    if not value:
        raise RuleError(f"{path}: expected min, max or both, got {{}}")
    low = _number(value["min"], f"{path}.min") if "min" in value else 0.0
    high = _number(value["max"], f"{path}.max") if "max" in value else math.inf
    if low > high:
        raise RuleError(f"{path}: min {_number_text(low)} is above max {_number_text(high)}")
    return _Number(field, low, high)


def _resources(value: object, path: str) -> list[Condition]:
    mapping = mapping_of(value, path)
    known_keys(mapping, _RESOURCE_KEYS, path)
    if not mapping:
        raise RuleError(f"{path}: an empty mapping; leave the key out")
    out: list[Condition] = []
    for field, wanted in mapping.items():
        here = f"{path}.{field}"
        if field == "preemptible":
            if not isinstance(wanted, bool):
                raise RuleError(f"{here}: expected true or false, got {shown(wanted)}")
            out.append(_Preemptible(wanted))
        elif field == "zones":
            out.append(_Zones(names_of(wanted, here, one_allowed=False)))
        else:
            out.append(_range(field, wanted, here))
    return out


def compile_when(when: object, path: str, reserved_tags: frozenset[str] = frozenset()
                 ) -> tuple[Condition, ...]:
    """The conditions of one rule's `when` (None or {}: none, the rule matches all);
    reserved_tags: tags the gateway sets, which no rule may read."""
    if when is None:
        return ()
    mapping = mapping_of(when, path)
    known_keys(mapping, WHEN_KEYS, path)
    out: list[Condition] = []
    # in a fixed order, cheapest first: the first unmet one is what explain() says
    for key in WHEN_KEYS:
        if key not in mapping:
            continue
        value, here = mapping[key], f"{path}.{key}"
        if key == "owner":
            out.append(_Owner(names_of(value, here)))
        elif key == "group":
            out.append(_Group(names_of(value, here)))
        elif key == "tags":
            out.append(_pairs(value, here, "tag ", lowered=False, reserved=reserved_tags))
        elif key == "backend_parameters":
            out.append(_pairs(value, here, "backend_parameters.", lowered=True))
        else:
            out.extend(_resources(value, here))
    return tuple(out)
