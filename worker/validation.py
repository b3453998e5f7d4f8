"""Checks a task document before the worker touches anything.

A task that fails these checks ends as SYSTEM_ERROR with the reason in its
system logs; nothing is staged and no executor starts. The checks keep task
strings from being read as options by a container engine (an image or an
environment variable name starting with ``-``), keep container paths absolute
and free of ``..``, and refuse wildcard outputs without a usable ``path_prefix``.
"""

from __future__ import annotations

import re

from funnel_hpc.worker.paths import WILDCARD, PathError, check_container_path

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Mapping

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Registry host[:port]/name[:tag][@digest]; never starts with "-".
IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@+-]*")
INPUT_TYPES = {None, "FILE", "DIRECTORY"}
# A task id names its directory: no "/", no "..", nothing hidden.
TASK_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


class TaskError(ValueError):
    """The task document cannot be run as given."""


def check_task_id(task_id: object) -> str:
    if not isinstance(task_id, str) or not TASK_ID.fullmatch(task_id):
        raise TaskError(f"invalid task id {task_id!r}")
    return task_id


def check_task(task: Mapping[str, object]) -> None:
    """Raise TaskError naming the first problem found."""
    executors = task.get("executors")
    if not isinstance(executors, list) or not executors:
        raise TaskError("the task has no executors")
    for index, executor in enumerate(executors):
        _check_executor(index, executor)
    for kind in ("inputs", "outputs"):
        items = task.get(kind) or []
        if not isinstance(items, list):
            raise TaskError(f"{kind} must be a list")
        for index, item in enumerate(items):
            _check_file(kind, index, item)
    volumes = task.get("volumes") or []
    if not isinstance(volumes, list):
        raise TaskError("volumes must be a list")
    for volume in volumes:
        _path(f"volume {volume!r}", volume)


def _path(what: str, value: object) -> str:
    try:
        return check_container_path(value)  # type: ignore[arg-type]  # paths.py refuses a non-str
    except PathError as exc:
        raise TaskError(f"{what}: {exc}") from None


def _check_executor(index: int, executor: object) -> None:
    where = f"executor {index}"
    if not isinstance(executor, dict):
        raise TaskError(f"{where} is not an object")
    image = executor.get("image")
    if not isinstance(image, str) or not IMAGE.fullmatch(image):
        raise TaskError(f"{where}: invalid image name {image!r}")
    command = executor.get("command")
    if (not isinstance(command, list) or not command
            or not all(isinstance(word, str) for word in command)):
        raise TaskError(f"{where}: command must be a non-empty list of strings")
    if any("\x00" in word for word in command):
        raise TaskError(f"{where}: command has a NUL character")
    env = executor.get("env") or {}
    if not isinstance(env, dict):
        raise TaskError(f"{where}: env must be an object")
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise TaskError(f"{where}: invalid environment variable name {name!r}")
        if not isinstance(value, str) or "\x00" in value:
            raise TaskError(f"{where}: environment variable {name} must be a string "
                            "without NUL characters")
    for key in ("workdir", "stdin", "stdout", "stderr"):
        if executor.get(key):
            _path(f"{where} {key}", executor[key])


def _check_file(kind: str, index: int, item: object) -> None:
    where = f"{kind[:-1]} {index}"
    if not isinstance(item, dict):
        raise TaskError(f"{where} is not an object")
    path = _path(where, item.get("path"))
    if item.get("type") not in INPUT_TYPES:
        raise TaskError(f"{where}: unknown type {item.get('type')!r}")
    if kind == "inputs":
        if item.get("content") is None and not item.get("url"):
            raise TaskError(f"{where} ({path}): needs a url or content")
        return
    if not item.get("url"):
        raise TaskError(f"{where} ({path}): needs a url")
    if WILDCARD.search(path):
        prefix = item.get("path_prefix")
        if not prefix:
            raise TaskError(f"{where} ({path}): a wildcard output needs path_prefix")
        prefix = _path(f"{where} path_prefix", prefix).rstrip("/") + "/"
        if not path.startswith(prefix):
            raise TaskError(f"{where}: path_prefix {prefix!r} is not a prefix of {path!r}")
