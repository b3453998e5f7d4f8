"""The element side of an array job script, for the backends that render one (Grid Engine,
PBS, HTCondor's wrapper): the template variables of an array, where nothing is a task's.

An array's script names no task: its ``array.select`` lines read the element's task id
from the gateway's task list (backends/arrays.py: line ``index``, 0-based, ``index``
being the scheduler's own variable), refuse a line that is not a task id, and set
``FUNNEL_TASK_ID`` and ``FUNNEL_TASK_DIR`` (``<work_dir>/<id>``). ``array.worker_command``
is the tasks' common worker command with each task's own paths written over
``"$FUNNEL_TASK_DIR"``: every request's worker argv must be the first one's with its own
task dir in it (WorkerLaunch.argv), else the array is refused. Rendering costs what one
job's script costs; no command is run here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from funnel_hpc.backends.arrays import DIR_NAME, JOB_NAME_PREFIX, TASK_ID
from funnel_hpc.backends.base import BackendError, SubmitRequest
from funnel_hpc.backends.templating import TemplateValueError, render, shell_quote

TASK_DIR_VARIABLE = "FUNNEL_TASK_DIR"
# the list name in an array key's rendering (a real list gets a random name)
KEY_LIST_NAME = "0" * 16
# the script variables that are one task's: an array's rendering has none of them
PER_TASK = ("task_id", "task_name", "task_dir", "worker_argv", "worker_command")
_DIR_WORD = f'"${TASK_DIR_VARIABLE}"'


def task_dir_of(request: SubmitRequest, work_dir: Path) -> str:
    """The request's task dir, which must be <work_dir>/<task id> (what an element finds
    again from the id alone); BackendError otherwise."""
    if not TASK_ID.fullmatch(request.task_id):
        raise BackendError(f"not a task id: {request.task_id[:80]!r}")
    expected = f"{Path(work_dir)}/{request.task_id}"
    if str(request.task_dir) != expected:
        raise BackendError(f"task {request.task_id[:80]!r}: its task dir is not "
                           f"{work_dir}/<task id>, so it cannot be an array element")
    return expected


def shell_words(argv: list[str], task_dir: Path, dir_word: str = _DIR_WORD) -> tuple[str, ...]:
    """argv as shell words, the task dir (a whole path component) written as `dir_word`
    (a quoted shell variable): the command every element of an array runs."""
    return tuple(_word(arg, task_dir, dir_word) for arg in argv)


def worker_command(requests: list[SubmitRequest], work_dir: Path) -> str:
    """The worker command of every element, one shell line over "$FUNNEL_TASK_DIR".
    BackendError when a request's argv is not the first one's with its own task dir."""
    check_same_command(requests, work_dir)
    return " ".join(shell_words(requests[0].worker_argv, requests[0].task_dir))


def argv_over_dir(argv: list[str], task_dir: str) -> tuple[Any, ...]:
    """argv with the task dir (a whole path component) written over, unquoted: equal for
    two requests exactly when their shell_words are (a word's quoting is one-to-one, and
    no quoted word starts as _DIR_WORD does), without quoting each word."""
    return tuple(None if arg == task_dir else ("", arg[len(task_dir):])
                 if arg.startswith(task_dir + "/") else arg for arg in argv)


def check_same_command(requests: list[SubmitRequest], work_dir: Path) -> None:
    """BackendError unless each request's task dir is <work_dir>/<id> and its worker argv
    is the first one's with its own task dir in it: what lets elements share a script."""
    first = requests[0]
    words = argv_over_dir(first.worker_argv, task_dir_of(first, work_dir))
    for request in requests[1:]:
        if argv_over_dir(request.worker_argv, task_dir_of(request, work_dir)) != words:
            raise BackendError(f"task {request.task_id} cannot share an array with task "
                               f"{first.task_id}: its worker command differs beyond its "
                               f"own task dir")


def _word(arg: str, task_dir: Path, dir_word: str) -> str:
    prefix = str(task_dir)
    if arg == prefix:
        return dir_word
    if arg.startswith(prefix + "/"):
        return dir_word + shell_quote(arg[len(prefix):])
    return shell_quote(arg)


def shared_inputs(request: SubmitRequest, work_dir: Path) -> tuple[Any, ...]:
    """Everything of a request its array key may depend on (Backend.array_key): what
    templating.script_variables reads but the task's own id, name and dir, plus the
    owner. Two requests with equal inputs render the same array script, so a tick's
    tasks need one key each per distinct inputs. The task dir counts as whether it is
    <work_dir>/<id> (an element's, else refused), and each argv word holding it with the
    dir written over, as shell_words does."""
    own = f"{work_dir}/{request.task_id}"
    element = str(request.task_dir) == own and bool(TASK_ID.fullmatch(request.task_id))
    return (request.owner, element,
            json.dumps(request.task.get("resources"), sort_keys=True, default=str),
            tuple(sorted(request.backend_parameters.items())),
            argv_over_dir(request.worker_argv, own))


def select_lines(list_path: Path, index: str, work_dir: Path) -> str:
    """bash lines: FUNNEL_TASK_ID from line `index` (0-based, a shell arithmetic
    expression of the scheduler's variables) of the list, refused unless it is a task
    id; FUNNEL_TASK_DIR=<work_dir>/<id>. Exits 1 (nothing run) on a bad line."""
    return "\n".join([
        f"FUNNEL_ARRAY_INDEX=$(( {index} ))",
        f"FUNNEL_TASK_ID=$(sed -n \"$((FUNNEL_ARRAY_INDEX + 1))p\" {shell_quote(str(list_path))})",
        f"if ! [[ $FUNNEL_TASK_ID =~ ^{TASK_ID.pattern}$ ]]; then",
        "    echo \"funnel-hpc: element $FUNNEL_ARRAY_INDEX has no task in its list\" >&2",
        "    exit 1",
        "fi",
        f"{TASK_DIR_VARIABLE}={shell_quote(str(work_dir))}/\"$FUNNEL_TASK_ID\"",
        f"export FUNNEL_TASK_ID {TASK_DIR_VARIABLE}",
    ])


def array_variables(variables: dict[str, Any], *, list_path: Path, index: str,
                    work_dir: Path, command: str) -> dict[str, Any]:
    """One task's script variables made an array's: the per-task ones removed (a
    template that uses one in its array part fails to render), job_name the array's,
    and `array` = {select, worker_command, list, work_dir, size (None in a key)}."""
    out = {key: value for key, value in variables.items() if key not in PER_TASK}
    out["job_name"] = JOB_NAME_PREFIX + list_path.name
    out["array"] = {"select": select_lines(list_path, index, work_dir),
                    "worker_command": command, "list": str(list_path),
                    "work_dir": str(work_dir)}
    return out


def checked(script: str, variables: dict[str, Any]) -> str:
    """The rendered array script, if the template placed the selection lines (a site
    template written before arrays renders one task's script: refused)."""
    if variables["array"]["select"] not in script:
        raise TemplateValueError("the template has no array part ({{ array.select }})")
    return script


def key_of(script: str) -> str:
    """An array key: the digest of the whole array script rendered for the key's list."""
    return hashlib.sha256(script.encode()).hexdigest()


def render_one_script(template: str, variables: dict[str, Any], requests: list[SubmitRequest],
                      list_path: Path, index: str, work_dir: Path) -> str:
    """The one script of an array of these requests, from their first one's script
    variables (Grid Engine, PBS): rendered and checked to carry the selection lines."""
    array = array_variables(variables, list_path=list_path, index=index, work_dir=work_dir,
                            command=worker_command(requests, work_dir))
    return checked(render(template, array), array)


def key_or_alone(render_array: Callable[[list[SubmitRequest], Path], str],
                 request: SubmitRequest, work_dir: Path) -> str | None:
    """array_key of a backend whose render_array gives one text: the digest of what the
    request would share, rendered for the placeholder list; None (one job, through
    submit, which names what is wrong) when it cannot be an element: a value the
    template refuses, a site template without an array part, another task dir."""
    try:
        return key_of(render_array([request], Path(work_dir) / DIR_NAME / KEY_LIST_NAME))
    except (BackendError, TemplateValueError):
        return None
