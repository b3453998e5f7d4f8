"""Request rate limits: a token bucket per client, and a login throttle per address.

``RateLimiter``: a token bucket per user (or per address when anonymous), for every
request. ``LoginThrottle``: applied per client address *before* credentials are
checked (HTTP Basic, bearer tokens, the dashboard's login form, gRPC): a token
bucket for password-hash checks (each costs ~0.1 s of CPU) and, from the
``free_failures``-th failed attempt on, a lockout that doubles with each further
failure (``backoff_seconds`` up to ``backoff_max_seconds``). A success does not reset the
count (someone with an account of their own could otherwise reset it between
guesses at another's); a quiet spell of ``backoff_max_seconds`` does. Both cost a dict lookup under
a lock per call; idle entries are forgotten past 100,000 clients.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from funnel_hpc.core.config import AuthSection

log = logging.getLogger(__name__)

MAX_CLIENTS = 100_000


class RateLimiter:
    """Token bucket per key; check() says how long to wait (0: go ahead)."""

    def __init__(self, per_second: float, burst: int,
                 clock: Callable[[], float] = time.monotonic):
        self.rate = float(per_second)
        self.burst = max(1, int(burst or math.ceil(per_second)))
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)
        self.lock = threading.Lock()
        self.clock = clock

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def check(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds to wait."""
        now = self.clock()
        with self.lock:
            tokens, last = self.buckets.get(key, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self.buckets[key] = (tokens - 1, now)
                return 0.0
            self.buckets[key] = (tokens, now)
            if len(self.buckets) > MAX_CLIENTS:  # forget idle clients
                self.buckets = {k: v for k, v in self.buckets.items() if now - v[1] < 60}
            return (1 - tokens) / self.rate


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    """Per-address limits on credential checks (see the module docstring)."""

    def __init__(self, per_second: float, burst: int, free_failures: int,
                 backoff_seconds: float, backoff_max_seconds: float,
                 clock: Callable[[], float] = time.monotonic):
        self.checks = RateLimiter(per_second, burst, clock)
        self.free_failures = max(0, int(free_failures))
        self.backoff = float(backoff_seconds)
        self.backoff_max = float(backoff_max_seconds)
        self.clock = clock
        self.failures: dict[str, _Failures] = {}
        self.lock = threading.Lock()

    @classmethod
    def from_config(cls, auth: AuthSection) -> LoginThrottle:
        return cls(auth.login_rate_per_second, auth.login_burst,
                   auth.login_free_failures, auth.login_backoff_seconds,
                   auth.login_backoff_max_seconds)

    def locked(self, client: str) -> float:
        """Seconds this client must wait before trying credentials again (0: may try)."""
        with self.lock:
            entry = self.failures.get(client)
            return max(0.0, entry.locked_until - self.clock()) if entry else 0.0

    def take_check(self, client: str) -> float:
        """Charge one expensive (password-hash) check; seconds to wait if over the rate."""
        return self.checks.check(client) if self.checks.enabled else 0.0

    def failed(self, client: str) -> None:
        if self.backoff <= 0:
            return
        now = self.clock()
        with self.lock:
            entry = self.failures.setdefault(client, _Failures())
            if now - entry.last > self.backoff_max:  # a quiet spell forgives old failures
                entry.count = 0
            entry.count += 1
            entry.last = now
            over = entry.count - self.free_failures  # 0 at the free_failures-th failure
            if over >= 0:
                wait = min(self.backoff_max, self.backoff * 2 ** min(over, 30))
                entry.locked_until = now + wait
                log.warning("%d failed sign-ins from %s: refused for %.0f s",
                            entry.count, client, wait)
            if len(self.failures) > MAX_CLIENTS:
                self.failures = {k: v for k, v in self.failures.items()
                                 if now - v.last < self.backoff_max}
