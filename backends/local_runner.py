"""Wrapper the local backend starts around each worker:

    python -m backends.local_runner TASK_DIR -- WORKER ARGV...

It runs the worker, then writes its exit status to TASK_DIR/local.exit
(atomically), so a gateway restarted meanwhile still learns how it ended.
SIGTERM to the process group reaches the worker; the wrapper waits for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m backends.local_runner TASK_DIR -- ARGV...", file=sys.stderr)
        return 2
    task_dir = Path(argv[0])
    # record ourselves first: a gateway killed right after starting us still finds us
    from backends.local import write_pid_record
    write_pid_record(task_dir, os.getpid())
    signal.signal(signal.SIGTERM, lambda *_: None)  # the worker gets it too; we wait for it
    signal.signal(signal.SIGINT, lambda *_: None)
    try:
        code = subprocess.call(argv[2:])
    except OSError as exc:
        print(f"cannot start worker: {exc}", file=sys.stderr)
        code = 127
    tmp = task_dir / "local.exit.tmp"
    tmp.write_text(str(code))
    os.replace(tmp, task_dir / "local.exit")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
