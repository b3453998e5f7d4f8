"""How much memory BASIC and FULL task pages may hold at once, across a server process.

One page is bounded by ``limits.max_list_bytes``; a hostile user can still ask for many
such pages at once (4 FULL pages of 15 MB inputs took a server past 1.8 GB). Every page
being built or sent takes the bytes of its task documents from this process's budget,
``limits.max_list_bytes_in_flight``, and gives them back when its answer is sent. A page
that finds the budget spent ends early with a next_page_token when it holds a task
already, else the request is refused (HTTP 503 with Retry-After, gRPC UNAVAILABLE). A
task larger than the whole budget is still listed when no other page is in flight.
"""

from __future__ import annotations

import threading


class PageBudget:
    """Bytes of task documents that pages in flight hold, across this process."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def hold(self) -> PageHold:
        """What one page takes; release it when its answer is sent."""
        return PageHold(self)

    def _take(self, size: int) -> bool:
        with self._lock:
            if self.used and self.used + size > self.limit:
                return False
            self.used += size
            return True

    def _give(self, size: int) -> None:
        with self._lock:
            self.used -= size


class PageHold:
    """One page's share of a PageBudget (a context manager that releases it)."""

    def __init__(self, budget: PageBudget):
        self.budget = budget
        self.size = 0

    def take(self, size: int) -> bool:
        if not self.budget._take(size):
            return False
        self.size += size
        return True

    def release(self) -> None:
        size, self.size = self.size, 0
        if size:
            self.budget._give(size)

    def __enter__(self) -> PageHold:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()
