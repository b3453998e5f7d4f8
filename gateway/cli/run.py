"""`funnel run 'md5sum $in' --in in=./file.txt --out out=./out.txt ...`: Funnel's shorthand.

The command runs through ``sh -c`` inside the container. Each ``--in NAME=PATH`` /
``--out NAME=PATH`` becomes a TES input / output at ``/inputs/NAME/<file name>`` /
``/outputs/NAME/<file name>`` and an environment variable NAME holding that container
path, so ``$in`` in the command names the file. Local paths become absolute ``file://``
URLs (the server accepts them under ``worker.allowed_dirs``); URLs pass through.
Prints the task id, or with --wait waits and exits 0 only when the task is COMPLETE.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import click

from funnel_hpc.core.client import ClientError
from funnel_hpc.gateway.cli.common import client, fail, server_option, wait_tasks

INPUTS_ROOT = "/inputs"
OUTPUTS_ROOT = "/outputs"
STREAMS_ROOT = "/outputs/streams"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://.*")


def split_pair(option: str, item: str) -> tuple[str, str]:
    """NAME=VALUE with NAME a shell variable name."""
    name, sep, value = item.partition("=")
    if not sep or not ENV_NAME.fullmatch(name) or not value:
        fail(f"{option} {item!r}: expected NAME=VALUE, NAME a shell variable name")
    return name, value


def to_url(location: str, must_exist: bool) -> tuple[str, Path | None]:
    """A URL as it is, or a local path as an absolute file:// URL (and that path)."""
    if URL.fullmatch(location):
        return location, None
    path = Path(location).expanduser().absolute()
    if must_exist and not path.exists():
        fail(f"input {location}: no such file or directory")
    return path.as_uri(), path


def container_path(root: str, name: str, url: str, path: Path | None) -> str:
    """<root>/<name>/<the file's name> (the URL's last segment when it is no local path)."""
    leaf = path.name if path is not None else url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    if not leaf or leaf in (".", ".."):
        leaf = name
    return f"{root}/{name}/{leaf}"


def file_inputs(pairs: tuple[str, ...], env: dict[str, str]) -> list[dict]:
    inputs = []
    for item in pairs:
        name, location = split_pair("--in", item)
        url, path = to_url(location, must_exist=True)
        target = container_path(INPUTS_ROOT, name, url, path)
        kind = "DIRECTORY" if path is not None and path.is_dir() else "FILE"
        inputs.append({"name": name, "url": url, "path": target, "type": kind})
        env[name] = target
    return inputs


def file_outputs(pairs: tuple[str, ...], kind: str, env: dict[str, str]) -> list[dict]:
    outputs = []
    for item in pairs:
        name, location = split_pair("--out" if kind == "FILE" else "--out-dir", item)
        url, path = to_url(location, must_exist=False)
        target = container_path(OUTPUTS_ROOT, name, url, path)
        outputs.append({"name": name, "url": url, "path": target, "type": kind})
        env[name] = target
    return outputs


def streams(executor: dict, stdin: str | None, stdout: str | None,
            stderr: str | None) -> tuple[list[dict], list[dict]]:
    """--stdin is an input fed to the command; --stdout/--stderr are outputs it fills."""
    inputs, outputs = [], []
    if stdin:
        url, _ = to_url(stdin, must_exist=True)
        inputs.append({"name": "stdin", "url": url, "path": "/inputs/stdin", "type": "FILE"})
        executor["stdin"] = "/inputs/stdin"
    for stream, location in (("stdout", stdout), ("stderr", stderr)):
        if location:
            url, _ = to_url(location, must_exist=False)
            target = f"{STREAMS_ROOT}/{stream}"
            outputs.append({"name": stream, "url": url, "path": target, "type": "FILE"})
            executor[stream] = target
    return inputs, outputs


def build_task(command: str, options: dict[str, Any]) -> dict:
    """The TES task of a `funnel run` command line."""
    env: dict[str, str] = {}
    inputs = file_inputs(options["inputs"], env)
    outputs = file_outputs(options["outputs"], "FILE", env)
    outputs += file_outputs(options["output_dirs"], "DIRECTORY", env)
    for item in options["env"]:
        name, value = split_pair("--env", item)
        env[name] = value
    executor: dict[str, Any] = {"image": options["image"], "command": ["sh", "-c", command]}
    stream_inputs, stream_outputs = streams(executor, options["stdin"], options["stdout"],
                                            options["stderr"])
    if env:
        executor["env"] = env
    task: dict[str, Any] = {"name": options["name"] or command[:64], "executors": [executor]}
    if inputs or stream_inputs:
        task["inputs"] = inputs + stream_inputs
    if outputs or stream_outputs:
        task["outputs"] = outputs + stream_outputs
    resources = {key: value for key, value in (("cpu_cores", options["cpu"]),
                                               ("ram_gb", options["ram"]),
                                               ("disk_gb", options["disk"])) if value}
    if resources:
        task["resources"] = resources
    if options["tags"]:
        task["tags"] = dict(item.partition("=")[::2] for item in options["tags"])
    return task


@click.command("run", context_settings={"show_default": True})
@click.argument("command")
@click.option("--image", default="alpine", help="Container image the command runs in.")
@click.option("--in", "inputs", multiple=True, metavar="NAME=PATH",
              help="Input file or directory (local path or URL); $NAME is its container path.")
@click.option("--out", "outputs", multiple=True, metavar="NAME=PATH",
              help="Output file (local path or URL); $NAME is its container path.")
@click.option("--out-dir", "output_dirs", multiple=True, metavar="NAME=PATH",
              help="Output directory, as --out.")
@click.option("--stdin", help="File fed to the command's standard input.")
@click.option("--stdout", help="File that receives the command's standard output.")
@click.option("--stderr", help="File that receives the command's standard error.")
@click.option("--env", multiple=True, metavar="NAME=VALUE", help="Environment variable.")
@click.option("--cpu", type=click.IntRange(min=1), help="CPU cores.")
@click.option("--ram", type=click.FloatRange(min=0, min_open=True), help="RAM in GB.")
@click.option("--disk", type=click.FloatRange(min=0, min_open=True), help="Disk in GB.")
@click.option("--name", help="Task name (default: the command's start).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Task tag.")
@click.option("--wait", is_flag=True, help="Wait for the task; exit 0 only when COMPLETE.")
@click.option("--interval", type=float, default=2.0, help="Seconds between polls (--wait).")
@click.option("--print", "print_only", is_flag=True, help="Print the task; create nothing.")
@server_option
def run(command, wait, interval, print_only, server, **options) -> None:
    """Run COMMAND (through sh -c) in a container as a TES task; print its id.

    Credentials: FUNNEL_TOKEN, or FUNNEL_USER and FUNNEL_PASSWORD, in the environment."""
    task = build_task(command, options)
    if print_only:
        click.echo(json.dumps(task, indent=2))
        return
    api = client(server)
    try:
        task_id = api.create(task)
    except ClientError as exc:
        fail(str(exc))
    click.echo(task_id)
    if not wait:
        return
    state = wait_tasks(api, [task_id], interval, 0)[task_id]
    if state != "COMPLETE":
        fail(f"task {task_id} ended {state}")
    sys.stdout.flush()
