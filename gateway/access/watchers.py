"""How many event streams may be open at once, and how much one reads at a time: shared by
the HTTP watch stream (gateway/web/watch.py) and gRPC's WatchEvents (gateway/grpc/server.py).
Each open stream holds a server thread; ``events.watch.max_clients`` bounds them."""

from __future__ import annotations

import threading

READ_LIMIT = 500          # events read per look


class WatcherSlots:
    """A bounded count of open streams (each holds a server thread), and per user a
    smaller bound, so one user's streams cannot take every slot from the others. A
    caller without a user name (auth off) meets only the global bound."""

    def __init__(self, limit: int, per_user: int = 0):
        self.limit = limit
        self.per_user = per_user or limit
        self.open = 0
        self.by_user: dict[str, int] = {}
        self.lock = threading.Lock()

    def take(self, user: str | None = None) -> str | None:
        """None when a slot was taken (give it back with give(user)), else which bound
        refused it: "server" or "user"."""
        with self.lock:
            if self.open >= self.limit:
                return "server"
            if user is not None:
                held = self.by_user.get(user, 0)
                if held >= self.per_user:
                    return "user"
                self.by_user[user] = held + 1
            self.open += 1
            return None

    def give(self, user: str | None = None) -> None:
        with self.lock:
            self.open -= 1
            if user is not None:
                left = self.by_user.get(user, 0) - 1
                if left > 0:
                    self.by_user[user] = left
                else:
                    self.by_user.pop(user, None)


REFUSED = {"server": "too many event streams open; retry",
           "user": "too many event streams open for this user "
                   "(events.watch.max_clients_per_user); close one or retry"}
