"""A stand-in for `funnel worker run` (worker.command) that writes hostile event lines.

Called with the worker's arguments (--task-file <task dir>/task.json ...): for a task
named "hostile" it first writes the lines of HOSTILE_LINES (a bogus state with a huge
seq, out-of-range executor indexes, JSON nested too deep, a non-event), then, for
every task, a well-formed run: INITIALIZING, RUNNING, executor 0 exiting 0, COMPLETE.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HOSTILE_LINES = [
    b'{"seq":100000,"type":"state","state":"BOGUS"}',
    b'{"seq":1,"type":"executor_end","index":10000000,"exit_code":0}',
    b'{"seq":1,"type":"executor_end","index":-5,"exit_code":0}',
    b'{"seq":"1","type":"state","state":"RUNNING"}',
    b"[" * 100_000,
    b"not json at all",
]


def main(argv: list[str]) -> int:
    task_file = Path(argv[argv.index("--task-file") + 1])
    task = json.loads(task_file.read_text())
    lines = list(HOSTILE_LINES) if task.get("name") == "hostile" else []
    good: list[dict[str, object]] = [
        {"type": "state", "state": "INITIALIZING"}, {"type": "state", "state": "RUNNING"},
        {"type": "executor_start", "index": 0, "start_time": "2026-01-01T00:00:00Z"},
        {"type": "executor_end", "index": 0, "end_time": "2026-01-01T00:00:01Z",
         "exit_code": 0, "stdout": "", "stderr": ""},
        {"type": "state", "state": "COMPLETE"}]
    lines += [json.dumps({"seq": seq, **event}).encode() for seq, event in enumerate(good, 1)]
    with open(task_file.parent / "events.jsonl", "ab") as log:
        log.write(b"\n".join(lines) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
