"""Warm start: a trivial executor from the cached image vs bare bwrap on the same root.

Run: .venv/bin/python benchmarks/sandbox_start.py [--runs 200]
(needs scripts/setup/45-registry.sh for the first pull of busybox into a temporary cache).

Both sides are timed in this process, in pairs whose order alternates (ABBA), median of
--runs; the runs are cut into BLOCKS consecutive blocks and the ratio of medians is given
for each, so that a burst of load on the machine shows as one odd block instead of
deciding the figure:
- ours: what the worker adds per executor on a warm cache: `ensure_rootfs` (a cache lookup,
  no network), the sandbox argv (`worker/sandbox.py`: read-only binds of the image's
  image bound whole, namespaces, cap drop, private /dev, /proc, /tmp, /run) and bwrap started
  as the sandbox user, running `true`;
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

BLOCKS = 5


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
    """Median warm start of both sides over runs, in ABBA pairs (module docstring)."""
    ids = sandbox.sandbox_ids({"sandbox_user": "nobody"})
    with tempfile.TemporaryDirectory() as cache:
        root = ensure_rootfs("busybox", cache, TEST_REGISTRIES)
        sandbox.prepare_host(ids, cache, [], [str(root.rootfs)])
        for _ in range(5):  # warm both (page cache, bwrap's pages)
            ours(cache, ids), bare(str(root.rootfs), ids)
        ours_times, bare_times = [], []
        for index in range(runs):
            if index % 2:
                bare_times.append(bare(str(root.rootfs), ids))
                ours_times.append(ours(cache, ids))
            else:
                ours_times.append(ours(cache, ids))
                bare_times.append(bare(str(root.rootfs), ids))
    size = max(1, runs // BLOCKS)
    blocks = sorted(statistics.median(ours_times[start:start + size])
                    / statistics.median(bare_times[start:start + size])
                    for start in range(0, runs - size + 1, size))
    mine, reference = statistics.median(ours_times), statistics.median(bare_times)
    return {"runs": runs, "ours_s": mine, "bare_s": reference, "ratio": mine / reference,
            "block_ratios": [round(ratio, 3) for ratio in blocks]}


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's `images` warm-start row and the raw figures."""
    r = measure(40 if quick else 200)
    blocks = r["block_ratios"]
    row = {"figure": f"warm start of a trivial executor (median of {r['runs']}, ABBA pairs)",
           "measured": f"{r['ours_s'] * 1000:.2f} ms (ratio per block of "
                       f"{r['runs'] // len(blocks)}: {blocks[0]:.2f}-{blocks[-1]:.2f}, "
                       f"median {statistics.median(blocks):.2f})",
           "reference": f"bare bwrap on the same root {r['bare_s'] * 1000:.2f} ms",
           "ratio": round(r["ratio"], 2), "target": "<= 1.1x", "met": r["ratio"] <= 1.1}
    return [row], r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    r = measure(args.runs)
    print(f"warm start, median of {args.runs}: sandboxed executor {r['ours_s'] * 1000:.2f} ms, "
          f"bare bwrap {r['bare_s'] * 1000:.2f} ms, ratio {r['ratio']:.3f}; ratio per block "
          f"of {args.runs // BLOCKS}: {', '.join(f'{ratio:.3f}' for ratio in r['block_ratios'])}")


if __name__ == "__main__":
    main()
