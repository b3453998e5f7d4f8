"""Warm start: a trivial executor from the cached image vs bwrap on the same root.

Run: .venv/bin/python benchmarks/sandbox_start.py [--runs 200]
(needs scripts/setup/45-registry.sh for the first pull of busybox into a temporary cache).

The three sides are timed in this process, in rounds whose order rotates, median of
--runs; the runs are cut into BLOCKS consecutive blocks and the ratio of medians is given
for each, so that a burst of load on the machine shows as one odd block instead of
deciding the figure:
- ours: a warm start as the worker makes it: `ensure_rootfs` (a cache lookup, no network),
  the sandbox argv (`worker/sandbox.py`: read-only binds of the image's entries over a
  tmpfs root, namespaces, cap drop, private /dev, /proc, /tmp, /run), the cached seccomp
  filter (`--seccomp FD`) and bwrap started as the sandbox user, running `true`, inside the
  task's cgroup (worker/cgroups.py, root only: forked there by the task's launcher,
  worker/launcher.py, then the kill of what is left, as each executor has it; the group
  and its launcher are made once per task and timed apart: `group_s`, and `first_s` a
  task's first executor right after them);
- the same bwrap: that argv, computed once beforehand, run as the same user without the
  filter: what the worker adds to bwrap itself (target 1.15 with seccomp, the task's uid
  and its cgroup, issue #25);
- bare bwrap: `bwrap --ro-bind ROOT / --unshare-pid --unshare-user true` as the same user
  (the least bwrap can do over that root): ours against it adds what the sandbox's private
  /dev, /proc and tmpfs mounts cost in bwrap (context).
Root only, two more sides with a `worker.sandbox_uids` slot (its own uid, ids 0-65535
mapped by the worker while bwrap waits, worker/identity.py), started as ours is:
- slot: the image's entries bound read-only (worker.writable_root: off);
- cow: a copy-on-write root (worker/overlay_root.py: the executor's directories taken from
  the task's spares, the id-mapped image and the overlay mounted in the sandbox's namespace
  by the worker's mounting thread, removed after in the background and the next spare
  made there, as the worker does), the
  writable_root's cost against `slot` and against the same bwrap argv; `probe_s` is the
  check auto makes once per task and image.
Ratio > 1 means the sandbox costs more.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from funnel_hpc.worker import cgroups, overlay_root, sandbox, seccomp
from funnel_hpc.worker.drivers import switch_user
from funnel_hpc.worker.identity import BLOCK, Identity, NamespaceMap
from funnel_hpc.worker.images import ensure_rootfs
from tests.server_helpers import TEST_REGISTRIES

BLOCKS = 5
SLOT_UID = 1_800_000_000  # a slot no account and no test uses
# what a task without resources gets on the local backend (worker.max_pids), plus memory
LIMITS = cgroups.Limits(memory_bytes=1 << 30, pids_max=4096)


def ours(cache: str, ids, group: cgroups.Group | None) -> float:
    started = time.perf_counter()
    if group is not None:
        group.warm_up()  # as the worker does before building an executor's argv
    root = ensure_rootfs("busybox", cache, TEST_REGISTRIES)
    argv = sandbox.bwrap_argv(str(root.rootfs), [], {"PATH": "/bin"}, None, ["true"], "host")
    fd = seccomp.open_filter(cache, "default")  # the cached filter, as drivers.py passes it
    argv[1:1] = ["--seccomp", str(fd)]
    try:
        if group is None:  # not root: no cgroup
            subprocess.run(argv, check=True, cwd="/", pass_fds=(fd,))
        else:
            assert group.start(argv, None, cwd="/", pass_fds=(fd,),
                               **switch_user(ids)).wait() == 0
            group.end_leftovers()
    finally:
        os.close(fd)
    return time.perf_counter() - started


REMOVALS = overlay_root.Removals()


def slotted(cache: str, identity: Identity, group: cgroups.Group,
            spares: overlay_root.Spares, cow: bool) -> float:
    """A warm start as a slot: ids mapped while bwrap waits; with cow, its root made,
    mounted in its namespace and removed after, as worker/drivers.py and executors.py do."""
    started = time.perf_counter()
    group.warm_up()
    root = ensure_rootfs("busybox", cache, TEST_REGISTRIES)
    rootfs = str(root.rootfs)
    overlay = spares.take(rootfs) if cow else None
    userns = NamespaceMap(identity, overlay)
    argv = sandbox.bwrap_argv(rootfs, [], {"PATH": "/bin"}, None, ["true"], "host",
                              userns=userns.argv(), root=overlay.merged if overlay else None)
    fd = seccomp.open_filter(cache, "default")
    argv[1:1] = ["--seccomp", str(fd)]
    try:
        proc = group.start(argv, None, cwd="/", pass_fds=(fd, *userns.pass_fds),
                           **switch_user(identity.ids))
    finally:
        os.close(fd)
    userns.started(proc)
    assert proc.wait() == 0
    group.end_leftovers()
    if overlay is not None:  # in the background, as executors.py has it
        REMOVALS.add(overlay)
    return time.perf_counter() - started


def probe_once(cache: str, identity: Identity, task_dir: str) -> float:
    started = time.perf_counter()
    rootfs = str(ensure_rootfs("busybox", cache, TEST_REGISTRIES).rootfs)
    overlay_root.probe(task_dir, rootfs, identity.ids)
    return time.perf_counter() - started


def group_once() -> float:
    """A task's cgroup made (with its reaper) and removed."""
    started = time.perf_counter()
    cgroups.create("bench-task", LIMITS).remove()
    return time.perf_counter() - started


def first_once(cache: str, ids) -> float:
    """A task's first executor right after its group is made (nothing staged meanwhile
    to hide the launcher's start: the worst case)."""
    group = cgroups.create("bench-first", LIMITS)
    try:
        return ours(cache, ids, group)
    finally:
        group.remove()


def bare(rootfs: str, ids) -> float:
    return same(["bwrap", "--ro-bind", rootfs, "/", "--unshare-pid", "--unshare-user", "true"],
                ids)


def same(argv: list[str], ids) -> float:
    started = time.perf_counter()
    subprocess.run(argv, check=True, cwd="/", **switch_user(ids))
    return time.perf_counter() - started


def measure(runs: int) -> dict:
    """Median warm start of the three sides over runs, in rotating order (module
    docstring)."""
    ids = sandbox.sandbox_ids("nobody")
    with tempfile.TemporaryDirectory() as cache:
        root = ensure_rootfs("busybox", cache, TEST_REGISTRIES)
        rootfs = str(root.rootfs)
        sandbox.prepare_host(ids, cache, [], [rootfs])
        argv = sandbox.bwrap_argv(rootfs, [], {"PATH": "/bin"}, None, ["true"], "host")
        group = cgroups.create("bench", LIMITS) if ids is not None else None
        while group is not None and group.launcher_pid() is None:
            time.sleep(0.001)  # the launcher once per task (first_s times a start before)
        sides = {"ours": lambda: ours(cache, ids, group), "same": lambda: same(argv, ids),
                 "bare": lambda: bare(rootfs, ids)}
        slot = Identity(SLOT_UID, SLOT_UID, BLOCK)
        task_dir = os.path.join(cache, "task")
        os.mkdir(task_dir, 0o700)
        if group is not None:
            sandbox.prepare_host(slot.ids, cache, [], [rootfs])
            spares = overlay_root.Spares(task_dir, slot.ids)  # the task's, as drivers.py has
            sides["slot"] = lambda: slotted(cache, slot, group, spares, cow=False)
            sides["cow"] = lambda: slotted(cache, slot, group, spares, cow=True)
        for _ in range(5):  # warm every side (page cache, bwrap's pages)
            for run in sides.values():
                run()
        times: dict[str, list[float]] = {name: [] for name in sides}
        order = list(sides)
        for index in range(runs):
            turn = index % len(order)
            for name in order[turn:] + order[:turn]:
                times[name].append(sides[name]())
        assert REMOVALS.wait() == []
        if group is not None:
            assert spares.drop() == []
        probe_times = [probe_once(cache, slot, task_dir) for _ in range(runs // 4)] \
            if group is not None else [0.0]
        if group is not None:
            group.remove()
        group_times = [group_once() for _ in range(runs // 4)] if ids is not None else [0.0]
        first_times = [first_once(cache, ids) for _ in range(runs // 4)] \
            if ids is not None else [0.0]
    size = max(1, runs // BLOCKS)

    def blocks(reference: str, side: str = "ours") -> list[float]:
        return sorted(round(statistics.median(times[side][start:start + size])
                            / statistics.median(times[reference][start:start + size]), 3)
                      for start in range(0, runs - size + 1, size))

    medians = {name: statistics.median(values) for name, values in times.items()}
    slots = {} if "cow" not in times else {
        "slot_s": medians["slot"], "cow_s": medians["cow"],
        "cow_ratio": medians["cow"] / medians["same"],
        "cow_ratio_slot": medians["cow"] / medians["slot"],
        "slot_ratio": medians["slot"] / medians["same"],
        "probe_s": statistics.median(probe_times), "cow_block_ratios": blocks("same", "cow")}
    return {**slots, "runs": runs, "ours_s": medians["ours"], "same_s": medians["same"],
            "bare_s": medians["bare"], "ratio": medians["ours"] / medians["same"],
            "group_s": statistics.median(group_times),
            "first_s": statistics.median(first_times),
            "ratio_bare": medians["ours"] / medians["bare"],
            "block_ratios": blocks("same"), "block_ratios_bare": blocks("bare")}


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's `images` warm-start rows and the raw figures."""
    r = measure(40 if quick else 200)

    def spread(blocks: list[float]) -> str:
        return (f"ratio per block of {r['runs'] // len(blocks)}: {blocks[0]:.2f}-"
                f"{blocks[-1]:.2f}, median {statistics.median(blocks):.2f}")
    figure = f"warm start of a trivial executor (median of {r['runs']}, rotating order)"
    return [{"figure": f"{figure}: what the worker adds to bwrap",
             "measured": f"{r['ours_s'] * 1000:.2f} ms ({spread(r['block_ratios'])})",
             "reference": f"the same bwrap argv run directly {r['same_s'] * 1000:.2f} ms",
             "ratio": round(r["ratio"], 2), "target": "<= 1.15x", "met": r["ratio"] <= 1.15},
            {"figure": f"{figure}: the whole sandbox",
             "measured": f"{r['ours_s'] * 1000:.2f} ms ({spread(r['block_ratios_bare'])})",
             "reference": f"bare bwrap on the same root {r['bare_s'] * 1000:.2f} ms",
             "ratio": round(r["ratio_bare"], 2),
             "target": "context (private /dev, /proc, tmpfs mounts)", "met": None},
            *_cow_rows(r, figure, spread)], r


def _cow_rows(r: dict, figure: str, spread) -> list[dict]:  # type: ignore[no-untyped-def]
    """The slot and copy-on-write rows (root only)."""
    if "cow_s" not in r:
        return []
    return [{"figure": f"{figure}: a slot with a copy-on-write root (worker.writable_root)",
             "measured": f"{r['cow_s'] * 1000:.2f} ms ({spread(r['cow_block_ratios'])}); "
                         f"read-only root {r['slot_s'] * 1000:.2f} ms; once per task and "
                         f"image, its probe {r['probe_s'] * 1000:.2f} ms",
             "reference": f"the same bwrap argv run directly {r['same_s'] * 1000:.2f} ms",
             "ratio": round(r["cow_ratio"], 2), "target": "<= 1.15x",
             "met": r["cow_ratio"] <= 1.15}]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    r = measure(args.runs)
    print(f"warm start, median of {args.runs}: sandboxed executor {r['ours_s'] * 1000:.2f} ms, "
          f"the same bwrap argv {r['same_s'] * 1000:.2f} ms (ratio {r['ratio']:.3f}), bare "
          f"bwrap {r['bare_s'] * 1000:.2f} ms (ratio {r['ratio_bare']:.3f}); the task's cgroup "
          f"made and removed once per task {r['group_s'] * 1000:.2f} ms, a task's first "
          f"executor right after it {r['first_s'] * 1000:.2f} ms; ratio per block of "
          f"{args.runs // BLOCKS}: {', '.join(f'{ratio:.3f}' for ratio in r['block_ratios'])} "
          f"(median {statistics.median(r['block_ratios']):.3f})")
    if "cow_s" in r:
        print(f"as a slot: read-only root {r['slot_s'] * 1000:.2f} ms (ratio "
              f"{r['slot_ratio']:.3f}), copy-on-write root {r['cow_s'] * 1000:.2f} ms (ratio "
              f"{r['cow_ratio']:.3f}; {r['cow_ratio_slot']:.3f} x the read-only slot); "
              f"ratio per block: {', '.join(f'{x:.3f}' for x in r['cow_block_ratios'])}; "
              f"the probe once per task and image {r['probe_s'] * 1000:.2f} ms")


if __name__ == "__main__":
    main()
