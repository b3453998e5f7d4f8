"""Worker CPU for a task writing 100 MB of stdout, live logs off and on (issue 18.1).

Runs the worker in this process (bwrap over the test registry's busybox, as
tests/worker) and reports its own CPU seconds (user+sys of this process: the pumps,
the tails, the live-log thread; the executor and bwrap are children, not counted), the
median of --repeat runs per setting:

- ``legacy``: the tail as it was before live logs (no lock, no byte count),
- ``off``: worker.log_update_seconds 0,
- ``on``: worker.log_update_seconds 5 (and 0.2, to exaggerate the updates' cost).

Usage: .venv/bin/python benchmarks/worker_stdout.py [--mb 100] [--repeat 5]
``suite_rows(quick)`` gives benchmarks/suite.py's row: on (5 s) against off, interleaved.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from funnel_hpc.core.config import WorkerConfig
from funnel_hpc.core.config import load as load_config
from funnel_hpc.worker import livelogs, runner
from tests.server_helpers import worker_image_config


class LegacyTail(livelogs.Tail):
    """The tail before live logs: no lock, no count."""

    def write(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > 2 * self.limit:
            del self.buffer[: len(self.buffer) - self.limit]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_run(work: Path, config: WorkerConfig, megabytes: int, number: int) -> float:
    task = {"id": f"stdout{number}", "executors": [{
        "image": "busybox", "command": ["head", "-c", str(megabytes << 20), "/dev/zero"]}]}
    before = cpu_seconds()
    state = runner.run_task(task, work, config)
    spent = cpu_seconds() - before
    if state != "COMPLETE":
        raise SystemExit(f"the task ended {state}")
    return spent


def measure(megabytes: int, repeat: int, settings: dict[str, float]) -> dict[str, list[float]]:
    """Worker CPU seconds per setting (name -> log_update_seconds; "legacy": the old tail),
    the settings interleaved round by round so drift hits each alike."""
    results: dict[str, list[float]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        number = 0
        for _round in range(repeat):
            for name, seconds in settings.items():
                config = load_config(None, overrides={"worker": {
                    **worker_image_config(), "container_driver": "bwrap",
                    "log_update_seconds": seconds, "keep_workdir": "never"}}).for_worker()
                runner.Tail = LegacyTail if name == "legacy" else livelogs.Tail  # type: ignore[misc]
                number += 1
                results[name].append(one_run(Path(tmp), config, megabytes, number))
    runner.Tail = livelogs.Tail  # type: ignore[misc]
    return results


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's live-logs row (issue 18: on vs off, <= 1.05x) and the raw runs."""
    repeat = 7 if quick else 21  # one run's CPU varies 2-4x with the pipe's timing here
    runs = measure(100, repeat, {"off": 0.0, "on": 5.0})
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    ratio = on / off

    def spread(name: str) -> str:
        return f"{min(runs[name]):.3f}-{max(runs[name]):.3f}"

    row = {"figure": "a task writing 100 MB of stdout: worker CPU with live logs "
                     f"(log_update_seconds 5), median of {repeat} interleaved runs",
           "measured": f"{on:.3f} s (runs {spread('on')})",
           "reference": f"live logs off (0) {off:.3f} s (runs {spread('off')})",
           "ratio": ratio, "target": "<= 1.05x", "met": ratio <= 1.05}
    return [row], {"mb": 100, "repeat": repeat, "on_cpu_s": round(on, 4),
                   "off_cpu_s": round(off, 4), "ratio": round(ratio, 3), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    settings = {"legacy": 0.0, "off": 0.0, "on": 5.0, "on-0.2s": 0.2}
    results = measure(args.mb, args.repeat, settings)
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, median in medians.items():
        print(f"{name:8s} worker CPU {median:.3f} s (median of {args.repeat}; "
              f"{median / medians['legacy']:.3f} x legacy)")
    print(json.dumps({"mb": args.mb, "runs": results}))


if __name__ == "__main__":
    main()
