"""The `funnel` command line: server, reconciler, and TES task commands."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import click

from funnel_hpc.core import __version__
from funnel_hpc.core import config as config_mod
from funnel_hpc.core.client import DEFAULT_SERVER, ClientError, TesClient
from funnel_hpc.core.states import TERMINAL
from funnel_hpc.worker.cli import worker as worker_group

VIEWS = click.Choice(["MINIMAL", "BASIC", "FULL"], case_sensitive=False)
server_option = click.option("--server", envvar="FUNNEL_SERVER", default=DEFAULT_SERVER,
                             show_default=True, help="TES server URL (or FUNNEL_SERVER).")


def fail(message: str) -> None:
    """Stop with one line on stderr and exit status 1."""
    raise click.ClickException(message)


def load_config(path: str | None, overrides: dict | None = None) -> dict:
    try:
        return config_mod.load(path, overrides=overrides)
    except config_mod.ConfigError as exc:
        fail(str(exc))
        raise  # unreachable


def emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


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
    from funnel_hpc.gateway.server import run_server

    overrides: dict = {}
    if backend:
        overrides.setdefault("backend", {})["name"] = backend
    if host:
        overrides.setdefault("server", {})["host"] = host
    if port:
        overrides.setdefault("server", {})["http_port"] = port
    config = load_config(config_path, overrides)
    _logging()
    try:
        run_server(config, reconcile=not no_reconciler)
    except (ValueError, OSError) as exc:
        fail(str(exc))


@main.command()
@click.option("--config", "config_path", envvar="FUNNEL_CONFIG", type=click.Path(dir_okay=False))
def reconcile(config_path) -> None:
    """Run the reconciler alone (for a server started with --no-reconciler)."""
    from funnel_hpc.gateway.server import run_reconciler

    config = load_config(config_path)
    _logging()
    try:
        run_reconciler(config)
    except (ValueError, OSError) as exc:
        fail(str(exc))


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.group()
def auth() -> None:
    """Authentication helpers."""


@auth.command("hash-password")
@click.password_option()
def hash_password(password) -> None:
    """Print a password hash for auth.users or an htpasswd-style file."""
    from werkzeug.security import generate_password_hash

    click.echo(generate_password_hash(password))


# ---- tasks ----

@main.group()
def task() -> None:
    """Create, inspect, list, cancel and wait for tasks."""


def _client(server_url: str) -> TesClient:
    return TesClient(server_url)


@task.command("create")
@click.argument("file", type=click.File("r"))
@server_option
def task_create(file, server) -> None:
    """Create a task from a TES JSON FILE (- for stdin); print its id."""
    try:
        document = json.load(file)
    except ValueError as exc:
        fail(f"{file.name}: not valid JSON: {exc}")
    try:
        click.echo(_client(server).create(document))
    except ClientError as exc:
        fail(str(exc))


@task.command("get")
@click.argument("task_id")
@click.option("--view", type=VIEWS, default="FULL", show_default=True)
@server_option
def task_get(task_id, view, server) -> None:
    """Print one task as JSON."""
    try:
        emit(_client(server).get(task_id, view.upper()))
    except ClientError as exc:
        fail(str(exc))


def _parse_tags(tags: tuple[str, ...]) -> tuple[list[str], list[str]]:
    keys, values = [], []
    for item in tags:
        key, _, value = item.partition("=")
        if not key:
            fail(f"--tag {item!r}: expected KEY=VALUE or KEY")
        keys.append(key)
        values.append(value)
    return keys, values


@task.command("list")
@click.option("--state", help="Only tasks in this state.")
@click.option("--name-prefix", help="Only tasks whose name starts with this.")
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE (or KEY: any value); repeatable.")
@click.option("--view", type=VIEWS, default="MINIMAL", show_default=True)
@click.option("--page-size", type=int)
@click.option("--all", "all_pages", is_flag=True, help="Follow next_page_token to the end.")
@server_option
def task_list(state, name_prefix, tags, view, page_size, all_pages, server) -> None:
    """List tasks as JSON ({"tasks": [...], "next_page_token": ...})."""
    keys, values = _parse_tags(tags)
    params = dict(state=state, name_prefix=name_prefix, tag_key=keys, tag_value=values,
                  view=view.upper(), page_size=page_size)
    client = _client(server)
    try:
        if all_pages:
            emit({"tasks": list(client.list_all(**params))})
        else:
            emit(client.list_page(**params))
    except ClientError as exc:
        fail(str(exc))


@task.command("cancel")
@click.argument("task_ids", nargs=-1, required=True)
@server_option
def task_cancel(task_ids, server) -> None:
    """Cancel tasks (a task that already ended is left as it is)."""
    client = _client(server)
    errors = 0
    for task_id in task_ids:
        try:
            client.cancel(task_id)
            click.echo(f"{task_id} cancel requested")
        except ClientError as exc:
            click.echo(f"Error: {task_id}: {exc}", err=True)
            errors += 1
    if errors:
        sys.exit(1)


@task.command("wait")
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between polls.")
@click.option("--timeout", type=float, default=0, help="Give up after this many seconds (0: never).")
@server_option
def task_wait(task_ids, interval, timeout, server) -> None:
    """Wait until tasks end; exit 1 if any ended other than COMPLETE."""
    client = _client(server)
    terminal = {s.value for s in TERMINAL}
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout if timeout > 0 else None
    shown = ""
    while True:
        for task_id in task_ids:
            if states.get(task_id) in terminal:
                continue
            try:
                states[task_id] = client.get(task_id)["state"]
            except ClientError as exc:
                fail(f"{task_id}: {exc}")
        done = sum(1 for s in states.values() if s in terminal)
        line = f"{done}/{len(task_ids)} done; " + ", ".join(
            f"{s}={n}" for s, n in sorted(_count(states.values()).items()))
        if line != shown:
            click.echo(line, err=True)
            shown = line
        if done == len(task_ids):
            break
        if deadline is not None and time.monotonic() > deadline:
            fail(f"timed out after {timeout:g}s with {len(task_ids) - done} task(s) not done")
        time.sleep(interval)
    for task_id in task_ids:
        click.echo(f"{task_id} {states[task_id]}")
    if any(states[t] != "COMPLETE" for t in task_ids):
        sys.exit(1)


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


main.add_command(worker_group)

if __name__ == "__main__":
    main()
