"""Wrapper the local backend starts around each worker:

    python -m backends.local_runner TASK_DIR -- WORKER ARGV...

It records its pid and start time (TASK_DIR/local.pid), runs the worker, then
writes the worker's exit status to TASK_DIR/local.exit (atomically: a number,
negative for a signal), so a gateway restarted meanwhile still learns how it
ended. A SIGTERM to the process group reaches the worker; the wrapper ignores
it and waits for the worker, so the exit status is still recorded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from backends.local import EXIT, write_atomic, write_pid_record


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m backends.local_runner TASK_DIR -- ARGV...", file=sys.stderr)
        return 2
    task_dir = Path(argv[0])
    # record ourselves first: a gateway killed right after starting us still finds us
    write_pid_record(task_dir, os.getpid())
    # a no-op handler (not SIG_IGN, which the worker would inherit): the worker gets the
    # group's SIGTERM and ends; we wait for it and record how it ended
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    try:
        code = subprocess.call(argv[2:])
    except OSError as exc:
        print(f"local backend: cannot start the worker: {exc}", file=sys.stderr)
        code = 127
    write_atomic(task_dir / EXIT, str(code))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
