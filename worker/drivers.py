"""Container drivers: how one executor becomes one argv list.

docker, podman, apptainer and singularity are command-line templates in
configuration (``worker.drivers``); each template is a list of tokens, where

- ``{volumes}`` expands to the driver's ``volume`` tokens once per mount (``{host}``,
  ``{container}``),
- ``{env}`` expands to the ``env`` tokens once per variable (``{name}``, ``{value}``),
- ``{workdir}`` expands to the ``workdir`` tokens when the executor sets one,
- ``{command}`` expands to the executor's command, one token per argument,
- other tokens are formatted with ``{image}`` (apptainer's ``{image_uri}``: ``docker://`` added
  unless the image is a local ``.sif`` file or already has a scheme such as ``oras://``).

The worker connects the engine process's stdin, stdout and stderr to the
executor's files (so a template needs ``-i`` to pass stdin through) and streams
them; templates never see those paths. Nothing passes through a shell.

``bwrap`` (bubblewrap), ``charliecloud`` (ch-run) and ``proot`` run the executor in the
task's real image, pulled into ``worker.image_cache`` by ``funnel_hpc.worker.images``
(imported only when one of them runs) and sandboxed by ``worker/sandbox.py``. An image
that cannot be had ends the task SYSTEM_ERROR, unless the admin set ``worker.host_root:
allow``: then the executor runs over the host's root, read-only, and the system logs say so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from funnel_hpc.worker import identity as identities
from funnel_hpc.worker import overlay_root, pid_namespace, sandbox, seccomp, subids
from funnel_hpc.worker.seccomp import FilterUnavailable

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any, Literal

    from funnel_hpc.core.config import WorkerConfig
    from funnel_hpc.worker.identity import Identity
    from funnel_hpc.worker.images import ImageRoot, Json
    from funnel_hpc.worker.subids import Subordinate

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_DRIVERS = ("bwrap", "charliecloud", "proot")
ENGINE_BINARY = {"bwrap": "bwrap", "charliecloud": "ch-run", "proot": "proot"}
DEBIAN_PACKAGE = {"bwrap": "bubblewrap", "charliecloud": "charliecloud-runtime", "proot": "proot"}
HOST_ROOT = "/"  # the "image" of a task run over the host root (worker.host_root: allow)
# Separators of "-v host:container[:options]" and "--bind a:b,c:d" bind lists.
BIND_SEPARATORS = (":", ",")
SANDBOX_TMP = "sandbox-tmp"  # proot's /tmp, in the task dir (never bound itself)
SANDBOX_SHM = "sandbox-shm"  # ch-run's and proot's /dev/shm, in the task dir
CH_ROOT = "ch-root-"  # ch-run's per-image root of symlinks, in the task dir
# The seccomp policy (worker/seccomp.py) each image driver runs under, and the program
# that installs it before exec'ing an engine that cannot install it itself.
SECCOMP_POLICY = {"bwrap": "default", "charliecloud": "charliecloud", "proot": "proot"}
SECCOMP_EXEC = str(Path(__file__).with_name("seccomp_exec.py"))
GPUS_RE = re.compile(r"[0-9]{1,3}|all")


class DriverError(RuntimeError):
    """The container runtime or the image is missing or unusable (a SYSTEM_ERROR)."""


class Invocation:
    """How to start one executor (a plain class: the worker starts without importing
    typing or dataclasses)."""

    __slots__ = ("argv", "cwd", "env", "fds", "hook", "ids", "note", "root")

    def __init__(self, argv: list[str], env: dict[str, str] | None, note: str,
                 ids: tuple[int, int] | None = None, cwd: str | None = None,
                 hook: identities.NamespaceMap | pid_namespace.ProotReaper | None = None,
                 fds: tuple[int, ...] = ()) -> None:
        self.argv = argv  # the runtime's command line
        self.env = env    # process environment; None: inherit
        self.note = note  # what to record in the system logs
        self.ids = ids    # (uid, gid) to start the runtime as; None: the worker's own
        self.cwd = cwd    # where to start it; None: the task dir
        self.hook = hook  # pass_fds, and started(proc) right after the start; None: none
        self.fds = fds    # descriptors the runtime inherits (a seccomp filter, bound
        #                   inputs: worker/bound_inputs.py); closed once it started
        self.root: overlay_root.OverlayRoot | None = None  # a copy-on-write root to
        #                   remove once the executor ended (worker/overlay_root.py)


def _expand(template: list[str], values: dict[str, str], mounts: list[tuple[str, str]],
            env: dict[str, str], workdir: str | None, command: list[str],
            spec: Json, gpus: str | None = None) -> list[str]:
    argv: list[str] = []
    for token in template:
        if token == "{gpu}":
            if gpus:
                argv += [t.format(gpus=gpus) for t in spec["gpu"]]
        elif token == "{volumes}":
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


def image_uri(image: str) -> str:
    """apptainer/singularity: a local .sif and scheme URIs (oras://, docker://, library://)
    pass through; a registry reference becomes docker://."""
    if "://" in image or (image.endswith(".sif") and image.startswith("/")):
        return image
    return "docker://" + image


class Drivers:
    def __init__(self, config: WorkerConfig, cache_dir: Path, owner: str | None = None,
                 tmpfs_bytes: int = sandbox.TMPFS_BYTES):
        self.worker = config.worker
        self.owner = owner  # the task's (task.json): whose registry credentials it may use
        self.tmpfs_bytes = tmpfs_bytes  # each tmpfs of a bwrap sandbox (worker/limits.py)
        self.work_dir = cache_dir
        self.cache_file = cache_dir / ".driver-probe.json"
        self.roots: dict[str, ImageRoot | str] = {}  # image -> images.ImageRoot, or HOST_ROOT
        self._identity: Identity | None | Literal[False] = False  # False: not taken yet
        self.task_dir = Path("/nonexistent")  # set by hand_over
        self.ch_roots: dict[str, str] = {}  # image root -> the task's ch-run root for it
        self.sandbox_tmp = self.task_dir  # proot's /tmp, set by hand_over
        self.sandbox_shm = self.task_dir  # ch-run's and proot's /dev/shm, set by hand_over
        self.host_root_reason = ""
        self.choice_notes: list[str] = []  # what choose() found, for the system logs
        self.filters: dict[str, str | FilterUnavailable] = {}  # policy -> cached BPF file
        self.fd_binds: list[tuple[int, str]] = []  # bwrap's --ro-bind-fd, set by hand_over
        self.cow_refused: dict[str, str] = {}  # image root -> why it has no writable root
        self.spares: overlay_root.Spares | None = None  # executors' roots made ahead
        self._subordinate: Subordinate | str | None = None  # None: not looked up yet
        self.subordinate_used = False  # a bwrap executor ran with the range mapped

    @property
    def identity(self) -> Identity | None:
        """The task's host identity (identity.py), taken on first use; None: the worker's."""
        if self._identity is False:
            try:
                self._identity = identities.acquire(self.worker)
            except (sandbox.SandboxError, OSError) as error:
                raise DriverError(f"sandbox identity: {error}") from None
        return self._identity

    @property
    def ids(self) -> tuple[int, int] | None:
        return self.identity.ids if self.identity else None

    def subordinate(self) -> Subordinate | str:
        """A non-root worker's subordinate id range (worker/subids.py), or why it has
        none; looked up once per task."""
        if self._subordinate is None:
            try:
                self._subordinate = subids.find(self.worker.sandbox_uids.subordinate)
            except sandbox.SandboxError as error:
                raise DriverError(str(error)) from None
        return self._subordinate

    def take_back(self, binds: list[tuple[str, str]]) -> None:
        """Once the executors ended: kill what is left of a slot's processes, and re-own
        the task's files and the sandbox's own to the worker (identity.Identity.take_back;
        a non-root worker's subordinate ids: subids.Subordinate.take_back)."""
        identity = self.identity if self._identity is not False else None
        found = self._subordinate
        if self.subordinate_used and found is not None and not isinstance(found, str):
            try:  # the whole files/ tree, which the worker made and no task can replace
                # (walking each bind's path could follow a link a task left above it)
                found.take_back([str(self.task_dir / "files")])
            except sandbox.SandboxError as error:
                raise DriverError(f"sandbox identity: {error}") from None
        if identity is None:
            return
        try:
            if identity.block:
                identities.sweep(identity.uid, identity.span)
            identity.take_back([host for host, _container in binds]
                               + [str(self.sandbox_tmp), str(self.sandbox_shm)])
        except (sandbox.SandboxError, OSError) as error:
            raise DriverError(f"sandbox identity: {error}") from None

    def release(self) -> None:
        """Give the task's slot back (at the task's very end; again: nothing), and let a
        subordinate user namespace go."""
        if isinstance(self._subordinate, subids.Subordinate):
            self._subordinate.close()
        if self._identity:
            try:
                self._identity.release()
            except (sandbox.SandboxError, OSError) as error:
                raise DriverError(f"sandbox identity: {error}") from None

    # ---- choosing ----

    def choose(self) -> str:
        """The driver for this task; what to say about the choice is left in choice_notes."""
        name = self.worker.container_driver
        if name != "auto":
            refused = self._refusal(name)
            if refused:
                raise DriverError(f"container driver {name}: {refused}")
            return name
        auto_order = self.worker.auto_order
        skipped: list[str] = []
        for candidate in auto_order:
            reason = "its probe failed here" if not self.works(candidate) else \
                self._refusal(candidate)
            if not reason:
                said = f"; skipped {'; '.join(skipped)}" if skipped else ""
                self.choice_notes.append(f"container driver auto: chose {candidate}{said}")
                return candidate
            skipped.append(f"{candidate} ({reason})")
        raise DriverError(f"no container driver works here (tried {'; '.join(skipped)})")

    def _refusal(self, name: str) -> str:
        """Why `name` may not run this task here, or "" (proot: without its seccomp filter,
        or for a task with an owner while executors share one host user)."""
        if name != "proot":
            return ""
        unavailable = self._filter("proot")
        if not isinstance(unavailable, FilterUnavailable):
            return self._proot_shared_refusal()
        if self.worker.allow_unfiltered_proot:
            self.choice_notes.append(f"driver proot WITHOUT a seccomp filter ({unavailable}): "
                                     "a task can reach the host's files as the sandbox user "
                                     "(worker.allow_unfiltered_proot is true)")
            return self._proot_shared_refusal()
        return (f"refused: {unavailable}, and proot without it lets a task read and write "
                "the host's files as the sandbox user (openat2, statx... are not translated); "
                "install libseccomp2 and pyseccomp, or set worker.allow_unfiltered_proot on "
                "a single-user node")

    def _proot_shared_refusal(self) -> str:
        """proot for a task with an owner (auth on: other users' tasks run on the node too)
        while executors share one host user: any process of that user (another task's under
        proot or ch-run, a daemon running as nobody) can SIGKILL this task's proot, and
        proot 5.1 (no PTRACE_O_EXITKILL) leaves its tracees running untraced, paths and all.
        The filter's guard stops only the task's own processes. Lifted by own uid per task
        (#25)."""
        if self.owner is None or self.identity is None or self.identity.block:
            return ""  # no other user's task, or not one shared user (a slot, the owner)
        return ("refused for a task with an owner (auth on): executors share one host user "
                f"({sandbox.user_name(self.ids)}), so another user's executor can kill this "
                "task's proot and its processes then run untraced, with the host's paths; "
                "use bwrap on a multi-user node")

    def _filter(self, policy: str) -> str | FilterUnavailable:
        """The cached path of a seccomp policy's filter, or why there is none (once)."""
        if policy not in self.filters:
            try:
                self.filters[policy] = seccomp.filter_file(str(self.work_dir), policy)
            except FilterUnavailable as error:
                self.filters[policy] = error
            except OSError as error:  # not even a memfd: a SYSTEM_ERROR
                raise DriverError(f"seccomp filter: {error}") from None
        return self.filters[policy]

    def works(self, name: str) -> bool:
        """Probe a driver once per hour per work dir (the answer is cached)."""
        cache: dict[str, Any] = {}
        try:
            cache = json.loads(self.cache_file.read_text())
        except (OSError, ValueError):
            pass
        hit = cache.get(name)
        if hit and time.time() - hit["at"] < 3600:
            cached: bool = hit["ok"]
            return cached
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
        """Does the engine really start a sandbox here (bwrap: a user namespace, as the
        sandbox user)?"""
        ids = None
        if name == "bwrap":
            argv = ["bwrap", "--unshare-user", "--unshare-pid", "--cap-drop", "ALL",
                    "--ro-bind", "/", "/", "--proc", "/proc", "true"]
            ids = self.ids
        elif name == "proot":  # in the pid namespace it will run in, as the sandbox user
            argv = pid_namespace.wrapper_argv(self.identity) + ["proot", "-r", "/", "true"]
        elif name == "charliecloud":  # ch-run needs an image to really start: its version
            argv = pid_namespace.wrapper_argv(self.identity) + ["ch-run", "--version"]
        else:
            spec = self.worker.drivers.get(name)
            if not isinstance(spec, dict) or not spec.get("probe"):
                return False
            argv = list(spec["probe"])
        if not shutil.which(ENGINE_BINARY.get(name, argv[0])):
            return False
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=60, cwd="/",
                                  **switch_user(ids)).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    # ---- images ----

    def prepare(self, name: str, images: list[str]) -> list[str]:
        """Have every image of the task before it starts (what to log about each). An image
        that cannot be had is a DriverError naming it and why, or the host root when
        worker.host_root is allow."""
        if name not in IMAGE_DRIVERS:
            return []
        try:
            sandbox.network_mode(self.worker.network)  # a config error before any pull
        except sandbox.SandboxError as error:
            raise DriverError(str(error)) from None
        notes = []
        for image in dict.fromkeys(images):
            root = self._root(image)
            if isinstance(root, str):  # HOST_ROOT
                notes.append(self._host_root_note(image))
            else:
                notes.append(f"image {image}: {root.reference}@{root.digest}")
        return notes

    def _root(self, image: str) -> ImageRoot | str:
        if image in self.roots:
            return self.roots[image]
        from funnel_hpc.worker import images as images_mod  # only image drivers need it

        root: ImageRoot | str
        try:
            root = images_mod.ensure_rootfs(
                image, self.image_cache(), self.worker.registries,
                self.worker.image_retry_seconds, self.worker.pull, owner=self.owner,
                limits=images_mod.Limits.from_worker(self.worker))
        except images_mod.ImageError as error:
            if self.worker.host_root != "allow":
                raise DriverError(f"{error} ({error.reason})") from None
            self.host_root_reason = str(error)
            root = HOST_ROOT
        except ValueError as error:  # a bad worker.pull, image_* limit or registries entry
            raise DriverError(str(error)) from None
        self.roots[image] = root
        return root

    def image_cache(self) -> str:
        return self.worker.image_cache or str(self.work_dir / "image-cache")

    def _host_root_note(self, image: str) -> str:
        return (f"image {image} cannot be had ({self.host_root_reason}); running over the "
                "HOST ROOT (read-only) because worker.host_root is allow")

    def hand_over(self, name: str, task_dir: Path, binds: list[tuple[str, str]],
                  fd_binds: Sequence[tuple[int, str]] = ()) -> None:
        """Let the sandbox user use the task's bound directories and the images' roots.
        fd_binds: (descriptor, container path) of inputs bwrap binds read-only
        (worker/bound_inputs.py), held open by the caller until the executors ended."""
        self.fd_binds = list(fd_binds)
        if name not in IMAGE_DRIVERS:
            return
        bound = [host for host, _container in binds]
        self.task_dir = task_dir
        self.sandbox_tmp = task_dir / SANDBOX_TMP
        self.sandbox_shm = task_dir / SANDBOX_SHM
        if name == "proot":
            self.sandbox_tmp.mkdir(mode=0o700, exist_ok=True)
            bound.append(str(self.sandbox_tmp))
        if name != "bwrap":  # bwrap's /dev/shm is on its own private /dev
            self.sandbox_shm.mkdir(mode=0o700, exist_ok=True)
            bound.append(str(self.sandbox_shm))
        readable = [str(root.rootfs) for root in self.roots.values()
                    if not isinstance(root, str)]  # not HOST_ROOT
        try:
            sandbox.prepare_host(self.ids, str(task_dir / "files"), bound, readable)
        except sandbox.SandboxError as error:
            raise DriverError(str(error)) from None

    # ---- building the command ----

    def invocation(self, name: str, image: str, command: list[str], env: dict[str, str],
                   workdir: str | None, binds: list[tuple[str, str]],
                   gpus: str | None = None) -> Invocation:
        """gpus: the task's backend_parameters.gpus (a count or "all"), None for none."""
        if gpus is not None and not GPUS_RE.fullmatch(str(gpus)):
            raise DriverError(f"backend_parameters.gpus must be a count or 'all', not {gpus!r}")
        if name in IMAGE_DRIVERS:
            if not shutil.which(ENGINE_BINARY[name]):
                raise DriverError(f"container driver {name!r}: {ENGINE_BINARY[name]} not "
                                  f"found (Debian: {DEBIAN_PACKAGE[name]})")
            try:
                return self._sandboxed(name, image, command, env, workdir, binds, gpus)
            except sandbox.SandboxError as error:
                raise DriverError(str(error)) from None
        spec = self.worker.drivers.get(name)
        if not isinstance(spec, dict) or not spec.get("run"):
            raise DriverError(f"unknown container driver {name!r}")
        if not shutil.which(spec["run"][0]):
            raise DriverError(f"container driver {name!r}: {spec['run'][0]} not found")
        if gpus and ("{gpu}" not in spec["run"] or not spec.get("gpu")):
            raise DriverError(f"the task asks for GPUs but worker.drivers.{name} has no "
                              "gpu flags ({gpu} in run, and gpu)")
        _check_bind_paths(name, binds)
        network = sandbox.network_mode(self.worker.network)
        argv = _expand(spec["run"], {"image": image, "image_uri": image_uri(image),
                                     "network": network}, binds, env, workdir, command,
                       spec, gpus)
        return Invocation(argv, None, f"driver {name}: image {image}"
                          + (f", gpus {gpus}" if gpus else ""))

    def _sandboxed(self, name: str, image: str, command: list[str], env: dict[str, str],
                   workdir: str | None, binds: list[tuple[str, str]],
                   gpus: str | None) -> Invocation:
        network, devices = self._check_sandbox(name, command, binds, gpus)
        root = self._root(image)  # after every check of the config and the task
        who = f"host uid {self.ids[0]}" if self.ids else f"the worker's uid {os.geteuid()}"
        subordinate: Subordinate | None = None
        if self.identity and self.identity.block and name == "bwrap":
            who += f" (ids 0-{self.identity.span - 1} inside)"
        elif self.identity is None and name == "bwrap":  # a worker that is not root
            found = self.subordinate()
            if not isinstance(found, str):
                try:
                    found.namespace()  # made once per task
                except (OSError, sandbox.SandboxError) as error:
                    found = self._subordinate = f"cannot map the range: {error}"
            if isinstance(found, str):
                who += f" (root only inside: no id range: {found})"
            else:
                subordinate = found
                who += f" ({found.describe()})"
        note = f"driver {name}: sandboxed as {who}, network {network}"
        config: Json
        if isinstance(root, str):  # HOST_ROOT
            rootfs, config = "/", {}
            note += ", over the HOST ROOT (worker.host_root: allow)"
        else:
            rootfs, config = str(root.rootfs), root.config
        full_env = _image_env(config)
        full_env.update(env)
        workdir = workdir or config.get("WorkingDir") or None
        # hide the work dir (other tasks, the image cache) when the root is the host's
        hide = [str(self.work_dir.resolve())] if root == HOST_ROOT else []
        if name == "bwrap":
            cow, why_not = self._writable_root(root, subordinate)
            note += f", {overlay_root.NOTE}" if cow else f", image root: read-only ({why_not})"
            userns = (identities.NamespaceMap(self.identity, cow)
                      if self.identity and self.identity.block else
                      # a non-root worker's copy-on-write root: a namespace of the
                      # sandbox's own, mapped as the task's while bwrap waits
                      identities.NamespaceMap(subordinate, cow) if subordinate and cow
                      else None)
            # its own copy, closed once bwrap has it
            joined = self._joined(subordinate) if userns is None else -1
            # each start gets its own copies of the bound inputs' descriptors (closed once
            # bwrap has them, as the seccomp filter's), so they reach it at these numbers
            copies = tuple(os.dup(fd) for fd, _container in self.fd_binds)
            try:
                argv = sandbox.bwrap_argv(
                    rootfs, binds, full_env, workdir, command, network, hide, devices,
                    userns.argv() if userns else
                    subordinate.join_argv(joined) if subordinate else (),
                    tmpfs_bytes=self.tmpfs_bytes,
                    fd_binds=[(fd, container) for fd, (_held, container)
                              in zip(copies, self.fd_binds, strict=True)],
                    root=cow.merged if cow else None,
                    unshare_user=subordinate is None or userns is not None)
                # the engine's own environment: nothing of the task's (LD_PRELOAD...)
                inv = self._filtered(name, Invocation(argv, {"PATH": DEFAULT_PATH}, note,
                                                      self.ids, "/", userns))
            except BaseException:
                for fd in copies + ((joined,) if joined >= 0 else ()):
                    os.close(fd)
                if cow:
                    cow.remove()
                raise
            inv.fds = (*inv.fds, *copies, *((joined,) if joined >= 0 else ()))
            inv.root = cow
            if copies:
                inv.note += f", {len(copies)} input(s) bound read-only in place"
            return inv
        # ch-run and proot: a private /dev/shm, and a pid namespace the wrapper drops in
        binds = [*binds, (str(self.sandbox_shm), "/dev/shm")]
        if name == "charliecloud":
            argv = sandbox.charliecloud_argv(self._ch_root(rootfs, binds), rootfs, binds,
                                             full_env, workdir, command)
            engine_env = {"PATH": DEFAULT_PATH, "USER": sandbox.user_name(self.ids)}
            init = ["/bin/sh", "-c", '"$@"; exit $?', "sh"]
            hook = None
        else:
            argv = sandbox.proot_argv(rootfs, binds, full_env, workdir, command,
                                      str(self.sandbox_tmp), hide)
            engine_env, init, hook = {"PATH": DEFAULT_PATH}, [], pid_namespace.ProotReaper()
        inv = self._filtered(name, Invocation(argv, engine_env, note, self.ids, "/"))
        # seccomp_exec, when it runs, drops to the task's ids itself: the wrapper stays root
        wrapper = pid_namespace.wrapper_argv(self.identity, drop=not inv.fds)
        return Invocation(wrapper + init + inv.argv, inv.env, inv.note, None, "/", hook,
                          inv.fds)

    def _filtered(self, name: str, invocation: Invocation) -> Invocation:
        """The invocation under the driver's seccomp filter: bwrap installs it itself
        (--seccomp FD, after its own set-up); proot and ch-run start under seccomp_exec,
        which installs it and becomes the sandbox user before exec'ing them."""
        policy = SECCOMP_POLICY[name]
        path = self._filter(policy)
        if isinstance(path, FilterUnavailable):
            refused = self._refusal(name)
            if refused:
                raise DriverError(f"container driver {name}: {refused}")
            invocation.note += f", NO seccomp filter ({path})"
            return invocation
        fd = seccomp.open_path(path)
        invocation.fds = (fd,)
        invocation.note += f", seccomp {policy}"
        if name == "bwrap":
            at = invocation.argv.index("bwrap") + 1
            invocation.argv[at:at] = ["--seccomp", str(fd)]
            return invocation
        uid, gid = (str(i) for i in invocation.ids) if invocation.ids else ("-", "-")
        guard = "proot" if name == "proot" else "-"
        invocation.argv = [sys.executable, "-I", "-S", SECCOMP_EXEC, str(fd), uid, gid, guard,
                           "--", *invocation.argv]
        invocation.ids = None  # seccomp_exec becomes the sandbox user itself
        return invocation

    def _writable_root(self, root: ImageRoot | str, subordinate: Subordinate | None = None
                       ) -> tuple[overlay_root.OverlayRoot | None, str]:
        """worker.writable_root for a bwrap executor over this image: its copy-on-write
        root (made, not yet mounted), or None and why not (the image is then read-only).
        A non-root worker's needs its subordinate range (`subordinate`)."""
        try:
            mode = overlay_root.setting(self.worker.writable_root)
        except sandbox.SandboxError as error:
            raise DriverError(str(error)) from None
        if mode == "off":
            return None, f"{overlay_root.SETTING} is off"
        if isinstance(root, str):  # HOST_ROOT
            return None, "the host's root is never written"
        if os.geteuid() != 0 and subordinate is not None:
            return self._own_writable_root(str(root.rootfs), subordinate)
        if os.geteuid() != 0 or self.identity is None or not self.identity.block:
            return None, (f"{overlay_root.SETTING} needs a root worker with "
                          "worker.sandbox_uids, or a worker with a subordinate id range "
                          f"({subids.SETTING})")
        rootfs = str(root.rootfs)
        if rootfs not in self.cow_refused:  # asked once per task and image
            try:
                overlay_root.probe(str(self.task_dir), rootfs, self.identity.ids)
                self.cow_refused[rootfs] = ""
            except overlay_root.Unusable as why:
                self.cow_refused[rootfs] = f"no copy-on-write root here: {why}"
        if self.cow_refused[rootfs]:
            return None, self.cow_refused[rootfs]
        if self.spares is None:
            self.spares = overlay_root.Spares(str(self.task_dir), self.identity.ids)
        try:
            return self.spares.take(rootfs), ""
        except (OSError, sandbox.SandboxError) as error:
            raise DriverError(f"{overlay_root.SETTING}: {error}") from None

    def _own_writable_root(self, rootfs: str, subordinate: Subordinate
                           ) -> tuple[overlay_root.OverlayRoot | None, str]:
        """A non-root worker's copy-on-write root (overlay_root: mounted from the
        sandbox's user namespace, mapped as the task's), or None and why not."""
        if rootfs not in self.cow_refused:  # asked once per task and image
            try:
                overlay_root.probe_own(str(self.task_dir), rootfs, subordinate.write_maps)
                self.cow_refused[rootfs] = ""
            except overlay_root.Unusable as why:
                self.cow_refused[rootfs] = f"no copy-on-write root here: {why}"
        if self.cow_refused[rootfs]:
            return None, self.cow_refused[rootfs]
        try:
            cow = overlay_root.OverlayRoot.make(str(self.task_dir), rootfs,
                                                (os.geteuid(), os.getegid()), own=True)
        except (OSError, sandbox.SandboxError) as error:
            raise DriverError(f"{overlay_root.SETTING}: {error}") from None
        cow.take_back = subordinate.take_back
        self.subordinate_used = True  # the task's files get re-owned at its end
        return cow, ""

    def _joined(self, subordinate: Subordinate | None) -> int:
        """A copy of the task's subordinate user namespace's descriptor for one bwrap
        (made on first use), or -1 for none."""
        if subordinate is None:
            return -1
        self.subordinate_used = True
        return os.dup(subordinate.namespace())

    def drop_spares(self) -> list[str]:
        """Remove the copy-on-write roots made ahead (once the executors ended)."""
        return self.spares.drop() if self.spares is not None else []

    def _ch_root(self, rootfs: str, binds: list[tuple[str, str]]) -> str:
        """The task's ch-run root for this image (made once per task and image)."""
        if rootfs not in self.ch_roots:
            skeleton = str(self.task_dir / f"{CH_ROOT}{len(self.ch_roots)}")
            shutil.rmtree(skeleton, ignore_errors=True)  # left by an earlier attempt
            sandbox.charliecloud_root(skeleton, rootfs, [c for _h, c in binds],
                                      frozenset(c for h, c in binds if not os.path.isdir(h)))
            if self.ids:
                sandbox.grant_traverse(skeleton, *self.ids)
            self.ch_roots[rootfs] = skeleton
        return self.ch_roots[rootfs]

    def _check_sandbox(self, name: str, command: list[str], binds: list[tuple[str, str]],
                       gpus: str | None) -> tuple[str, list[str]]:
        """What can be refused before pulling: the network mode and GPUs this driver cannot
        give, and (proot) words its command line syntax cannot carry."""
        network = sandbox.network_mode(self.worker.network)
        devices = list(self.worker.gpu_devices) if gpus else []
        if gpus and (name != "bwrap" or not devices):
            raise DriverError(f"the task asks for GPUs: driver {name} gives them only as bwrap "
                              "with worker.gpu_devices set")
        if name == "charliecloud":
            _check_bind_paths(name, binds)
        if name != "bwrap" and network == "none":
            raise DriverError(f"driver {name} cannot isolate the network "
                              "(worker.network: none needs bwrap)")
        if name == "proot":
            _check_bind_paths(name, binds)
            # proot has no "--": the command starts at the first non-option word
            if command and command[0].startswith("-"):
                raise DriverError(f"driver proot: a command may not start with '-': "
                                  f"{command[0]!r}")
        return network, devices


def _image_env(config: Json) -> dict[str, str]:
    """The image config's Env (PATH always set; HOME /tmp, a tmpfs, unless the image says)."""
    from funnel_hpc.worker.images import env_from_config

    env = env_from_config(config)
    env.setdefault("HOME", "/tmp")
    return env


def switch_user(ids: tuple[int, int] | None) -> dict[str, Any]:
    """Popen arguments that start a process as (uid, gid) with no supplementary groups."""
    if ids is None:
        return {}
    return {"user": ids[0], "group": ids[1], "extra_groups": []}


def _check_bind_paths(driver: str, binds: list[tuple[str, str]]) -> None:
    """A ':' or ',' in a path would let it add options or other binds to the engine's
    bind syntax (e.g. apptainer's comma-separated --bind list): refuse it."""
    for host, container in binds:
        for path in (host, container):
            if any(sep in path for sep in BIND_SEPARATORS):
                raise DriverError(f"driver {driver}: path {path!r} has ':' or ',', which "
                                  "this driver's bind syntax cannot carry")
