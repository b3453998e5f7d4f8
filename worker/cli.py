"""`funnel worker run`: run one task, with no database and no server required."""

from __future__ import annotations

import sys

import click


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
def run(task_file: str | None, task_id: str | None, server: str | None, workdir: str | None,
        config_path: str | None) -> None:
    """Stage inputs, run the executors, upload outputs; exit 0 only if COMPLETE."""
    from funnel_hpc.worker.main import UsageError
    from funnel_hpc.worker.main import run as run_worker

    try:
        code = run_worker(task_file, task_id, server, workdir, config_path)
    except UsageError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)
