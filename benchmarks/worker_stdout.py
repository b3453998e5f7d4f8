"""Worker CPU for a task writing 100 MB of stdout, live logs off and on (issue 18.1).

Runs the worker in this process (bwrap over the test registry's busybox, as
tests/worker) and reports its own CPU seconds (user+sys of this process: the pumps,
the tails, the live-log thread; the executor and bwrap are children, not counted), the
median of --repeat runs per setting:

- ``legacy``: the tail as it was before live logs (no lock, no byte count),
- ``off``: worker.log_update_seconds 0,
- ``on``: worker.log_update_seconds 5 (and 0.2, to exaggerate the updates' cost).

Usage: .venv/bin/python benchmarks/worker_stdout.py [--mb 100] [--repeat 5]
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


def one_run(work: Path, config: dict, megabytes: int, number: int) -> float:
    task = {"id": f"stdout{number}", "executors": [{
        "image": "busybox", "command": ["head", "-c", str(megabytes << 20), "/dev/zero"]}]}
    before = cpu_seconds()
    state = runner.run_task(task, work, config)
    spent = cpu_seconds() - before
    if state != "COMPLETE":
        raise SystemExit(f"the task ended {state}")
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    settings = {"legacy": 0.0, "off": 0.0, "on": 5.0, "on-0.2s": 0.2}
    results: dict[str, list[float]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        number = 0
        for _round in range(args.repeat):  # interleaved: drift hits every setting alike
            for name, seconds in settings.items():
                config = load_config(None)
                config["worker"].update(worker_image_config(), container_driver="bwrap",
                                        log_update_seconds=seconds, keep_workdir="never")
                runner.Tail = LegacyTail if name == "legacy" else livelogs.Tail  # type: ignore[misc]
                number += 1
                results[name].append(one_run(Path(tmp), config, args.mb, number))
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, median in medians.items():
        print(f"{name:8s} worker CPU {median:.3f} s (median of {args.repeat}; "
              f"{median / medians['legacy']:.3f} x legacy)")
    print(json.dumps({"mb": args.mb, "runs": results}))


if __name__ == "__main__":
    main()
