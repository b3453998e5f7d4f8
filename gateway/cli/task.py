"""`funnel task ...`: create, get, list, cancel and wait for tasks over the TES HTTP API.

`get`, `cancel` and `wait` take several ids (one request each); `list` shows one page
(or every page with --all) as JSON, YAML or a table (id, name, state, created, duration).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from funnel_hpc.core.client import ClientError
from funnel_hpc.gateway.cli.common import (
    OUTPUTS,
    TERMINAL_STATES,
    client,
    emit,
    fail,
    server_option,
    table,
    wait_tasks,
)

VIEWS = click.Choice(["MINIMAL", "BASIC", "FULL"], case_sensitive=False)
TABLE_HEADERS = ("ID", "NAME", "STATE", "CREATED", "DURATION")


@click.group()
def task() -> None:
    """Create, inspect, list, cancel and wait for tasks.

    \b
    Credentials for a server with auth on come from the environment, never the
    command line: FUNNEL_TOKEN (bearer), or FUNNEL_USER and FUNNEL_PASSWORD (basic)."""


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
        click.echo(client(server).create(document))
    except ClientError as exc:
        fail(str(exc))


@task.command("get")
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--view", type=VIEWS, default="FULL", show_default=True)
@click.option("-o", "--output", type=click.Choice(["json", "yaml"]), default="json",
              show_default=True)
@server_option
def task_get(task_ids, view, output, server) -> None:
    """Print tasks: one id, its task; several, a list of them. A task that cannot be had
    is named on stderr and the exit status is 1."""
    api = client(server)
    found, errors = [], 0
    for task_id in task_ids:
        try:
            found.append(api.get(task_id, view.upper()))
        except ClientError as exc:
            click.echo(f"Error: {task_id}: {exc}", err=True)
            errors += 1
    if found:
        emit(found[0] if len(task_ids) == 1 else found, output)
    if errors:
        sys.exit(1)


def _parse_tags(tags: tuple[str, ...]) -> tuple[list[str], list[str]]:
    keys, values = [], []
    for item in tags:
        key, _, value = item.partition("=")
        if not key:
            fail(f"--tag {item!r}: expected KEY=VALUE or KEY")
        keys.append(key)
        values.append(value)
    return keys, values


def parse_time(text: str | None) -> float | None:
    """An RFC 3339 time (as the server writes it) -> seconds since the epoch."""
    if not text:
        return None
    from datetime import datetime

    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def duration(task: dict, now: float | None = None) -> str:
    """Run time of the task's last attempt: start to end, or to now while it runs."""
    attempts = task.get("logs") or []
    if not attempts:
        return "-"
    start = parse_time(attempts[-1].get("start_time"))
    end = parse_time(attempts[-1].get("end_time"))
    if start is None:
        return "-"
    if end is None:
        if task.get("state") in TERMINAL_STATES:
            return "-"
        end = time.time() if now is None else now
    seconds = max(0, int(end - start))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def table_row(task: dict) -> list[str]:
    created = (task.get("creation_time") or "-")[:19].replace("T", " ")
    return [task["id"], task.get("name") or "-", task["state"], created, duration(task)]


@task.command("list")
@click.option("--state", help="Only tasks in this state.")
@click.option("--name-prefix", help="Only tasks whose name starts with this.")
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE (or KEY: any value); repeatable.")
@click.option("--view", type=VIEWS, default="MINIMAL", show_default=True,
              help="Task view (a table always asks for BASIC).")
@click.option("--page-size", type=int)
@click.option("--page-token", help="The next_page_token of a previous page.")
@click.option("--all", "all_pages", is_flag=True, help="Follow next_page_token to the end.")
@click.option("-o", "--output", type=OUTPUTS, default="json", show_default=True)
@server_option
def task_list(state, name_prefix, tags, view, page_size, page_token, all_pages, output,
              server) -> None:
    """List tasks: {"tasks": [...], "next_page_token": ...} as JSON or YAML, or a table
    (the next page's token then goes to stderr)."""
    keys, values = _parse_tags(tags)
    output = output.lower()
    view = "BASIC" if output == "table" and view.upper() == "MINIMAL" else view.upper()
    params: dict[str, Any] = dict(state=state, name_prefix=name_prefix, tag_key=keys,
                                  tag_value=values, view=view, page_size=page_size)
    api = client(server)
    try:
        if all_pages:
            page: dict = {"tasks": list(api.list_all(**params))}
        else:
            page = api.list_page(**params, page_token=page_token)
    except ClientError as exc:
        fail(str(exc))
    if output != "table":
        emit(page, output)
        return
    table(TABLE_HEADERS, [table_row(t) for t in page.get("tasks", [])])
    if page.get("next_page_token"):
        click.echo(f"next page: --page-token {page['next_page_token']}", err=True)


@task.command("cancel")
@click.argument("task_ids", nargs=-1, required=True)
@server_option
def task_cancel(task_ids, server) -> None:
    """Cancel tasks (a task that already ended is left as it is)."""
    api = client(server)
    errors = 0
    for task_id in task_ids:
        try:
            api.cancel(task_id)
            click.echo(f"{task_id} cancel requested")
        except ClientError as exc:
            click.echo(f"Error: {task_id}: {exc}", err=True)
            errors += 1
    if errors:
        sys.exit(1)


@task.command("wait")
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--interval", type=float, default=2.0, show_default=True,
              help="Seconds between polls.")
@click.option("--timeout", type=float, default=0,
              help="Give up after this many seconds (0: never).")
@server_option
def task_wait(task_ids, interval, timeout, server) -> None:
    """Wait until tasks end; print each final state; exit 1 if any is not COMPLETE."""
    states = wait_tasks(client(server), task_ids, interval, timeout)
    for task_id in task_ids:
        click.echo(f"{task_id} {states[task_id]}")
    if any(states[t] != "COMPLETE" for t in task_ids):
        sys.exit(1)


def _new_text(seen: str, tail: str) -> str:
    """What `tail` (a stream's latest tail) adds to `seen` (the end of what was printed):
    tail without its longest start that `seen` ends with. A tail is a window over the
    stream, so a stretch repeated exactly across the window's edge can be taken for one
    already printed; each line is otherwise printed once."""
    for start in range(max(0, len(tail) - len(seen)), len(tail)):
        if seen.endswith(tail[:len(tail) - start]) and tail[:len(tail) - start]:
            break
    else:
        return tail
    return tail[len(tail) - start:]


class LogFollower:
    """Prints the new part of each executor's tail of a task's last attempt."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        # (attempt, executor index) -> the end of what was printed of that stream
        self.seen: dict[tuple[int, int], str] = {}

    def show(self, task: dict) -> None:
        attempts = task.get("logs") or []
        executors = (attempts[-1].get("logs") or []) if attempts else []
        for index, entry in enumerate(executors):
            key = (len(attempts), index)  # a retried task starts its executors again
            tail = (entry or {}).get(self.stream) or ""
            seen = self.seen.get(key, "")
            if len(seen) >= len(tail) and seen.endswith(tail):
                continue
            new = _new_text(seen, tail)
            if new:
                click.echo(new, nl=False)
                sys.stdout.flush()
                self.seen[key] = (seen + new)[-max(len(tail), 1) * 2:]


@task.command("logs")
@click.argument("task_id")
@click.option("--stderr", "stderr", is_flag=True, help="Show stderr instead of stdout.")
@click.option("--follow", "-f", is_flag=True,
              help="Keep printing what the executors write until the task ends.")
@click.option("--interval", type=float, default=1.0, show_default=True,
              help="Seconds between polls with --follow.")
@server_option
def task_logs(task_id, stderr, follow, interval, server) -> None:
    """Print the stdout (or stderr) tail of each executor of a task's last attempt; with
    --follow, then what they write, each line once, until the task ends. While a task
    runs, its tails are as fresh as worker.log_update_seconds."""
    api = client(server)
    follower = LogFollower("stderr" if stderr else "stdout")
    while True:
        try:
            found = api.get(task_id, "FULL")
        except ClientError as exc:
            fail(str(exc))
        follower.show(found)
        if not follow or found.get("state") in TERMINAL_STATES:
            return
        time.sleep(interval)
