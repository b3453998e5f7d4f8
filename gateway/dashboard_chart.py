"""The dashboard's activity chart: tasks finished per interval by final state, and their
median queue wait, over the last hours, as inline SVG geometry (no script, no CDN).

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
from funnel_hpc.gateway import db

HOURS = 6
BUCKETS = 12
MAX_ROWS = 5000
WIDTH, HEIGHT = 600, 120  # the bars' area, in SVG units
FINAL_STATES = sorted(state.value for state in TERMINAL)
# SVG fill per final state (presentation attributes: nothing for the CSP to refuse)
COLORS = {"COMPLETE": "#3a9d5d", "EXECUTOR_ERROR": "#d9534f", "SYSTEM_ERROR": "#8b1e1a",
          "CANCELED": "#c9a13b", "PREEMPTED": "#7f6fb3"}


def _epoch(text: str | None) -> float | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp() \
            if text else None
    except ValueError:
        return None


def _rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def finished(engine: Engine, owner: str | None, now: float | None = None) -> dict[str, Any]:
    """{"buckets": [{"start", "counts": {state: n}, "queue_wait": median s | None}],
    "bars": SVG rects, "max": tallest bar, "hours", "truncated"} of the last HOURS."""
    now = time.time() if now is None else now
    width = HOURS * 3600 / BUCKETS
    since = now - HOURS * 3600
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
    return {"buckets": [{"start": _rfc3339(since + i * width)[11:16], "counts": counts[i],
                         "queue_wait": statistics.median(waits[i]) if waits[i] else None}
                        for i in range(BUCKETS)],
            "bars": _bars(counts, tallest), "max": tallest, "hours": HOURS,
            "truncated": len(rows) >= MAX_ROWS, "width": WIDTH, "height": HEIGHT,
            "colors": COLORS}


def _bars(counts: list[dict[str, int]], tallest: int) -> list[dict[str, Any]]:
    """One stacked bar per bucket: a rect per final state with tasks in it."""
    step = WIDTH / len(counts)
    rects = []
    for index, bucket in enumerate(counts):
        bottom = float(HEIGHT)
        for state in FINAL_STATES:
            if not bucket[state]:
                continue
            size = HEIGHT * bucket[state] / tallest
            bottom -= size
            rects.append({"x": round(index * step + 2, 1), "y": round(bottom, 1),
                          "w": round(step - 4, 1), "h": round(size, 1), "state": state,
                          "n": bucket[state], "fill": COLORS.get(state, "#888")})
    return rects
