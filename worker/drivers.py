"""Container drivers: how one executor becomes one argv list.

docker, podman, apptainer and singularity are command-line templates in
configuration (``worker.drivers``); each template is a list of tokens, where

- ``{volumes}`` expands to the driver's ``volume`` tokens once per mount (``{host}``, ``{container}``),
- ``{env}`` expands to the ``env`` tokens once per variable (``{name}``, ``{value}``),
- ``{workdir}`` expands to the ``workdir`` tokens when the executor sets one,
- ``{command}`` expands to the executor's command, one token per argument,
- other tokens are formatted with ``{image}``.

The worker connects the engine process's stdin, stdout and stderr to the
executor's files (so a template needs ``-i`` to pass stdin through) and streams
them; templates never see those paths. Nothing passes through a shell. ``bwrap`` (bubblewrap) and ``proot`` run the
command over an unpacked image root file system from ``worker.rootfs_dir`` when
one exists for the image, else over the host's root (read-only), with the task's
directories bound at their container paths.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_SKIP = {"proc", "dev", "sys", "tmp", "run", "lost+found", "mnt", "media"}
# Separators of "-v host:container[:options]" and "--bind a:b,c:d" bind lists.
BIND_SEPARATORS = (":", ",")


class DriverError(RuntimeError):
    """The container runtime is missing or unusable (a SYSTEM_ERROR)."""


class Invocation:
    """How to start one executor (a plain class: the worker starts without importing
    typing or dataclasses)."""

    __slots__ = ("argv", "env", "note")

    def __init__(self, argv: list[str], env: dict[str, str] | None, note: str) -> None:
        self.argv = argv  # the runtime's command line
        self.env = env    # process environment; None: inherit
        self.note = note  # what to record in the system logs


def image_rootfs(rootfs_dir: str, image: str) -> Path | None:
    """An unpacked root file system for an image name, if the site has one."""
    if not rootfs_dir:
        return None
    names = [image, image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image]
    for name in names:
        for candidate in (name, name.rsplit("/", 1)[-1]):
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", candidate)
            path = Path(rootfs_dir) / safe
            if safe and (path / "bin").exists():
                return path
    return None


def _expand(template: list[str], values: dict, mounts: list[tuple[str, str]],
            env: dict[str, str], workdir: str | None, command: list[str],
            spec: dict) -> list[str]:
    argv: list[str] = []
    for token in template:
        if token == "{volumes}":
            for host, container in mounts:
                argv += [t.format(host=host, container=container) for t in spec["volume"]]
        elif token == "{env}":
            for name, value in env.items():
                argv += [t.format(name=name, value=value) for t in spec["env"]]
        elif token == "{workdir}":
            if workdir:
                argv += [t.format(workdir=workdir) for t in spec["workdir"]]
        elif token == "{command}":
            argv += list(command)
        else:
            argv.append(token.format(**values))
    return argv


class Drivers:
    def __init__(self, config: dict, cache_dir: Path):
        self.worker = config["worker"]
        self.cache_file = cache_dir / ".driver-probe.json"

    # ---- choosing ----

    def choose(self) -> str:
        name = self.worker["container_driver"]
        if name != "auto":
            return name
        for candidate in self.worker["auto_order"]:
            if self.works(candidate):
                return candidate
        raise DriverError("no container driver works here (tried "
                          f"{', '.join(self.worker['auto_order'])})")

    def works(self, name: str) -> bool:
        """Probe a driver once per hour per work dir (the answer is cached)."""
        cache = {}
        try:
            cache = json.loads(self.cache_file.read_text())
        except (OSError, ValueError):
            pass
        hit = cache.get(name)
        if hit and time.time() - hit["at"] < 3600:
            return hit["ok"]
        ok = self._probe(name)
        cache[name] = {"ok": ok, "at": time.time()}
        try:
            tmp = self.cache_file.with_suffix(f".{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, self.cache_file)
        except OSError:
            pass
        return ok

    def _probe(self, name: str) -> bool:
        if name == "bwrap":
            argv = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "true"]
        elif name == "proot":
            argv = ["proot", "true"]
        else:
            spec = self.worker["drivers"].get(name)
            if not spec:
                return False
            argv = list(spec["probe"])
        if not shutil.which(argv[0]):
            return False
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    # ---- building the command ----

    def invocation(self, name: str, image: str, command: list[str], env: dict[str, str],
                   workdir: str | None, binds: list[tuple[str, str]]) -> Invocation:
        if name == "bwrap":
            return self._bwrap(image, command, env, workdir, binds)
        if name == "proot":
            return self._proot(image, command, env, workdir, binds)
        spec = self.worker["drivers"].get(name)
        if not spec:
            raise DriverError(f"unknown container driver {name!r}")
        if not shutil.which(spec["run"][0]):
            raise DriverError(f"container driver {name!r}: {spec['run'][0]} not found")
        _check_bind_paths(name, binds)
        argv = _expand(spec["run"], {"image": image}, binds, env, workdir, command, spec)
        return Invocation(argv, None, f"driver {name}: image {image}")

    def _bwrap(self, image, command, env, workdir, binds) -> Invocation:
        if not shutil.which("bwrap"):
            raise DriverError("container driver 'bwrap': bwrap not found (Debian: bubblewrap)")
        rootfs = image_rootfs(self.worker["rootfs_dir"], image)
        argv = ["bwrap", "--die-with-parent", "--new-session", "--unshare-pid",
                "--unshare-ipc", "--unshare-uts", "--hostname", "funnel-task"]
        if rootfs:
            argv += ["--bind", str(rootfs), "/"]
            note = f"driver bwrap: image {image} from root file system {rootfs}"
        else:
            argv += _host_root_binds({c for _h, c in binds})
            note = (f"driver bwrap: no root file system for image {image} under "
                    f"{self.worker['rootfs_dir'] or '(worker.rootfs_dir unset)'}; "
                    "running over the host root (read-only)")
        argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        for host, container in binds:
            argv += ["--bind", host, container]
        argv += ["--clearenv", "--setenv", "PATH", env.get("PATH", DEFAULT_PATH),
                 "--setenv", "HOME", "/tmp"]
        for name, value in env.items():
            argv += ["--setenv", name, value]
        if workdir:
            argv += ["--chdir", workdir]
        return Invocation(argv + ["--", *command], None, note)

    def _proot(self, image, command, env, workdir, binds) -> Invocation:
        if not shutil.which("proot"):
            raise DriverError("container driver 'proot': proot not found")
        rootfs = image_rootfs(self.worker["rootfs_dir"], image)
        argv = ["proot"]
        if rootfs:
            argv += ["-R", str(rootfs)]
            note = f"driver proot: image {image} from root file system {rootfs}"
        else:
            note = f"driver proot: no root file system for image {image}; running over the host root"
        _check_bind_paths("proot", binds)
        for host, container in binds:
            argv += ["-b", f"{host}:{container}"]
        argv += ["-w", workdir or "/"]
        process_env = {"PATH": DEFAULT_PATH, "HOME": "/tmp", **env}
        # proot has no "--": the command starts at the first non-option word
        if command and command[0].startswith("-"):
            raise DriverError(f"driver proot: a command may not start with '-': {command[0]!r}")
        return Invocation(argv + list(command), process_env, note)


def _check_bind_paths(driver: str, binds: list[tuple[str, str]]) -> None:
    """A ':' or ',' in a path would let it add options or other binds to the engine's
    bind syntax (e.g. apptainer's comma-separated --bind list): refuse it."""
    for host, container in binds:
        for path in (host, container):
            if any(sep in path for sep in BIND_SEPARATORS):
                raise DriverError(f"driver {driver}: path {path!r} has ':' or ',', which "
                                  "this driver's bind syntax cannot carry")


def _host_root_binds(task_dirs: set[str]) -> list[str]:
    """Read-only binds of the host's top-level directories (symlinks kept as symlinks),
    leaving out any that a task directory lives in (the task's bind replaces it)."""
    argv: list[str] = []
    for entry in sorted(os.listdir("/")):
        if entry in HOST_SKIP:
            continue
        path = "/" + entry
        if any(d == path or d.startswith(path + "/") for d in task_dirs):
            continue
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    return argv
