"""What the `funnel` command modules share: one-line errors, output formats, waiting.

Every command fails the same way (``fail``: one line on stderr, exit status 1) and
prints data as JSON, YAML or a plain table (``emit``). ``wait_tasks`` polls tasks with
one GET per unfinished task per interval.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import click

from funnel_hpc.core import config as config_mod
from funnel_hpc.core.client import DEFAULT_SERVER, ClientError, TesClient
from funnel_hpc.core.events import TERMINAL_STATES

OUTPUTS = click.Choice(["table", "json", "yaml"], case_sensitive=False)

server_option = click.option("--server", envvar="FUNNEL_SERVER", default=DEFAULT_SERVER,
                             show_default=True, help="TES server URL (or FUNNEL_SERVER).")
config_option = click.option("--config", "config_path", envvar="FUNNEL_CONFIG",
                             type=click.Path(dir_okay=False),
                             help="YAML config merged over conf/default.yaml (or FUNNEL_CONFIG).")


def fail(message: str) -> NoReturn:
    """Stop with one line on stderr and exit status 1."""
    raise click.ClickException(" ".join(str(message).split()) or "failed")


def load_config(path: str | None, overrides: dict | None = None) -> config_mod.Config:
    try:
        return config_mod.load(path, overrides=overrides)
    except config_mod.ConfigError as exc:
        fail(str(exc))


RETRY_SECONDS = 120  # default of FUNNEL_RETRY_SECONDS: outlasts a database restart


def retry_seconds() -> float:
    """FUNNEL_RETRY_SECONDS: how long a command keeps trying a server that refuses
    connections or answers 429/503 (0: three tries)."""
    value = os.environ.get("FUNNEL_RETRY_SECONDS", "").strip()
    if not value:
        return RETRY_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if not 0 <= seconds <= 86400:
        fail(f"FUNNEL_RETRY_SECONDS: {value!r} is not a number of seconds (0 to 86400)")
    return seconds


def client(server_url: str) -> TesClient:
    """A TES client for the CLI: credentials from FUNNEL_TOKEN, or FUNNEL_USER and
    FUNNEL_PASSWORD; refused connections and 429/503 answers are retried (Retry-After
    honoured) for FUNNEL_RETRY_SECONDS."""
    token = os.environ.get("FUNNEL_TOKEN") or None
    user = os.environ.get("FUNNEL_USER") or None
    password = os.environ.get("FUNNEL_PASSWORD", "")
    if user is None and password:
        fail("FUNNEL_PASSWORD is set without FUNNEL_USER")
    window = retry_seconds()
    told: list[str] = []

    def tell(why: str) -> None:
        if not told:  # once per command: the wait may be long
            told.append(why)
            click.echo(f"{why}; retrying for up to {window:g} s (FUNNEL_RETRY_SECONDS)",
                       err=True)

    return TesClient(server_url, token=token, username=None if token else user,
                     password=password, retries=3, retry_seconds=window, on_retry=tell)


def emit(data: Any, output: str = "json") -> None:
    """Print data as JSON (default) or YAML."""
    if output.lower() == "yaml":
        import yaml

        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), nl=False)
    else:
        click.echo(json.dumps(data, indent=2))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows under headers, columns padded to their widest cell."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def wait_tasks(api: TesClient, task_ids: Sequence[str], interval: float,
               timeout: float) -> dict[str, str]:
    """Poll until every task has ended; return id -> final state. Progress lines go to
    stderr when they change; timeout > 0 gives up (fail) after that many seconds."""
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout if timeout > 0 else None
    shown = ""
    while True:
        for task_id in task_ids:
            if states.get(task_id) in TERMINAL_STATES:
                continue
            try:
                states[task_id] = api.get(task_id)["state"]
            except ClientError as exc:
                fail(f"{task_id}: {exc}")
        done = sum(1 for s in states.values() if s in TERMINAL_STATES)
        counts: dict[str, int] = {}
        for state in states.values():
            counts[state] = counts.get(state, 0) + 1
        line = f"{done}/{len(task_ids)} done; " + ", ".join(
            f"{s}={n}" for s, n in sorted(counts.items()))
        if line != shown:
            click.echo(line, err=True)
            shown = line
        if done == len(task_ids):
            return states
        if deadline is not None and time.monotonic() > deadline:
            fail(f"timed out after {timeout:g}s with {len(task_ids) - done} task(s) not done")
        time.sleep(interval)
