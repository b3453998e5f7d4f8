"""The `funnel` command line: server and reconciler here; tasks (task.py), `run`
(run.py), and the admin commands `config`, `render`, `admin` (admin.py)."""

from __future__ import annotations

import click

from funnel_hpc.core import __version__
from funnel_hpc.core.config import Config
from funnel_hpc.gateway.cli.admin import admin as admin_group
from funnel_hpc.gateway.cli.admin import config as config_group
from funnel_hpc.gateway.cli.admin import render as render_command
from funnel_hpc.gateway.cli.common import fail, load_config
from funnel_hpc.gateway.cli.run import run as run_command
from funnel_hpc.gateway.cli.task import task as task_group
from funnel_hpc.worker.cli import worker as worker_group


@click.group()
def main() -> None:
    """funnel-hpc: a GA4GH Task Execution Service gateway for HPC and clouds."""


@main.command()
def version() -> None:
    """Print the version."""
    click.echo(f"funnel-hpc {__version__}")


# ---- server ----

@main.group()
def server() -> None:
    """Run the TES server."""


@server.command("run")
@click.option("--config", "config_path", envvar="FUNNEL_CONFIG", type=click.Path(dir_okay=False),
              help="YAML config merged over conf/default.yaml.")
@click.option("--backend", help="Compute backend (overrides backend.name).")
@click.option("--host", help="Listen address (overrides server.host).")
@click.option("--port", type=int, help="HTTP port (overrides server.http_port).")
@click.option("--no-reconciler", is_flag=True, help="Serve the API only; run `funnel reconcile`.")
def server_run(config_path, backend, host, port, no_reconciler) -> None:
    """Serve the TES API and drive tasks through the backend."""
    from funnel_hpc.gateway.cli.server import run_server

    overrides: dict = {}
    if backend:
        overrides.setdefault("backend", {})["name"] = backend
    if host:
        overrides.setdefault("server", {})["host"] = host
    if port:
        overrides.setdefault("server", {})["http_port"] = port
    config = load_config(config_path, overrides)
    _logging(config)
    try:
        run_server(config, reconcile=not no_reconciler)
    except (ValueError, OSError) as exc:
        fail(str(exc))


@main.command()
@click.option("--config", "config_path", envvar="FUNNEL_CONFIG", type=click.Path(dir_okay=False))
@click.option("--backend", "instance", help="Only this backend instance's reconciler "
              "(default: every instance of `backends:`).")
def reconcile(config_path, instance) -> None:
    """Run the reconcilers alone (for a server started with --no-reconciler)."""
    from funnel_hpc.gateway.cli.server import run_reconciler

    config = load_config(config_path)
    _logging(config)
    try:
        run_reconciler(config, instance)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    except KeyError as exc:
        fail(str(exc.args[0]))


def _logging(config: Config) -> None:
    """The `logging` section: level, text|json, stderr or a file."""
    from funnel_hpc.gateway.ops.logs import configure_logging

    try:
        configure_logging(config.logging)
    except (ValueError, OSError) as exc:
        fail(str(exc))


@main.group()
def auth() -> None:
    """Authentication helpers."""


@auth.command("hash-password")
@click.password_option()
def hash_password(password) -> None:
    """Print a password hash for auth.users or an htpasswd-style file."""
    from werkzeug.security import generate_password_hash

    click.echo(generate_password_hash(password))


for command in (task_group, run_command, config_group, render_command, admin_group,
                worker_group):
    main.add_command(command)

if __name__ == "__main__":
    main()
