"""Strict TES 1.1 schema checks over what the server returns (tests/tes_schema/).

``task_errors(task, view)`` and ``service_info_errors(info)`` list every way a document
breaks the vendored TES 1.1 schema (empty: it conforms). MINIMAL tasks are checked
against ``tesTask`` without its ``required`` list: the spec's own MINIMAL view carries
only ``id`` and ``state``, so ``executors`` cannot be required there.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMA_FILE = Path(__file__).resolve().parent / "tes_schema" / "tes-1.1.json"


@functools.cache
def _document() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


@functools.cache
def validator(definition: str, *, minimal: bool = False) -> Draft202012Validator:
    document = copy.deepcopy(_document())
    if minimal:
        document["$defs"][definition].pop("required", None)
    return Draft202012Validator({**document, "$ref": f"#/$defs/{definition}"})


def errors(definition: str, value: Any, *, minimal: bool = False) -> list[str]:
    found = validator(definition, minimal=minimal).iter_errors(value)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]


def task_errors(task: dict, view: str) -> list[str]:
    problems = errors("tesTask", task, minimal=view == "MINIMAL")
    if view == "MINIMAL" and set(task) != {"id", "state"}:
        problems.append(f"MINIMAL view carries {sorted(task)}, not only id and state")
    return problems


def list_errors(page: dict, view: str) -> list[str]:
    problems = errors("tesListTasksResponse", {**page, "tasks": []})
    for index, task in enumerate(page.get("tasks", [])):
        problems += [f"tasks/{index}/{p}" for p in task_errors(task, view)]
    return problems


def service_info_errors(info: dict) -> list[str]:
    return errors("tesServiceInfo", info)
