"""The worker's command line, without click: `python -m funnel_hpc.worker run ...`.

`funnel worker run` (worker/cli.py, click) and `python -m funnel_hpc.worker run` take the same
options and end in :func:`run`. The reconciler starts workers with the second: a
scheduler starts one worker per task, and this entry point imports only what running
a task needs (no click, no HTTP client unless --server), which keeps each start cheap.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from typing import Any

# What a launcher that forks workers from a warm process (the local backend's) imports
# once beforehand: every forked worker then starts with them loaded.
PRELOAD = ("requests", "funnel_hpc.core.config", "funnel_hpc.worker.runner")


class UsageError(Exception):
    """A one-line reason the worker cannot start; exit code 1."""


def run(task_file: str | None, task_id: str | None, server: str | None,
        workdir: str | None, config_path: str | None) -> int:
    """Run one task; return the process exit code (0 only if COMPLETE)."""
    from funnel_hpc.core import config as config_mod
    from funnel_hpc.worker.runner import EXIT_CODES, run_task
    from funnel_hpc.worker.validation import TaskError, check_task_id

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s worker: %(message)s")
    try:
        config = config_mod.load_worker(config_path)
    except config_mod.ConfigError as exc:
        raise UsageError(str(exc)) from None
    if bool(task_file) == bool(task_id):
        raise UsageError("give exactly one of --task-file or --task-id")
    if task_id:
        if not server:
            raise UsageError("--task-id needs --server")
        from funnel_hpc.core.worker_tokens import read_token

        try:
            check_task_id(task_id)
        except TaskError as exc:
            raise UsageError(str(exc)) from None
        token = read_token(Path(workdir or config.work_dir) / task_id)
        task = fetch_task(server, task_id, token, config.worker.server_wait_seconds)
    else:
        assert task_file  # exactly one of the two, checked above
        try:
            task = json.loads(Path(task_file).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{task_file}: not a task document: {exc}") from None
    if not isinstance(task, dict) or not task.get("id") or not task.get("executors"):
        raise UsageError("the task document needs an id and executors")
    if task_id and task["id"] != task_id:
        raise UsageError(f"the server sent task {task['id']!r} for {task_id!r}")
    base = Path(workdir or config.work_dir).resolve()
    try:
        check_task_id(task["id"])
    except TaskError as exc:
        raise UsageError(str(exc)) from None
    state = run_task(task, base, config, server, remote=bool(task_id))
    print(state, flush=True)
    return EXIT_CODES.get(state, 2)


def fetch_task(server: str, task_id: str, token: str | None, wait_seconds: float) -> dict[str, Any]:
    """The task (FULL view) from the server. While the server cannot be reached or answers
    5xx/429 (a gateway restarting), try again with growing pauses for up to wait_seconds."""
    from funnel_hpc.core.client import ClientError, TesClient

    client = TesClient(server, token=token)
    deadline = time.monotonic() + wait_seconds
    pause = 0.5
    while True:
        try:
            return client.get(task_id, "FULL")
        except ClientError as exc:
            left = deadline - time.monotonic()
            if not exc.transient or left <= 0:
                raise UsageError(f"cannot fetch task {task_id}: {exc}") from None
            logging.getLogger("worker").warning(
                "cannot fetch task %s yet (%s); trying again for %.0f s more", task_id, exc, left)
            time.sleep(min(pause, left))
            pause = min(pause * 2, 10.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m funnel_hpc.worker",
                                     description="Run one task's worker (as `funnel worker run`).")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("run", help="Stage inputs, run the executors, upload outputs.")
    p.add_argument("--task-file", help="The task JSON (as created, with its id).")
    p.add_argument("--task-id", help="Fetch this task (FULL view) from --server.")
    p.add_argument("--server", help="TES server URL: events are also sent there.")
    p.add_argument("--workdir", help="Directory holding one sub-directory per task.")
    p.add_argument("--config", dest="config_path")
    args = parser.parse_args(argv)
    if args.task_file and not Path(args.task_file).is_file():
        parser.error(f"--task-file: {args.task_file} is not a file")
    try:
        return run(args.task_file, args.task_id, args.server, args.workdir, args.config_path)
    except UsageError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
