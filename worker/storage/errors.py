"""The storage errors every store and the worker share (a leaf: imports nothing of ours)."""

from __future__ import annotations


class StorageError(RuntimeError):
    """A transfer failed; the message names the URL (without credentials).

    transient: worth trying again (the store's rule); index: which of several
    transfers given to Storage at once failed."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient
        self.index: int | None = None


class Stopped(StorageError):
    """A transfer given up half-way because the task was canceled."""
