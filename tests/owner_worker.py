"""A stand-in for `funnel worker run` (worker.command) for jobs run as their owners.

Standard library only: it runs as the task's owner under the system Python. For a task
named "talker" it writes a worker's first events (INITIALIZING, metadata with its host
and pid, RUNNING, executor 0 started with stdout "secret of <owner>") to its task dir's
events.jsonl; any other task writes nothing. Then it sleeps until its job is canceled
(at most SLEEP_SECONDS). `--help` prints this and exits 0, as the real worker does.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import sys
import time
from pathlib import Path

SLEEP_SECONDS = 1800


def main(argv: list[str]) -> int:
    if "--help" in argv:  # the gateway's start check runs the command as an unprivileged user
        print(__doc__)
        return 0
    task_file = Path(argv[argv.index("--task-file") + 1])
    task = json.loads(task_file.read_text())
    if task.get("name") == "talker":
        owner = pwd.getpwuid(os.getuid()).pw_name
        events: list[dict[str, object]] = [
            {"type": "state", "state": "INITIALIZING"},
            {"type": "metadata", "metadata": {"hostname": socket.gethostname(),
                                              "pid": str(os.getpid())}},
            {"type": "state", "state": "RUNNING"},
            {"type": "executor_start", "index": 0, "start_time": "2026-01-01T00:00:00Z"},
            {"type": "executor_log", "index": 0, "limit": 1000,
             "stdout": f"secret of {owner}\n"}]
        with open(task_file.parent / "events.jsonl", "a") as log:
            for seq, event in enumerate(events, 1):
                log.write(json.dumps({"seq": seq, "task_id": task["id"], **event}) + "\n")
    time.sleep(SLEEP_SECONDS)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
