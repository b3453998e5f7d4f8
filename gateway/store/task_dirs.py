"""Where a task's files are, as the gateway names them.

A task's directory, ``<work_dir>/<task id>/``, is the worker's (and, with
``submit_as_owner``, its owner's): the worker writes its event log ``events.jsonl``
there. ``<work_dir>/.gateway/<task id>/`` is what only the gateway writes (700): the
event intake's copy of events received over HTTP. An earlier attempt's logs are kept
beside them with ``.attempt<N>`` appended.
"""

from __future__ import annotations

from pathlib import Path

WORKER_EVENTS = "events.jsonl"            # in the task dir: the worker's (the job's uid)
RECEIVED_EVENTS = "events.received.jsonl"  # in the gateway's dir: the intake's copy
EVENT_FILES = (WORKER_EVENTS, RECEIVED_EVENTS)
GATEWAY_DIR = ".gateway"  # <work_dir>/.gateway/<task id>/: what only the gateway writes
ATTEMPT_SUFFIX = ".attempt{}"


def gateway_dir(work_dir: str | Path, task_id: str) -> Path:
    """<work_dir>/.gateway/<task id>: the task's files only the gateway writes."""
    return Path(work_dir) / GATEWAY_DIR / task_id
