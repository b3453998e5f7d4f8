"""`funnel worker run`: run one task, with no database and no server required."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from gateway import config as config_mod


@click.group()
def worker() -> None:
    """Run a task's worker."""


@worker.command("run")
@click.option("--task-file", type=click.Path(dir_okay=False, exists=True),
              help="The task JSON (as created, with its id).")
@click.option("--task-id", help="Fetch this task (FULL view) from --server.")
@click.option("--server", help="TES server URL: events are also sent there, cancels noticed.")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Directory holding one sub-directory per task (default: config work_dir).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False))
def run(task_file, task_id, server, workdir, config_path) -> None:
    """Stage inputs, run the executors, upload outputs; exit 0 only if COMPLETE."""
    from worker.runner import EXIT_CODES, run_task
    from worker.validation import TaskError, check_task_id

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s worker: %(message)s")
    try:
        config = config_mod.load(config_path)
    except config_mod.ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if bool(task_file) == bool(task_id):
        raise click.ClickException("give exactly one of --task-file or --task-id")
    if task_id:
        if not server:
            raise click.ClickException("--task-id needs --server")
        from gateway.client import ClientError, TesClient

        try:
            check_task_id(task_id)
            task = TesClient(server).get(task_id, "FULL")
        except TaskError as exc:
            raise click.ClickException(str(exc)) from None
        except ClientError as exc:
            raise click.ClickException(f"cannot fetch task {task_id}: {exc}") from None
    else:
        try:
            task = json.loads(Path(task_file).read_text())
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"{task_file}: not a task document: {exc}") from None
    if not isinstance(task, dict) or not task.get("id") or not task.get("executors"):
        raise click.ClickException("the task document needs an id and executors")
    if task_id and task["id"] != task_id:
        raise click.ClickException(f"the server sent task {task['id']!r} for {task_id!r}")
    base = Path(workdir or config["work_dir"]).resolve()
    try:
        check_task_id(task["id"])
    except TaskError as exc:
        raise click.ClickException(str(exc)) from None
    state = run_task(task, base, config, server)
    click.echo(state)
    sys.exit(EXIT_CODES.get(state, 2))
