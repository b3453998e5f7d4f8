"""TES task views: MINIMAL, BASIC and FULL, applied to a stored task."""

from __future__ import annotations

from typing import Any

# Order of keys in a returned task, following the TES OpenAPI.
SPEC_KEYS = ("name", "description", "inputs", "outputs", "resources", "executors",
             "volumes", "tags")


def full_task(task_id: str, state: str, spec: dict, logs: list, creation_time: str) -> dict:
    task: dict[str, Any] = {"id": task_id, "state": state}
    for key in SPEC_KEYS:
        if key in spec:
            task[key] = spec[key]
    if logs:
        task["logs"] = logs
    task["creation_time"] = creation_time
    return task


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
