"""Python's cyclic garbage collector paused for a reconciler tick.

A tick at scale makes hundreds of thousands of short-lived objects (10,000 task documents
decoded, their requests, files and tails, a poll's rows), almost none in a reference
cycle: reference counting frees them. With the collector on, they set off hundreds of
young collections and a few full ones mid-tick, each full one walking every object the
process holds (the in-flight index, every tail): a third of the CPU of submitting 10,000
tasks in one tick (0.6 s of 1.8 s, measured). Paused, the tick does only its own work;
the collector runs again after it, and collects whatever cycles the tick left then.

Pauses nest (each backend instance's reconciler is a thread of one process): the
collector is on again when the last pause ends, and only if it was on when the first
began.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Pauses:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.was_enabled = False

    def begin(self) -> None:
        with self.lock:
            if self.count == 0:
                self.was_enabled = gc.isenabled()
                gc.disable()
            self.count += 1

    def end(self) -> None:
        with self.lock:
            self.count -= 1
            if self.count == 0 and self.was_enabled:
                gc.enable()


_PAUSES = _Pauses()


@contextmanager
def paused() -> Iterator[None]:
    """The cyclic collector off for the block (see the module's docstring)."""
    _PAUSES.begin()
    try:
        yield
    finally:
        _PAUSES.end()
