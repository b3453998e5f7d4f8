"""A rendered Slurm script's #SBATCH header as slurmrestd job properties.

slurmrestd 22.05 does not read the script's ``#SBATCH`` lines (measured: a job given
``#SBATCH --job-name`` and ``--hold`` in its script ran unnamed and unheld); its job
submission takes the properties in a ``job`` object beside the script. So REST mode reads
the header as sbatch does (the ``#SBATCH`` lines before the first line that is neither
blank nor a comment, each split into words like a command line) and maps each option by
the table below, kept as data. Values go through as the text sbatch would get: slurmrestd
parses them with sbatch's own option parsers (``--mem=100M``, ``--time=1:00:00``,
``--begin=now+60`` measured), so there is no second parser of Slurm syntax here.

An option the table lacks is refused with a BackendError naming it: nothing reaches a job
property but through this table, so a header can never set, say, the job's environment.
Task values reach the header only through the template's ``directive`` filter (no
newline, blank or quote), as in CLI mode.
"""

from __future__ import annotations

import shlex
from typing import Any

from funnel_hpc.backends.base import BackendError

DIRECTIVE = "#SBATCH"

# sbatch long option -> slurmrestd job property (v0.0.37/v0.0.38), value passed as text.
# Each was submitted to the real slurmrestd 22.05 (tests/backends/test_slurm_rest_script.py).
OPTION_PROPERTIES: dict[str, str] = {
    "job-name": "name",
    "output": "standard_output",
    "error": "standard_error",
    "input": "standard_input",
    "chdir": "current_working_directory",
    "cpus-per-task": "cpus_per_task",
    "ntasks": "tasks",
    "ntasks-per-node": "tasks_per_node",
    "nodes": "nodes",
    "mem": "memory_per_node",
    "mem-per-cpu": "memory_per_cpu",
    "mem-per-gpu": "memory_per_gpu",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "array": "array",
    "time": "time_limit",
    "time-min": "time_minimum",
    "constraint": "constraints",
    "gres": "gres",
    "gpus": "gpus",
    "gpus-per-node": "gpus_per_node",
    "gpus-per-task": "gpus_per_task",
    "cpus-per-gpu": "cpus_per_gpu",
    "begin": "begin_time",
    "deadline": "deadline",
    "nodelist": "nodelist",  # not in the v0.0.38 schema, yet read (measured)
    "exclusive": "exclusive",
    "reservation": "reservation",
    "licenses": "licenses",
    "dependency": "dependency",
    "comment": "comment",
    "mail-type": "mail_type",
    "mail-user": "mail_user",
    "nice": "nice",
    "wckey": "wckey",
    "signal": "signal",
}

# options given without a value -> (property, value)
FLAG_PROPERTIES: dict[str, tuple[str, Any]] = {
    "hold": ("hold", True),
    "exclusive": ("exclusive", "exclusive"),  # what a bare --exclusive means
    "requeue": ("requeue", True),
}

# sbatch's one-letter options -> their long names
SHORT_OPTIONS: dict[str, str] = {
    "J": "job-name", "o": "output", "e": "error", "i": "input", "D": "chdir",
    "c": "cpus-per-task", "n": "ntasks", "N": "nodes", "p": "partition", "A": "account",
    "q": "qos", "a": "array", "t": "time", "C": "constraint", "G": "gpus", "b": "begin",
    "w": "nodelist", "H": "hold", "d": "dependency",
}

# options slurmrestd 22.05 has no property for, with what to do instead
UNSUPPORTED_HINTS: dict[str, str] = {
    "tmp": "slurmrestd 22.05 has no property for the temporary disk (tasks asking "
           "resources.disk_gb need backend.slurm.mode: cli, or a template without --tmp)",
    "export": "REST mode sends the gateway's environment itself",
    "no-requeue": "slurmrestd 22.05 takes `requeue: false` and leaves the job requeueable "
                  "(measured)",
    "workdir": "use --chdir",
}


def header_lines(script: str) -> list[str]:
    """The #SBATCH lines sbatch reads: those before the first line that is neither
    blank nor a comment (the #! line included in the comments)."""
    lines = []
    for line in script.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        if stripped.startswith(DIRECTIVE) and stripped[len(DIRECTIVE):][:1] in (" ", "\t"):
            lines.append(stripped[len(DIRECTIVE):].strip())
    return lines


def _words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=False)
    except ValueError as exc:
        raise BackendError(f"#SBATCH {line[:80]!r}: cannot split into words ({exc})") from None


def _option(word: str) -> tuple[str, str | None]:
    """(long name, value or None) of one word: --name=value, --name, -Xvalue, -X."""
    if word.startswith("--"):
        name, equals, value = word[2:].partition("=")
        return name, value if equals else None
    if word.startswith("-") and len(word) >= 2:
        long_name = SHORT_OPTIONS.get(word[1])
        if long_name is None:
            raise BackendError(f"#SBATCH {word[:2]}: not supported in REST mode "
                               f"(supported: {supported()})")
        value = word[2:].removeprefix("=")
        return long_name, value or None
    raise BackendError(f"#SBATCH {word[:80]!r}: not an option")


def job_properties(script: str) -> dict[str, Any]:
    """The job properties the script's #SBATCH header asks for; BackendError naming
    the first option REST mode cannot give slurmrestd."""
    properties: dict[str, Any] = {}
    for line in header_lines(script):
        words = _words(line)
        index = 0
        while index < len(words):
            name, value = _option(words[index])
            index += 1
            if value is None and name in OPTION_PROPERTIES and name not in FLAG_PROPERTIES:
                if index >= len(words):
                    raise BackendError(f"#SBATCH --{name}: needs a value")
                value = words[index]
                index += 1
            properties.update(_property(name, value))
    return properties


def _property(name: str, value: str | None) -> dict[str, Any]:
    if value is None and name in FLAG_PROPERTIES:
        key, flag = FLAG_PROPERTIES[name]
        return {key: flag}
    if value is not None and name in OPTION_PROPERTIES:
        return {OPTION_PROPERTIES[name]: value}
    hint = UNSUPPORTED_HINTS.get(name)
    if hint:
        raise BackendError(f"#SBATCH --{name}: not supported in REST mode: {hint}")
    if name in FLAG_PROPERTIES:
        raise BackendError(f"#SBATCH --{name}: takes no value in REST mode")
    raise BackendError(f"#SBATCH --{name[:40]}: not supported in REST mode "
                       f"(supported: {supported()})")


def supported() -> str:
    """The long options REST mode maps, for error messages and the docs."""
    return ", ".join(f"--{name}" for name in sorted({*OPTION_PROPERTIES, *FLAG_PROPERTIES}))
