"""How a task's run stops early: canceled, or infrastructure trouble (SYSTEM_ERROR)."""

from __future__ import annotations


class Canceled(Exception):
    """The task was canceled (a signal, or the server said so): it ends CANCELED."""


class SystemFailure(Exception):
    """Infrastructure trouble: the task ends as SYSTEM_ERROR with this message."""
