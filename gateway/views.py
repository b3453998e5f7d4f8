"""TES task views: MINIMAL, BASIC and FULL, applied to a stored task."""

from __future__ import annotations

from typing import Any

# Order of keys in a returned task, following the TES OpenAPI.
SPEC_KEYS = ("name", "description", "inputs", "outputs", "resources", "executors",
             "volumes", "tags")


_LOG_KEYS = ("start_time", "end_time", "logs", "outputs", "metadata")


def render_logs(stored: list) -> list:
    """Stored attempt logs -> TES tesTaskLog list.

    The store keeps the gateway's own notes (gateway_logs) apart from what the
    worker reported (worker_logs); TES sees both as system_logs.
    """
    out = []
    for entry in stored:
        log = {k: entry[k] for k in _LOG_KEYS if k in entry}
        log.setdefault("logs", [])
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
