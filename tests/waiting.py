"""Waiting in tests: poll a condition with short sleeps until it holds or time runs out.

A test that can fail on a busy machine is a bug, so tests wait for conditions, never for
fixed times; every poll-until loop goes through ``wait_for``, and a timeout says what was
awaited and what was last seen. Cost: one predicate call per ``interval`` (0.2 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import requests

POLL_SECONDS = 0.2

Value = TypeVar("Value")


def wait_for(predicate: Callable[[], Value | None], timeout: float, what: str, *,
             interval: float = POLL_SECONDS, detail: Callable[[], object] | None = None) -> Value:
    """Call predicate every interval seconds until it returns something truthy, and return
    that; after timeout seconds raise AssertionError naming what was awaited (plus
    detail(), e.g. the server's log, when given). The predicate runs at least once, and
    once more after the last sleep."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    message = f"timed out after {timeout:g} s waiting for {what}"
    if detail is not None:
        message += f"\n{detail()}"
    raise AssertionError(message)


def wait_for_state(api_url: str, task_id: str, states: str | Iterable[str],
                   timeout: float = 90.0, auth: Any = None, *, view: str = "FULL",
                   detail: Callable[[], object] | None = None) -> dict[str, Any]:
    """Poll GET <api_url>/tasks/<task_id> (api_url: the TES base URL, e.g. a server's
    ``.api``) until the task's state is one of states; return the task (in view).
    auth goes to requests as is (a (user, password) tuple or an AuthBase)."""
    wanted = {states} if isinstance(states, str) else set(states)
    last: dict[str, Any] = {}

    def reached() -> dict[str, Any] | None:
        resp = requests.get(f"{api_url}/tasks/{task_id}", params={"view": view}, auth=auth,
                            timeout=10)
        assert resp.status_code == 200, f"GET task {task_id}: {resp.status_code} {resp.text}"
        last.clear()
        last.update(resp.json())
        return last if last["state"] in wanted else None

    def seen() -> str:
        extra = f"\n{detail()}" if detail is not None else ""
        return f"last seen: {last}{extra}"

    return wait_for(reached, timeout, f"task {task_id} to reach {sorted(wanted)}",
                    detail=seen)


def calls_until(call: Callable[[], Value], stop: Callable[[Value], bool], *,
                at_least: int = 15, at_most: int = 500) -> tuple[list[Value], float]:
    """Make at least at_least calls, and go on until one result satisfies stop (at most
    at_most calls): for limits in time (a rate limit), where a busy machine's slower calls
    must not turn the test's expectation into a race. The results and the seconds taken."""
    started = time.monotonic()
    results: list[Value] = []
    while len(results) < at_most and (len(results) < at_least
                                      or not any(stop(result) for result in results)):
        results.append(call())
    return results, time.monotonic() - started
