"""Submission-script rendering shared by the HPC backends (Jinja2 templates in templates/).

Templates are configuration that site admins own. Every value that comes from
a task reaches a template through one of two filters, and templates must use them:

- ``directive`` (alias ``directive_value``): for scheduler directive lines
  (``#SBATCH``, ``#$``, submit description values). Refuses
  (TemplateValueError) anything outside a small safe character set
  (letters, digits and ``_ . , : = @ % + / - [ ]``), so a value can never end a
  line (newline, CR, NUL), start a new directive or open a shell construct.
- ``shell_quote``: for shell words (``shlex.quote``; a value with control
  characters becomes one ``$'...'`` word so a shell word never spans lines).

Entry points for backends:

- ``script_variables(request, options) -> dict``: the variables below;
- ``render(template, variables) -> str``: render a name under the template
  directory (``funnel_hpc.core.config.TEMPLATES_DIR``) or an absolute path (a site's
  own template, the backend's ``template`` option);
- ``check_backend_parameters(params, allowed, strict) -> (accepted, warnings)``:
  the allow-list check (ValueError naming the keys when strict);
- ``map_backend_parameters(params, allowed, name, what) -> [(name, value)]``: the one
  mapping (sbatch/qsub options, HTCondor submit commands, AWS Batch fields).

Variables every backend template receives (``script_variables``):

- ``task_id``: the TES task id (hex); ``job_name``: ``funnel-<task_id>``
- ``task_name``: the task's name reduced to ``[A-Za-z0-9_.-]``, at most 64 characters
  (may be empty)
- ``task_dir``: the task's work directory (task.json, events.jsonl, the script, logs)
- ``cpus``: ``resources.cpu_cores`` or 1
- ``ram_gb`` / ``ram_mb``: ``resources.ram_gb`` and the same in whole MiB (rounded up),
  or None; ``disk_gb`` / ``disk_mb`` likewise
- ``zones``: ``resources.zones`` (list); ``partition``: the first zone, else the
  backend's configured default (``partition``/``queue``), or ""
- ``preemptible``: ``resources.preemptible`` (bool)
- ``backend_parameters``: (scheduler option, value) pairs, the task's
  ``backend_parameters`` mapped through the backend's allow-list
- ``worker_argv`` / ``worker_command``: the command that runs the worker, as a list
  and as one shell-quoted string
- ``site``: the backend's ``site`` config (``account``, ``qos``, ``extra_directives``
  lines, ``modules`` to ``module load``, ``prologue`` shell lines). Admin-owned, trusted.
"""

from __future__ import annotations

import functools
import math
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from funnel_hpc.backends.base import SubmitRequest
from funnel_hpc.core.config import TEMPLATES_DIR, BackendOptions

# letters, digits and the punctuation scheduler options need (times, lists, gres, paths)
_DIRECTIVE_SAFE = re.compile(r"[A-Za-z0-9_.,:=@%+/\-\[\]]*")


class TemplateValueError(ValueError):
    """A task value cannot be placed in a submission script safely."""


def directive(value: Any) -> str:
    text = str(value)
    if not _DIRECTIVE_SAFE.fullmatch(text):
        bad = sorted({c for c in text if not _DIRECTIVE_SAFE.fullmatch(c)})
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


directive_value = directive

# an option name from the admin's allow-list: "--qos", "-A", "--exclusive"
OPTION_NAME = re.compile(r"--?[A-Za-z][A-Za-z0-9_-]*")


def environment(template_dir: str | Path | None = None) -> jinja2.Environment:
    """A Jinja2 environment over template_dir (default: templates/), cached per directory."""
    return _environment(str(template_dir or TEMPLATES_DIR))


@functools.lru_cache(maxsize=16)
def _environment(template_dir: str) -> jinja2.Environment:
    # auto_reload (the default) re-reads a template whose file changed
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(template_dir),
                             undefined=jinja2.StrictUndefined, autoescape=False,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["directive"] = directive
    env.filters["directive_value"] = directive
    env.filters["shell_quote"] = shell_quote
    return env


def render(template: str, variables: dict[str, Any]) -> str:
    """Render a template: a path (admin override) or a name under templates/.

    Every failure (missing template, syntax error, undefined variable, a value
    refused by ``directive``) is a TemplateValueError (a ValueError).
    """
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
    except jinja2.TemplateError as exc:  # syntax errors, undefined variables
        raise TemplateValueError(f"submission template {template}: {exc}") from None


def map_backend_parameters(params: dict[str, str], allowed: Mapping[str, str],
                           name: re.Pattern[str] = OPTION_NAME,
                           what: str = "an option name") -> list[tuple[str, str]]:
    """TES backend_parameters -> [(scheduler name, value)] through the admin's allow-list
    (TES key, any case -> the scheduler's name for it), the one mapping of every backend.

    Keys not in the allow-list are left out (the API already warned or refused). Each
    name must fullmatch ``name`` (an sbatch/qsub option by default; HTCondor and AWS
    Batch pass their own) and each value pass ``directive``; an empty value gives the
    bare option (e.g. ``--exclusive``). Raises TemplateValueError.
    """
    lowered = {str(k).lower(): str(v) for k, v in allowed.items()}
    out = []
    for key, value in sorted(params.items()):
        mapped = lowered.get(str(key).lower())
        if not mapped:
            continue
        if not name.fullmatch(mapped):
            raise TemplateValueError(f"backend_parameters maps {key!r} to {mapped!r} in the "
                                     f"configuration, not {what}")
        out.append((mapped, directive("" if value is None else value)))
    return out


def check_backend_parameters(params: dict[str, str], allowed: dict[str, str],
                             strict: bool) -> tuple[dict[str, str], list[str]]:
    """Split a task's backend_parameters into accepted ones and warnings.

    allowed is the backend's allow-list (TES key -> scheduler option), matched
    case-insensitively; accepted keys come back lower-cased. Unknown keys give
    one warning (for the task's system logs), or, when strict, a ValueError
    naming them (the API answers HTTP 400). An accepted value that cannot be
    placed on a directive line (``directive``) is always a ValueError.
    """
    lowered = {str(k).lower() for k in allowed}
    unknown = sorted(str(k) for k in params if str(k).lower() not in lowered)
    if unknown and strict:
        raise ValueError(f"unsupported backend_parameters: {', '.join(unknown)} "
                         f"(supported: {', '.join(sorted(lowered)) or 'none'})")
    accepted: dict[str, str] = {}
    for key, value in params.items():
        if str(key).lower() in lowered:
            try:
                accepted[str(key).lower()] = directive("" if value is None else value)
            except TemplateValueError as exc:
                raise TemplateValueError(f"backend_parameters[{key!r}]: {exc}") from None
    warnings = [f"backend_parameters ignored: {', '.join(unknown)}"] if unknown else []
    return accepted, warnings


def _mb(gb: Any) -> int | None:
    return int(math.ceil(float(gb) * 1024)) if gb else None


def script_variables(request: SubmitRequest, options: BackendOptions,
                     parameters: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """The variables of every backend template (table above); parameters: the task's
    backend_parameters already mapped (default: as scheduler options)."""
    if parameters is None:
        parameters = map_backend_parameters(request.backend_parameters,
                                            options.backend_parameters)
    task = request.task
    resources = task.get("resources") or {}
    zones = [str(z) for z in resources.get("zones") or []]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(task.get("name") or ""))[:64]
    # Slurm's partition, Grid Engine's queue; every template sees every site key
    default_partition = str(getattr(options, "partition", "") or getattr(options, "queue", ""))
    own_site = getattr(options, "site", None)  # Slurm's, Grid Engine's, HTCondor's own keys
    site = {"account": "", "qos": "", "extra_directives": [], "modules": [], "prologue": [],
            **(vars(own_site) if own_site is not None else {})}
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
        "backend_parameters": parameters,
        "worker_argv": list(request.worker_argv),
        "worker_command": shell_join(request.worker_argv),
        "site": site,
    }
