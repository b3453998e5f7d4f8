"""Helpers of the dashboard's browser tests: full-page screenshots kept as artifacts, the
state of a live-log box, a signed-in browser. Fixtures live in tests/test_dashboard.py."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

SCREENSHOTS_ENV = "DASHBOARD_SCREENSHOTS"  # where to keep them (default: a pytest tmp dir)

# The first stdout box of the task page, measured in the page (the refresh swaps the
# element every 2 s: a Python-side element reference would go stale).
LOG_BOX_STATE = """
var box = document.querySelector('pre.stdout');
if (!box) return null;
var lines = box.textContent.trim().split('\\n');
return {top: box.scrollTop, height: box.scrollHeight, visible: box.clientHeight,
        last: lines[lines.length - 1],
        bottom: box.scrollHeight - box.scrollTop - box.clientHeight < 8};
"""


def screenshot_dir(default: Path) -> Path:
    """$DASHBOARD_SCREENSHOTS (created) or default."""
    chosen = Path(os.environ.get(SCREENSHOTS_ENV) or default)
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


def full_page_shot(browser: Any, directory: Path, name: str) -> Path:
    """A PNG of the whole page (not just the window) as directory/name.png."""
    metrics = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                 "scale": 1}})
    path = directory / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.stat().st_size > 1000, path
    print(f"screenshot: {path}")
    return path


def log_box(browser: Any) -> dict[str, Any] | None:
    """{"top", "height", "visible", "last" (its last line), "bottom" (scrolled to the
    end)} of the task page's first stdout box, None if there is none yet."""
    return browser.execute_script(LOG_BOX_STATE)


def line_number(text: str | None) -> int:
    """n of "line n" (0 for anything else)."""
    parts = (text or "").split()
    return int(parts[1]) if len(parts) == 2 and parts[0] == "line" and parts[1].isdigit() else 0


def box_past(browser: Any, number: int) -> dict[str, Any] | None:
    """log_box once its last line is "line m" with m > number, else None."""
    state = log_box(browser)
    return state if state and line_number(state["last"]) > number else None


def box_scrolled_up(browser: Any) -> dict[str, Any] | None:
    """log_box once it is off the bottom, else None."""
    state = log_box(browser)
    return state if state and not state["bottom"] else None


def newest_line(browser: Any) -> int:
    """n of the log box's last line "line n" (0 if none yet)."""
    state = log_box(browser)
    return line_number(state["last"]) if state else 0
