"""Admin commands run on the gateway's host with its configuration (no server needed).

- ``funnel config show``: the effective typed configuration as YAML, secrets masked;
- ``funnel render TASK.json``: the submission script a backend would submit for a task,
  made by the backend's own rendering method (``render_script``, or HTCondor's ``render``;
  ``--array N``: ``render_array_script``, the script of an array of N such tasks);
- ``funnel admin purge`` / ``funnel admin du``: ended tasks removed, work dir measured
  (gateway/store/retention.py), straight on the database and the work dir.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import click

from funnel_hpc.core.config import Config, Instance
from funnel_hpc.gateway.cli.common import (
    OUTPUTS,
    config_option,
    emit,
    fail,
    load_config,
    table,
)

MASK = "********"
# key names whose values are secrets (case-insensitive, anywhere in the name) ...
SECRET_NAME = re.compile(r"password|passwd|secret|token|credential|private|authorization|"
                         r"cookie|(^|_)key$|apikey", re.IGNORECASE)
# ... and mappings whose every value is one (auth.users: name -> password hash)
SECRET_VALUES = {"auth.users"}
URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)([^@\s]+)(@)")
RENDER_BACKENDS = ("slurm", "gridengine", "htcondor", "pbs")
PLACEHOLDER_TASK_ID = "0123456789abcdef0123"
# backends whose render() gives several files: their names in the task dir
RENDERED_FILES = {"htcondor": ["htcondor.sub", "htcondor.sh"]}


def mask_secrets(value: Any, path: str = "") -> Any:
    """A copy of a configuration with secret values (and URL passwords) masked."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            dotted = f"{path}.{key}" if path else str(key)
            if SECRET_NAME.search(str(key)) and item not in ("", None, {}, []) \
                    and not isinstance(item, bool):  # session_cookie_secure: a setting
                out[key] = MASK if not isinstance(item, dict) else {MASK: MASK}
            elif dotted in SECRET_VALUES and isinstance(item, dict):
                out[key] = dict.fromkeys(item, MASK)
            else:
                out[key] = mask_secrets(item, dotted)
        return out
    if isinstance(value, list):
        return [mask_secrets(item, path) for item in value]
    if isinstance(value, str):
        return URL_PASSWORD.sub(lambda m: m.group(1) + MASK + m.group(3), value)
    return value


@click.group()
def config() -> None:
    """Inspect the configuration."""


@config.command("show")
@config_option
def config_show(config_path) -> None:
    """Print the effective configuration (defaults, file, FUNNEL_ variables, derived
    values), as loaded and checked, as YAML, with passwords, tokens, keys and secrets
    masked. An invalid configuration: one line naming the key, exit status 1."""
    import yaml

    from funnel_hpc.core.config import plain
    from funnel_hpc.worker.subids import explain

    loaded = load_config(config_path)
    effective = plain(loaded)
    click.echo(yaml.safe_dump(mask_secrets(effective), sort_keys=False), nl=False)
    # what a bwrap sandbox of a worker running as this command's user gets (its subuids)
    click.echo(f"# bwrap ids for a worker running as uid {os.geteuid()} here: "
               f"{explain(loaded.worker.sandbox_uids.subordinate)}")


# ---- render ----

def submit_request(config: Config, task: dict, task_id: str) -> Any:
    """The SubmitRequest the reconciler makes for this task's first attempt."""
    from funnel_hpc.backends.base import SubmitRequest
    from funnel_hpc.gateway.reconcile import reconciler
    from funnel_hpc.gateway.reconcile.core import WORKER_CONFIG_FILE
    from funnel_hpc.gateway.reconcile.owner_worker import runs_as_owners

    directory = reconciler.task_dir(config, task_id)
    # as WorkerLaunch.argv (gateway/reconcile/submission.py): the worker config is
    # <work_dir>/worker-config.json, or the task's own when jobs run as their owners
    worker_config = (directory if runs_as_owners(config) else Path(config.work_dir)) \
        / WORKER_CONFIG_FILE
    argv = [*reconciler.worker_command(config), "--task-file", str(directory / "task.json"),
            "--workdir", config.work_dir, "--config", str(worker_config)]
    if config.reconciler.pass_server_url:
        argv += ["--server", config.server.public_url]
    params = (task.get("resources") or {}).get("backend_parameters") or {}
    return SubmitRequest(task_id=task_id, task=task, task_dir=directory, worker_argv=argv,
                         backend_parameters={str(k).lower(): str(v) for k, v in params.items()})


def stored_task(document: Any, task_id: str, route: Any = None) -> dict:
    """The FULL task document the reconciler hands a backend, from a TES task body;
    `route(spec)`, when given, is called on the validated task first (the route tag)."""
    from marshmallow import ValidationError

    from funnel_hpc.core.events import now_rfc3339
    from funnel_hpc.gateway.store.task_views import full_task
    from funnel_hpc.gateway.store.tes_schemas import flatten_errors, load_task

    try:
        spec = load_task(document)
    except ValidationError as exc:
        fail("; ".join(flatten_errors(exc.messages)))
    if route is not None:
        route(spec)
    return full_task(task_id, "QUEUED", spec, [], now_rfc3339())


def render_for(backend: Any, request: Any, kind: str) -> str:
    """The backend's own rendering: render_script -> the script; render -> the files it
    writes to the task dir, each after a head(1)-style "==> name <==" line."""
    if hasattr(backend, "render_script"):
        return backend.render_script(request)
    rendered = backend.render(request)
    if isinstance(rendered, str):
        return rendered
    names = RENDERED_FILES.get(kind) or [f"file {i}" for i in range(1, 99)]
    return "\n".join(f"==> {name} <==\n{text}" for name, text in zip(names, rendered,
                                                                     strict=False))


# how the size of an array reaches the scheduler where its script does not say it
ARRAY_SUBMISSION = {"gridengine": "qsub -t 1-{n} (mode drmaa: runBulkJobs(1, {n}, 1))",
                    "pbs": "qsub -J 0-{last}",
                    "htcondor": "one cluster of {n} procs (Schedd.submit count={n})"}


def render_array(backend: Any, request: Any, size: int, kind: str) -> str:
    """The script of an array of `size` tasks like this one (its list not written: the
    name shown is a placeholder): Slurm's render_array_script, the render_array of Grid
    Engine, PBS (one script) and HTCondor (description and wrapper)."""
    from funnel_hpc.backends import arrays

    has_arrays = hasattr(backend, "render_array_script") or hasattr(backend, "render_array")
    if not has_arrays or backend.array_max <= 1:
        fail(f"--array: backend {backend.name!r} submits no job arrays (array_max "
             f"{backend.array_max})")
    if not 2 <= size <= backend.array_max:
        fail(f"--array: an array holds 2 to {backend.array_max} tasks (array_max), not {size}")
    if backend.array_key(request) is None:  # the submitter would send it alone
        fail(f"--array: backend {backend.name!r} would submit this task alone (its "
             f"template or task dir cannot make an array element)")
    name = "0" * 16
    path = Path(backend.work_dir) / arrays.DIR_NAME / name
    if hasattr(backend, "render_array_script"):
        task_list = arrays.TaskList(name, path, (request.task_id,) * size)
        return str(backend.render_array_script([request] * size, task_list))
    rendered = backend.render_array([request] * size, path)
    how = ARRAY_SUBMISSION.get(kind)
    if how:  # the size is the submission's, not the script's
        click.echo("submitted as one array: " + how.format(n=size, last=size - 1), err=True)
    if isinstance(rendered, str):
        return rendered
    names = RENDERED_FILES.get(kind) or [f"file {i}" for i in range(1, 99)]
    return "\n".join(f"==> {name} <==\n{text}" for name, text in zip(names, rendered,
                                                                     strict=False))


def forced_config(config_path: str | None, name: str) -> tuple[Config, str]:
    """The configuration and instance `--backend NAME` means: a configured instance; or,
    for a configuration of the single `backend:` form, backend.name = NAME (any kind)."""
    cfg = load_config(config_path)
    if name in cfg.backends:
        return cfg, name
    if list(cfg.backends) != [cfg.backend.name]:  # several named instances
        fail(f"--backend: no backend instance {name!r} (instances: {', '.join(cfg.backends)})")
    cfg = load_config(config_path, {"backend": {"name": name}})
    return cfg, cfg.backend.name


@click.command("render")
@click.argument("task_file", type=click.File("r"))
@click.option("--backend", "backend_name",
              help="Backend instance to render for (default: the one routing picks).")
@click.option("--owner", help="Owner to route the task as (rules on owner or group).")
@click.option("--task-id", default=PLACEHOLDER_TASK_ID, show_default=True,
              help="Task id to render with.")
@click.option("--array", "array_size", type=int, default=None,
              help="Render the job array script N such tasks get (2..array_max).")
@config_option
def render(task_file, backend_name, owner, task_id, array_size, config_path) -> None:
    """Print the submission script the backend would submit for TASK_FILE (a TES task,
    - for stdin), without submitting anything. Where the task goes ("routed to gpu by
    routing[1]") is printed first, on stderr: stdout is the script alone."""
    from funnel_hpc.backends.base import BackendError
    from funnel_hpc.core.routing import ROUTE_TAG, Unroutable
    from funnel_hpc.gateway.store.placement import Placement

    cfg, name = forced_config(config_path, backend_name) if backend_name \
        else (load_config(config_path), "")
    try:
        document = json.load(task_file)
    except ValueError as exc:
        fail(f"{task_file.name}: not valid JSON: {exc}")
    placement = Placement.from_config(cfg)
    chosen: list[str] = []  # the instance
    notes: list[str] = []   # where the task goes and why, printed once it rendered

    def route(spec: dict) -> None:
        try:
            routed = placement.route(spec, owner)
        except Unroutable as exc:
            if not backend_name:
                fail(f"routing: {exc}")
            if placement.several:
                spec["tags"] = {**(spec.get("tags") or {}), ROUTE_TAG: name}
            chosen.append(name)
            notes.append(f"forced to {name} by --backend (routing refuses the task: {exc})")
            return
        placement.take_request(spec, routed)
        chosen.append(name or routed.instance)
        if placement.several:
            spec["tags"][ROUTE_TAG] = chosen[0]
        notes.append(routed.describe() if chosen[0] == routed.instance else
                     f"forced to {name} by --backend (routing: {routed.describe()})")

    task = stored_task(document, task_id, route)
    instance = cfg.instance(chosen[0])
    if instance.kind not in RENDER_BACKENDS:
        fail(f"backend {instance.name!r} (kind {instance.kind}) submits no script "
             f"(render knows {', '.join(RENDER_BACKENDS)})")
    try:
        backend = instance_backend(cfg, instance)
        request = submit_request(cfg, task, task_id)
        script = render_array(backend, request, array_size, instance.kind) \
            if array_size is not None \
            else render_for(backend, request, instance.kind)
    except (ValueError, OSError, BackendError) as exc:  # TemplateValueError: a ValueError
        fail(f"cannot render the {instance.name} script: {exc}")
    click.echo(notes[0], err=True)
    click.echo(script, nl=False)


def instance_backend(cfg: Config, instance: Instance) -> Any:
    """The backend object of an instance, as the reconciler makes it (its kind's class
    over the instance's options), without a change callback: nothing is submitted."""
    from funnel_hpc.backends.registry import load_backend

    return load_backend(instance, cfg.work_dir)


# ---- admin ----

@click.group()
def admin() -> None:
    """Maintenance on the gateway's host: purge ended tasks, measure the work dir."""


def _engine(cfg: Config) -> Any:
    """The gateway's database; fail (one line, nothing created) when the work dir or the
    SQLite file is missing: a typo in --config must not leave an empty funnel.db."""
    from funnel_hpc.gateway.store import db

    if not Path(cfg.work_dir).is_dir():
        fail(f"work dir {cfg.work_dir} does not exist (wrong --config or FUNNEL_CONFIG?)")
    path = db.sqlite_path(cfg.database.url)
    if path is not None and not path.is_file():
        fail(f"database {path} does not exist (wrong --config or FUNNEL_CONFIG?)")
    return db.make_engine(cfg.database.url, cfg.database.sqlite_busy_timeout)


@admin.command("purge")
@click.option("--older-than", required=True, metavar="AGE",
              help="Only tasks that ended longer ago than this (30d, 12h, 90m, 45s, 2w).")
@click.option("--dry-run", is_flag=True, help="Show what would go; remove nothing.")
@config_option
def admin_purge(older_than, dry_run, config_path) -> None:
    """Delete ended tasks (COMPLETE, EXECUTOR_ERROR, SYSTEM_ERROR, CANCELED, PREEMPTED)
    older than AGE and their task directories. Tasks not ended are never touched."""
    from sqlalchemy.exc import SQLAlchemyError

    from funnel_hpc.gateway.store.retention import parse_age, purge

    try:
        age = parse_age(older_than)
    except ValueError as exc:
        fail(f"--older-than: {exc}")
    cfg = load_config(config_path)
    try:
        result = purge(_engine(cfg), cfg.work_dir, age, dry_run=dry_run)
    except SQLAlchemyError as exc:
        fail(f"database: {exc.__class__.__name__}: {str(exc).splitlines()[0]}")
    verb = "would delete" if dry_run else "deleted"
    for task_id in result.tasks:
        click.echo(f"{verb} {task_id}")
    states = ", ".join(f"{s}={n}" for s, n in sorted(result.states.items())) or "none"
    click.echo(f"{verb} {len(result.tasks)} task(s) ended before {result.cutoff} ({states}); "
               f"{result.bytes_freed} bytes of task directories", err=True)
    for error in result.errors:
        click.echo(f"Error: could not remove {error}", err=True)
    if result.errors:
        raise SystemExit(1)


@admin.command("du")
@click.option("-o", "--output", type=OUTPUTS, default="table", show_default=True)
@config_option
def admin_du(output, config_path) -> None:
    """What the work dir holds: task rows, directories and bytes per task state
    ("orphaned": task directories with no task row; "other": everything else)."""
    from sqlalchemy.exc import SQLAlchemyError

    from funnel_hpc.gateway.store.retention import disk_usage

    cfg = load_config(config_path)
    try:
        usage = disk_usage(_engine(cfg), cfg.work_dir)
    except SQLAlchemyError as exc:
        fail(f"database: {exc.__class__.__name__}: {str(exc).splitlines()[0]}")
    if output.lower() != "table":
        emit({"work_dir": cfg.work_dir, "usage": usage}, output.lower())
        return
    rows = [[key, v["tasks"], v["dirs"], v["bytes"]] for key, v in sorted(usage.items())]
    total = [sum(v[k] for v in usage.values()) for k in ("tasks", "dirs", "bytes")]
    table(("STATE", "TASKS", "DIRS", "BYTES"), [*rows, ["total", *total]])

