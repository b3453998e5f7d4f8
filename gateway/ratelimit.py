"""Per-client request rate limit: a token bucket per user (or per address when anonymous)."""

from __future__ import annotations

import math
import threading
import time


class RateLimiter:
    def __init__(self, per_second: float, burst: int):
        self.rate = float(per_second)
        self.burst = max(1, int(burst or math.ceil(per_second)))
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds to wait."""
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(key, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self.buckets[key] = (tokens - 1, now)
                return 0.0
            self.buckets[key] = (tokens, now)
            if len(self.buckets) > 100_000:  # forget idle clients
                self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < 60}
            return (1 - tokens) / self.rate
