"""The dashboard's activity chart: tasks finished per interval by final state, and their
median queue wait, over the last hours, as inline SVG geometry (no script, no CDN).
Intervals start on whole multiples of their length (12:00, 12:30...), the last one is
the current, partial one; one column per interval, so a template can lay the bars and
the numbers under them out in one table and they line up at any width.

Cost: one query per task-list page load, reading the ended tasks of the window (at most
MAX_ROWS, newest first: `updated_at` is when a task ended, as terminal states never
change) with their logs, for the first attempt's start time.
"""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine

from funnel_hpc.core.states import TERMINAL
from funnel_hpc.gateway.store import db

HOURS = 6
BUCKETS = 12
MAX_ROWS = 5000
HEIGHT = 100  # a bar's full height, in SVG units (its column's viewBox is 10 x HEIGHT)
FINAL_STATES = sorted(state.value for state in TERMINAL)
# SVG fill per final state (presentation attributes: nothing for the CSP to refuse)
COLORS = {"COMPLETE": "#3a9d5d", "EXECUTOR_ERROR": "#d9534f", "SYSTEM_ERROR": "#8b1e1a",
          "CANCELED": "#c9a13b", "PREEMPTED": "#7f6fb3"}


def _epoch(text: str | None) -> float | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp() \
            if text else None
    except (ValueError, OverflowError, OSError):
        return None


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def clock(seconds: float | None) -> str:
    """A duration as h:mm:ss / m:ss ("-" if unknown): queue waits and run times read
    the same on the list, the task page and the chart."""
    if seconds is None:
        return "-"
    minutes, rest = divmod(max(0, int(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes}:{rest:02d}"


def finished(engine: Engine, owner: str | None, now: float | None = None) -> dict[str, Any]:
    """{"buckets": [{"start" (HH:MM UTC), "counts": {state: n}, "total", "queue_wait":
    median s | None, "wait" (in words), "rects": that column's SVG rects}], "bars": every
    rect, "tallest", "totals": {state: n} of the window, "finished", "hours",
    "truncated", "height", "colors"} of the last HOURS."""
    now = time.time() if now is None else now
    width = HOURS * 3600 / BUCKETS
    end = (now // width + 1) * width  # the current interval's end
    since = end - HOURS * 3600
    t = db.tasks.c
    query = (select(t.state, t.updated_at, t.creation_time, t.logs)
             .where(t.state.in_(FINAL_STATES), t.updated_at >= _rfc3339(since))
             .order_by(t.updated_at.desc()).limit(MAX_ROWS))
    if owner is not None:
        query = query.where(t.owner == owner)
    with db.reading(engine) as conn:
        rows = conn.execute(query).all()
    counts = [dict.fromkeys(FINAL_STATES, 0) for _ in range(BUCKETS)]
    waits: list[list[float]] = [[] for _ in range(BUCKETS)]
    for row in rows:
        ended = _epoch(row.updated_at)
        if ended is None or ended < since:
            continue
        index = min(BUCKETS - 1, int((ended - since) // width))
        counts[index][row.state] += 1
        started = _epoch((row.logs or [{}])[0].get("start_time")) if row.logs else None
        created = _epoch(row.creation_time)
        if started is not None and created is not None:
            waits[index].append(max(0.0, started - created))
    tallest = max([sum(bucket.values()) for bucket in counts] + [1])
    buckets: list[dict[str, Any]] = []
    for index, bucket in enumerate(counts):
        wait = statistics.median(waits[index]) if waits[index] else None
        buckets.append({"start": _rfc3339(since + index * width)[11:16], "counts": bucket,
                        "total": sum(bucket.values()), "queue_wait": wait,
                        "wait": clock(wait), "rects": _stack(bucket, tallest)})
    totals = {state: sum(bucket[state] for bucket in counts) for state in FINAL_STATES}
    return {"buckets": buckets, "bars": [rect for b in buckets for rect in b["rects"]],
            "tallest": tallest, "totals": {s: n for s, n in totals.items() if n},
            "finished": sum(totals.values()), "hours": HOURS, "minutes": int(width // 60),
            "truncated": len(rows) >= MAX_ROWS, "height": HEIGHT, "colors": COLORS}


def _stack(bucket: dict[str, int], tallest: int) -> list[dict[str, Any]]:
    """One interval's stacked bar: a rect per final state with tasks in it, bottom up, in
    its column's 10 x HEIGHT viewBox."""
    rects = []
    bottom = float(HEIGHT)
    for state in FINAL_STATES:
        if not bucket[state]:
            continue
        size = HEIGHT * bucket[state] / tallest
        bottom -= size
        rects.append({"y": round(bottom, 2), "h": round(size, 2), "state": state,
                      "n": bucket[state], "fill": COLORS.get(state, "#888")})
    return rects
