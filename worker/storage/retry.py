"""One retry rule for every store: exponential backoff with full jitter, bounded in time.

A StorageError with ``transient`` set is tried again after a random pause of up to
0.25 s, 0.5 s, 1 s, ... (at most MAX_PAUSE) until ``storage.retry_seconds`` have passed
since the first attempt; anything else (404, 403, bad credentials) fails at once. The
pauses end early when the task is canceled. Stores' own libraries are set to one attempt,
so a budget is the whole story (no retries multiplied by retries).
"""

from __future__ import annotations

import random
import threading
import time

from funnel_hpc.worker.storage.errors import Stopped, StorageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    T = TypeVar("T")

FIRST_PAUSE = 0.25
MAX_PAUSE = 10.0


def with_retries(url: str, attempt: Callable[[], T], budget_seconds: float,
                 stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic) -> T:
    """attempt() until it succeeds, fails for good, or budget_seconds are spent."""
    started = clock()
    pause = FIRST_PAUSE
    attempts = 0
    while True:
        attempts += 1
        try:
            return attempt()
        except StorageError as exc:
            if not exc.transient or isinstance(exc, Stopped):
                raise
            remaining = budget_seconds - (clock() - started)
            if remaining <= 0:
                raise StorageError(
                    f"{exc} (still failing after {attempts} attempt"
                    f"{'s' if attempts > 1 else ''} in {clock() - started:.1f} s; "
                    f"storage.retry_seconds: {budget_seconds:g})") from None
            wait = min(remaining, random.uniform(0, pause))
            pause = min(pause * 2, MAX_PAUSE)
        if stop is not None:
            if stop.wait(wait):
                raise Stopped(f"{url}: transfer stopped (task canceled)")
        else:
            time.sleep(wait)


def transient_status(status: int | None) -> bool:
    """An HTTP status worth trying again: none (no answer), 408, 429 or 5xx except 501."""
    from funnel_hpc.core.client import is_transient

    return status == 408 or (status != 501 and is_transient(status))
