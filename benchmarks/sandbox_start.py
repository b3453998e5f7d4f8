"""Warm start: a trivial executor from the cached image vs bare bwrap on the same root.

Run: .venv/bin/python benchmarks/sandbox_start.py [--runs 50]
(needs scripts/setup/45-registry.sh for the first pull of busybox into a temporary cache).

Both sides are timed in this process, alternating, median of --runs:
- ours: what the worker adds per executor on a warm cache: `ensure_rootfs` (a cache lookup,
  no network), the sandbox argv (`worker/sandbox.py`: read-only binds of the image's
  top-level entries, namespaces, cap drop) and bwrap started as the sandbox user, running
  `true`;
- the reference: `bwrap --ro-bind ROOT / --unshare-pid --unshare-user true` as the same
  user (the least bwrap can do over that root; the image has no /dev or /proc to mount on).
Ratio > 1 means the sandbox costs more.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from funnel_hpc.worker import sandbox
from funnel_hpc.worker.drivers import switch_user
from funnel_hpc.worker.images import ensure_rootfs
from tests.server_helpers import TEST_REGISTRIES


def ours(cache: str, ids) -> float:
    started = time.perf_counter()
    root = ensure_rootfs("busybox", cache, TEST_REGISTRIES)
    argv = sandbox.bwrap_argv(str(root.rootfs), [], {"PATH": "/bin"}, None, ["true"], "host")
    subprocess.run(argv, check=True, cwd="/", **switch_user(ids))
    return time.perf_counter() - started


def bare(rootfs: str, ids) -> float:
    started = time.perf_counter()
    subprocess.run(["bwrap", "--ro-bind", rootfs, "/", "--unshare-pid", "--unshare-user",
                    "true"], check=True, cwd="/",
                   **switch_user(ids))
    return time.perf_counter() - started


def measure(runs: int) -> dict:
    """Median warm start of both sides over runs, alternating (module docstring)."""
    ids = sandbox.sandbox_ids({"sandbox_user": "nobody"})
    with tempfile.TemporaryDirectory() as cache:
        root = ensure_rootfs("busybox", cache, TEST_REGISTRIES)
        sandbox.prepare_host(ids, cache, [], [str(root.rootfs)])
        ours_times, bare_times = [], []
        for _ in range(runs):
            ours_times.append(ours(cache, ids))
            bare_times.append(bare(str(root.rootfs), ids))
    mine, reference = statistics.median(ours_times), statistics.median(bare_times)
    return {"runs": runs, "ours_s": mine, "bare_s": reference, "ratio": mine / reference}


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's `images` warm-start row and the raw figures."""
    r = measure(10 if quick else 50)
    row = {"figure": f"warm start of a trivial executor (median of {r['runs']})",
           "measured": f"{r['ours_s'] * 1000:.1f} ms",
           "reference": f"bare bwrap on the same root {r['bare_s'] * 1000:.1f} ms",
           "ratio": r["ratio"], "target": "<= 1.1x", "met": r["ratio"] <= 1.1}
    return [row], r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    r = measure(args.runs)
    print(f"warm start, median of {args.runs}: sandboxed executor {r['ours_s'] * 1000:.1f} ms, "
          f"bare bwrap {r['bare_s'] * 1000:.1f} ms, ratio {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
