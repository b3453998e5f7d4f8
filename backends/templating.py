"""Submission-script rendering shared by the HPC backends (Jinja2 templates in templates/).

Templates are configuration that site admins own. Every value that comes from
a task reaches a template through one of two filters, and templates must use them:

- ``directive``: for scheduler directive lines (``#SBATCH``, ``#$``, submit
  description values). Refuses (TemplateValueError) anything outside a small
  safe character set, so a value can never end a line, start a new directive or
  open a shell construct.
- ``shell_quote``: for shell words (``shlex.quote``).

Variables every backend template receives (``script_variables``):

| name | what |
| --- | --- |
| ``task_id`` | the TES task id (hex) |
| ``job_name`` | ``funnel-<task_id>`` |
| ``task_name`` | the task's name reduced to ``[A-Za-z0-9_.-]``, at most 64 characters (may be empty) |
| ``task_dir`` | the task's work directory (holds task.json, events.jsonl, the script, scheduler logs) |
| ``cpus`` | ``resources.cpu_cores`` or 1 |
| ``ram_gb`` / ``ram_mb`` | ``resources.ram_gb`` and the same in whole MiB (rounded up), or None |
| ``disk_gb`` / ``disk_mb`` | ``resources.disk_gb`` likewise, or None |
| ``zones`` | ``resources.zones`` (list) |
| ``partition`` | the first zone, else the backend's configured default (``partition``/``queue``), or "" |
| ``preemptible`` | ``resources.preemptible`` (bool) |
| ``backend_parameters`` | list of (scheduler option, value) pairs: the task's ``backend_parameters`` mapped through the backend's allow-list |
| ``worker_argv`` / ``worker_command`` | the command that runs the worker, as a list and as one shell-quoted string |
| ``site`` | the backend's ``site`` config: ``account``, ``qos``, ``extra_directives`` (lines), ``modules`` (to ``module load``), ``prologue`` (shell lines). Admin-owned, trusted. |
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from typing import Any

import jinja2

from backends.base import SubmitRequest
from gateway.config import TEMPLATES_DIR

# letters, digits and the punctuation scheduler options need (times, lists, gres, paths)
_DIRECTIVE_SAFE = re.compile(r"^[A-Za-z0-9_.,:=@%+/\-\[\]]*$")


class TemplateValueError(ValueError):
    """A task value cannot be placed in a submission script safely."""


def directive(value: Any) -> str:
    text = str(value)
    if not _DIRECTIVE_SAFE.match(text):
        bad = sorted({c for c in text if not _DIRECTIVE_SAFE.match(c)})
        raise TemplateValueError(
            f"value {text[:60]!r} has characters not allowed in a scheduler directive: "
            f"{' '.join(repr(c) for c in bad)}")
    return text


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def shell_quote(value: Any) -> str:
    """One shell word, on one line: control characters use bash's $'\\xNN' quoting."""
    text = str(value)
    if not _CONTROL.search(text):
        return shlex.quote(text)
    escaped = "".join(f"\\x{ord(c):02x}" if _CONTROL.match(c) or c in "\\'" else c
                      for c in text)
    return f"$'{escaped}'"


def shell_join(argv: list[str]) -> str:
    return " ".join(shell_quote(arg) for arg in argv)


def environment(template_dir: str | Path | None = None) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(template_dir or TEMPLATES_DIR)),
                             undefined=jinja2.StrictUndefined, autoescape=False,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["directive"] = directive
    env.filters["shell_quote"] = shell_quote
    return env


def render(template: str, variables: dict[str, Any]) -> str:
    """Render a template: a path (admin override) or a name under templates/."""
    path = Path(template)
    if path.is_absolute():
        env = environment(path.parent)
        name = path.name
    else:
        env = environment()
        name = template
    try:
        return env.get_template(name).render(**variables)
    except jinja2.TemplateNotFound:
        raise TemplateValueError(f"submission template {template} not found") from None


def map_backend_parameters(params: dict[str, str], allowed: dict[str, str]) -> list[tuple[str, str]]:
    """TES backend_parameters (keys lower-cased) -> [(scheduler option, value)], allow-listed."""
    lowered = {str(k).lower(): str(v) for k, v in allowed.items()}
    out = []
    for key, value in sorted(params.items()):
        option = lowered.get(key.lower())
        if option:
            out.append((option, directive(value)))
    return out


def check_backend_parameters(params: dict[str, str], allowed: dict[str, str],
                             strict: bool) -> tuple[dict[str, str], list[str]]:
    """Split a task's backend_parameters into accepted ones and warnings; strict: refuse."""
    lowered = {str(k).lower() for k in allowed}
    unknown = sorted(k for k in params if k.lower() not in lowered)
    if unknown and strict:
        raise ValueError(f"unsupported backend_parameters: {', '.join(unknown)}")
    accepted = {k: v for k, v in params.items() if k.lower() in lowered}
    warnings = [f"backend_parameters ignored: {', '.join(unknown)}"] if unknown else []
    return accepted, warnings


def _mb(gb: Any) -> int | None:
    return int(math.ceil(float(gb) * 1024)) if gb else None


def script_variables(request: SubmitRequest, options: dict[str, Any]) -> dict[str, Any]:
    task = request.task
    resources = task.get("resources") or {}
    zones = [str(z) for z in resources.get("zones") or []]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(task.get("name") or ""))[:64]
    default_partition = options.get("partition") or options.get("queue") or ""
    site = {"account": "", "qos": "", "extra_directives": [], "modules": [], "prologue": [],
            **(options.get("site") or {})}
    return {
        "task_id": directive(request.task_id),
        "job_name": directive(f"funnel-{request.task_id}"),
        "task_name": name,
        "task_dir": directive(str(request.task_dir)),
        "cpus": int(resources.get("cpu_cores") or 1),
        "ram_gb": resources.get("ram_gb"),
        "ram_mb": _mb(resources.get("ram_gb")),
        "disk_gb": resources.get("disk_gb"),
        "disk_mb": _mb(resources.get("disk_gb")),
        "zones": [directive(z) for z in zones],
        "partition": directive(zones[0] if zones else default_partition),
        "preemptible": bool(resources.get("preemptible")),
        "backend_parameters": map_backend_parameters(request.backend_parameters,
                                                     options.get("backend_parameters") or {}),
        "worker_argv": list(request.worker_argv),
        "worker_command": shell_join(request.worker_argv),
        "site": site,
    }
