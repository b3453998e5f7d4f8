"""TES task views: MINIMAL, BASIC and FULL, applied to a stored task."""

from __future__ import annotations

import json
from typing import Any

# Order of keys in a returned task, following the TES OpenAPI.
SPEC_KEYS = ("name", "description", "inputs", "outputs", "resources", "executors",
             "volumes", "tags")


_LOG_KEYS = ("start_time", "end_time", "logs", "outputs", "metadata")

# TES 1.1 tesExecutorLog requires exit_code, but an executor that is still running (or
# was stopped before it ended: canceled, system error) has none. Such a log carries -1:
# the worker reports real exit codes as 0-255 (128+N for signal N), so -1 never
# collides with one, and it is not 0, which clients read as success.
NO_EXIT_CODE = -1


def render_executor_log(entry: dict) -> dict:
    """A stored executor log -> a valid tesExecutorLog (exit_code always set)."""
    if "exit_code" in entry:
        return entry
    return {**entry, "exit_code": NO_EXIT_CODE}


def render_logs(stored: list) -> list:
    """Stored attempt logs -> TES tesTaskLog list.

    The store keeps the gateway's own notes (gateway_logs) apart from what the
    worker reported (worker_logs); TES sees both as system_logs.
    """
    out = []
    for entry in stored:
        log = {k: entry[k] for k in _LOG_KEYS if k in entry}
        log["logs"] = [render_executor_log(e) for e in log.get("logs", [])]
        log.setdefault("outputs", [])
        log["system_logs"] = [*entry.get("system_logs", []), *entry.get("gateway_logs", []),
                              *entry.get("worker_logs", [])]
        out.append(log)
    return out


def full_task(task_id: str, state: str, spec: dict, logs: list, creation_time: str) -> dict:
    task: dict[str, Any] = {"id": task_id, "state": state}
    for key in SPEC_KEYS:
        if key in spec:
            task[key] = spec[key]
    if logs:
        task["logs"] = render_logs(logs)
        _fill_types(task, logs[-1].get("metadata") or {})
    task["creation_time"] = creation_time
    return task


# Metadata keys where the worker reports what it found at untyped inputs' and outputs'
# paths (worker/staging.py): JSON {"index": "FILE" | "DIRECTORY"}.
FOUND_TYPES = {"inputs": "input_types", "outputs": "output_types"}
FILE_TYPES = ("FILE", "DIRECTORY")


def _fill_types(task: dict, metadata: dict) -> None:
    """Fill in the `type` a task left out of an input or output with what the worker
    found there (TES: the server fills it in); the stored spec is not changed."""
    for key, meta_key in FOUND_TYPES.items():
        if key not in task or not isinstance(metadata.get(meta_key), str):
            continue
        try:
            found = json.loads(metadata[meta_key])
        except (ValueError, RecursionError):  # worker-written: anything at all
            continue
        if not isinstance(found, dict):
            continue
        items = []
        for index, item in enumerate(task[key]):
            kind = found.get(str(index))
            if not item.get("type") and kind in FILE_TYPES:
                item = {**item, "type": kind}
            items.append(item)
        task[key] = items


def basic(task: dict) -> dict:
    """Everything except executor stdout/stderr, input content and system logs."""
    out = dict(task)
    if "inputs" in out:
        out["inputs"] = [{k: v for k, v in i.items() if k != "content"} for i in out["inputs"]]
    if "logs" in out:
        trimmed = []
        for attempt in out["logs"]:
            attempt = {k: v for k, v in attempt.items() if k != "system_logs"}
            if "logs" in attempt:
                attempt["logs"] = [{k: v for k, v in e.items() if k not in ("stdout", "stderr")}
                                   for e in attempt["logs"]]
            trimmed.append(attempt)
        out["logs"] = trimmed
    return out


def apply_view(task: dict, view: str) -> dict:
    if view == "FULL":
        return task
    if view == "BASIC":
        return basic(task)
    return {"id": task["id"], "state": task["state"]}


# ---- the legacy /v1 routes: TES 1.0 documents ----

# The fields of each TES 1.0 object, as py-tes 0.4.2's models (tes/models.py) take them:
# any other key (a TES 1.1 field: streamable, ignore_error, backend_parameters,
# backend_parameters_strict, path_prefix) makes its unmarshal fail, and with it a whole
# page of list_tasks.
TES10_FIELDS = {
    "task": ("id", "state", "name", "description", "inputs", "outputs", "resources",
             "executors", "volumes", "tags", "logs", "creation_time"),
    "inputs": ("url", "path", "type", "name", "description", "content"),
    "outputs": ("url", "path", "type", "name", "description"),
    "resources": ("cpu_cores", "ram_gb", "disk_gb", "preemptible", "zones"),
    "executors": ("image", "command", "workdir", "stdin", "stdout", "stderr", "env"),
    "logs": ("start_time", "end_time", "metadata", "logs", "outputs", "system_logs"),
    "executor_logs": ("start_time", "end_time", "stdout", "stderr", "exit_code"),
    "output_logs": ("url", "path", "size_bytes"),
}


def _only(item: Any, kind: str) -> Any:
    return {k: v for k, v in item.items() if k in TES10_FIELDS[kind]} \
        if isinstance(item, dict) else item


def tes10_service_info(info: dict) -> dict:
    """TES 1.1 service-info -> TES 1.0's tesServiceInfo (name, doc, storage)."""
    return {"name": info.get("name", ""), "doc": info.get("description", ""),
            "storage": list(info.get("storage") or [])}


def tes10_task(task: dict) -> dict:
    """A task (any view) with the TES 1.0 fields only. A wildcard output (path_prefix) is
    a TES 1.1 idea: its type goes too, so that TES 1.0 clients read it as a plain file
    output (py-tes 0.4.2 defaults the type to FILE)."""
    out = _only(task, "task")
    for kind in ("inputs", "executors"):
        if isinstance(out.get(kind), list):
            out[kind] = [_only(item, kind) for item in out[kind]]
    if isinstance(out.get("outputs"), list):
        out["outputs"] = [_only(item, "outputs") if "path_prefix" not in item else
                          {k: v for k, v in _only(item, "outputs").items() if k != "type"}
                          for item in out["outputs"]]
    if isinstance(out.get("resources"), dict):
        out["resources"] = _only(out["resources"], "resources")
    if isinstance(out.get("logs"), list):
        out["logs"] = [_tes10_log(entry) for entry in out["logs"]]
    return out


def _tes10_log(entry: dict) -> dict:
    log = _only(entry, "logs")
    if isinstance(log.get("logs"), list):
        log["logs"] = [_only(item, "executor_logs") for item in log["logs"]]
    if isinstance(log.get("outputs"), list):
        log["outputs"] = [_only(item, "output_logs") for item in log["outputs"]]
    return log
