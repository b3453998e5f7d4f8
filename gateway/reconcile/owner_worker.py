"""Workers that run as their task's owner (``backend.slurm.submit_as_owner``): what they
may read of the configuration, and whether the worker command runs for them at all.

Such a worker cannot read the gateway's ``<work_dir>/worker-config.json`` (root's, 600), and
must not: its ``storage`` section may hold the site's keys. Each task gets its own copy in
its task directory instead (written by the reconciler, handed to the owner with the task
dir), with every site secret taken out (``SITE_SECRETS``); an owner's own credentials
come from their environment, boto3's or Google's own chain, or their
``backend.slurm.owner_storage_file`` (core/config.py merges it in the worker).

At start the reconciler runs ``<worker command> --help`` as ``nobody``: an interpreter or
install an owner cannot read (a venv under /root) fails the start with that error, not
every task with SYSTEM_ERROR later; so does a reconciler that is not root. Cost: one
such process per start (0.16 s measured).
"""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
from typing import Any

from funnel_hpc.core import config as config_mod
from funnel_hpc.core.config import BackendOptions, Config, SlurmOptions

# (section path, keys) of values an owner's worker must not see: the site's credentials
SITE_SECRETS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("storage", "s3"), ("access_key_id", "secret_access_key")),
    (("storage", "http"), ("headers",)),  # e.g. Authorization: Bearer <the site's token>
    (("storage", "gs"), ("credentials_file",)),  # the site's service account
)
# per-entry sections: each of their mappings loses the same keys
SITE_SECRET_ENTRIES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("storage", "s3", "endpoints"), ("access_key_id", "secret_access_key")),
    (("worker", "registries"), ("username", "password")),
)
OWNER_IMAGE_CACHE = "~/.cache/funnel-hpc/images"  # "~": the owner's home (core/config.py)
PROBE_USER = "nobody"
PROBE_TIMEOUT = 120.0
PROBE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # runuser: sbin
OWNER_STORAGE_KEY = config_mod.OWNER_STORAGE_KEY  # the backend's key, and the config's


class WorkerCommandError(ValueError):
    """The worker command cannot be run by an unprivileged user."""


def runs_as_owners(config: Config, options: BackendOptions | None = None) -> bool:
    """Whether a backend instance (its options; default: the single `backend:` form's)
    submits jobs as their owners."""
    if options is None:
        options = config.backend.options()
    return isinstance(options, SlurmOptions) and options.submit_as_owner


def owner_sections(config: Config, options: BackendOptions | None = None) -> dict[str, Any]:
    """The worker's sections without the site's secrets, plus where the owner's own
    storage settings are (backend.slurm.owner_storage_file; "" when none), and an image
    cache of the owner's own when the site names none."""
    sections = copy.deepcopy(config_mod.worker_sections(config))
    for path, keys in SITE_SECRETS:
        _drop(_section(sections, path), keys)
    for path, keys in SITE_SECRET_ENTRIES:
        for entry in _section(sections, path).values():
            if isinstance(entry, dict):
                _drop(entry, keys)
    slurm = options if isinstance(options, SlurmOptions) else config.backend.slurm
    sections[OWNER_STORAGE_KEY] = slurm.owner_storage_file
    if not config.worker.image_cache:
        # <work_dir>/image-cache is root's; a cache shared by users would let one alter
        # the images another runs: each owner pulls into their own
        sections["worker"]["image_cache"] = OWNER_IMAGE_CACHE
    return sections


def _section(sections: dict, path: tuple[str, ...]) -> dict:
    node: Any = sections
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else {}


def _drop(section: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in section:
            section[key] = {} if isinstance(section[key], dict) else ""


def check_worker_command(command: list[str], user: str = PROBE_USER) -> None:
    """Run `command --help` as user (runuser); WorkerCommandError when it fails, or when
    this process is not root (it could neither try nor hand task dirs to their owners)."""
    if os.geteuid() != 0:
        raise WorkerCommandError(
            f"backend.slurm.submit_as_owner: the reconciler must run as root (it hands "
            f"each task directory to its owner), not as uid {os.geteuid()}")
    argv = ["runuser", "-u", user, "--", *command, "--help"]
    shown = shlex.join(command)
    advice = ("with backend.slurm.submit_as_owner every owner runs it: install funnel-hpc "
              "with a system Python where all users can read it (e.g. /opt/funnel-hpc, "
              "docs/admin.md) and start the gateway from there, or set worker.command")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                              cwd="/", env={"PATH": PROBE_PATH, "LANG": "C.UTF-8"},
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WorkerCommandError(f"worker.command {shown}: cannot try it as {user}: "
                                 f"{exc}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[-300:]
        raise WorkerCommandError(f"worker.command {shown} does not run as an unprivileged "
                                 f"user ({user}: exit {done.returncode}: {said}); {advice}")
