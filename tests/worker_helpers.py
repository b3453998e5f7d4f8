"""Shared pieces of the worker tests (tests/worker/): a shell executor on the test image,
and finding processes by their exact argv."""

from __future__ import annotations

import os
import shutil

from tests.components import need as need_component

BUSYBOX = "busybox"


def need(tool: str) -> None:
    """The command tool on PATH (tests/components.py's rule: fail under CI, else skip)."""
    need_component(tool, shutil.which(tool) is not None,
                   "not installed (scripts/setup/40-worker.sh)")


def sh(script: str, **fields) -> dict:
    return {"image": BUSYBOX, "command": ["sh", "-c", script], **fields}


def processes_with_argv(argv: list[str]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = open(f"/proc/{entry}/cmdline", "rb").read()
            except OSError:
                continue
            if raw.split(b"\0")[:-1] == [a.encode() for a in argv]:
                found.append(int(entry))
    return found
