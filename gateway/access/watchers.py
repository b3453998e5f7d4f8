"""How many event streams may be open at once, and how much one reads at a time: shared by
the HTTP watch stream (gateway/web/watch.py) and gRPC's WatchEvents (gateway/grpc/server.py).
Each open stream holds a server thread; ``events.watch.max_clients`` bounds them."""

from __future__ import annotations

import threading

READ_LIMIT = 500          # events read per look


class WatcherSlots:
    """A bounded count of open streams (each holds a WSGI thread)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open = 0
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def give(self) -> None:
        with self.lock:
            self.open -= 1
