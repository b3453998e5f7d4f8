"""The executor sandbox: who an executor runs as on the host; bwrap's, proot's, ch-run's argv.

Contract: an executor never runs with host privileges. A worker running as root starts the
engine as `worker.sandbox_user` (never root; `nobody` by default) with no supplementary
groups; bwrap then puts it in new user, pid, ipc, uts and cgroup namespaces (and a new
network namespace when `worker.network: none`), maps it to uid 0 *inside* with every
capability dropped, and builds its root from the image: each top-level entry bound
read-only over bwrap's own tmpfs root (so mount points can be made without touching the
shared image; bwrap 0.8 has no --overlay), fresh tmpfs on /tmp, /run and /var/tmp, a
private /proc and a minimal /dev. Only the task's own input/output/volume directories are
bound, read-write; the task directory itself (token, task.json, events) never is.

Cost: building the argv lists the image's top-level directory (and the directories on the
way to a bind that the image does not have); `prepare_host` stats each ancestor of a bound
path once and walks the task's files/ tree once to hand it to the sandbox user.
"""

from __future__ import annotations

import os
import stat
import struct

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Sequence

# Image entries the sandbox provides itself instead of binding the image's.
SANDBOX_OWNED = ("dev", "proc", "sys", "tmp", "run")
TMPFS = ("/tmp", "/run")
TMPFS_BYTES = 1 << 30  # worker.tmpfs_mb's default: never the kernel's half of the host's RAM
PROOT_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
# proot 5.1 exits with the status of the last traced process that exited normally, so a
# command killed by a signal after any child of it ended read as that child's code (0).
# The image's own sh runs it and exits as shells do (128+N); the command's words are sh's
# positional parameters, never parsed ("; exit $?": no exec in place of the wait).
PROOT_WAITER = ("/bin/sh", "-c", '"$@"; exit $?', "sh")
NETWORK_MODES = ("host", "none")
ACL_XATTR = "system.posix_acl_access"
# POSIX ACL xattr format (linux/posix_acl_xattr.h): version 2, then (tag, perm, id) entries.
ACL_VERSION = 2
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF
ACL_ENTRY = struct.Struct("<HHI")


class SandboxError(RuntimeError):
    """The sandbox cannot be set up as configured (a SYSTEM_ERROR)."""


def sandbox_ids(name: str) -> tuple[int, int] | None:
    """(uid, gid) the engine runs as (`name`: worker.sandbox_user, a name or a uid), or None
    when the worker is not root (nothing to drop)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError):
        raise SandboxError(f"worker.sandbox_user {name!r} is not a user on this node") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise SandboxError(f"worker.sandbox_user {name!r} is root: executors never run as root")
    return entry.pw_uid, entry.pw_gid


def user_name(ids: tuple[int, int] | None) -> str:
    """The name of the user engines run as ($USER for ch-run, which needs it)."""
    import pwd

    uid = ids[0] if ids else os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def network_mode(mode: str) -> str:
    """worker.network, checked."""
    if mode not in NETWORK_MODES:
        raise SandboxError(f"worker.network must be one of {NETWORK_MODES}, not {mode!r}")
    return mode


# ---- the host side: what the sandbox user may reach ----

def prepare_host(ids: tuple[int, int] | None, files_dir: str, bound: list[str],
                 readable: list[str]) -> None:
    """Let the sandbox user reach `bound` (the task's directories, handed over whole: the
    sandbox writes there) and `readable` (the image root), and nothing else of the task."""
    if ids is None:
        return
    uid, gid = ids
    for path in bound + readable:
        grant_traverse(path, uid, gid)
    for path in bound:
        give_tree(path, uid, gid)


def grant_traverse(path: str, uid: int, gid: int) -> None:
    """Make every directory above `path` searchable (x only, no listing) by uid, through a
    POSIX ACL entry where its mode does not already allow it (pytest's and Slurm's 0700
    dirs): bwrap resolves bind sources as the sandbox user."""
    parts = os.path.abspath(path).split("/")[1:-1]
    current = ""
    for part in parts:
        current += "/" + part
        info = os.stat(current)
        if _mode_allows_search(info, uid, gid):
            continue
        try:
            _add_acl_search(current, info.st_mode, uid)
        except OSError as error:  # e.g. a file system without ACLs
            raise SandboxError(f"cannot let the sandbox user (uid {uid}) reach {path}: "
                               f"{current}: {error.strerror}") from None


def _mode_allows_search(info: os.stat_result, uid: int, gid: int) -> bool:
    if info.st_uid == uid:
        return bool(info.st_mode & 0o100)
    if info.st_gid == gid:
        return bool(info.st_mode & 0o010)
    return bool(info.st_mode & 0o001)


def _add_acl_search(path: str, mode: int, uid: int) -> None:
    try:
        raw = os.getxattr(path, ACL_XATTR, follow_symlinks=False)
        entries = [ACL_ENTRY.unpack_from(raw, 4 + i * ACL_ENTRY.size)
                   for i in range((len(raw) - 4) // ACL_ENTRY.size)]
    except OSError:
        entries = []
    if not entries:
        entries = [(ACL_USER_OBJ, (mode >> 6) & 7, ACL_UNDEFINED_ID),
                   (ACL_GROUP_OBJ, (mode >> 3) & 7, ACL_UNDEFINED_ID),
                   (ACL_OTHER, mode & 7, ACL_UNDEFINED_ID)]
    users = {e[2]: e for e in entries if e[0] == ACL_USER}
    perm = users[uid][1] | 1 if uid in users else 1
    entries = [e for e in entries if not (e[0] == ACL_USER and e[2] == uid) and e[0] != ACL_MASK]
    group = next(e[1] for e in entries if e[0] == ACL_GROUP_OBJ)
    named = [e[1] for e in entries if e[0] in (ACL_USER,)] + [perm]
    mask = group | 1
    for bits in named:
        mask |= bits
    entries += [(ACL_USER, perm, uid), (ACL_MASK, mask, ACL_UNDEFINED_ID)]
    entries.sort(key=lambda e: (e[0], e[2]))
    data = struct.pack("<I", ACL_VERSION) + b"".join(ACL_ENTRY.pack(*e) for e in entries)
    os.setxattr(path, ACL_XATTR, data, follow_symlinks=False)


def give_tree(root: str, uid: int, gid: int) -> None:
    """chown a tree the worker made for the sandbox (never following a symlink). A file with
    other hard links (worker.link_inputs) is left alone: its inode is the user's original,
    also when the tree is that one file (an input bound alone, directly under /)."""
    info = os.lstat(root)
    if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
        return
    os.lchown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
                continue
            os.lchown(path, uid, gid)


# ---- bwrap ----

def bwrap_argv(rootfs: str, binds: list[tuple[str, str]], env: dict[str, str],
               workdir: str | None, command: list[str], network: str,
               hide: Sequence[str] = (), devices: Sequence[str] = (),
               userns: Sequence[str] = (), tmpfs_bytes: int = TMPFS_BYTES,
               fd_binds: Sequence[tuple[int, str]] = (), root: str | None = None,
               unshare_user: bool = True) -> list[str]:
    """`hide`: host directories to cover with an empty tmpfs (over the host root);
    `devices`: host device nodes to bind (a task's GPUs); `userns`: options of a whole id
    range mapped by the worker (identity.NamespaceMap.argv: after --cap-drop ALL);
    `tmpfs_bytes`: the size of every tmpfs the task can write (/tmp, /run, /var/tmp,
    /dev/shm) and of the root the image's entries are bound on (writable, as the spec's
    "writable on top" asks). bwrap's own /dev tmpfs cannot be sized: it is made read-only
    once everything is mounted on it. `fd_binds`: (descriptor, container path) of inputs
    bound read-only by descriptor over the task's binds (worker/bound_inputs.py). `root`: a
    copy-on-write root bound as `/` instead (worker/overlay_root.py: the image is its lower
    layer, mounted in bwrap's own namespace before it reads its mounts). `unshare_user`
    False: `userns` joins an existing user namespace (--userns FD, worker/subids.py)."""
    argv = ["bwrap", *(["--unshare-user"] if unshare_user else []), "--uid", "0", "--gid",
            "0", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if network == "none":
        argv.append("--unshare-net")
    argv += ["--die-with-parent", "--new-session", "--cap-drop", "ALL", *userns,
             "--hostname", "funnel-task"]
    targets = [container for _host, container in binds] + list(TMPFS)
    if os.path.isdir(os.path.join(rootfs, "var")):
        targets.append("/var/tmp")
    size = ["--size", str(tmpfs_bytes)]
    if root is not None:
        argv += ["--bind", root, "/"]
    else:
        argv += [*size, "--tmpfs", "/"]  # bwrap's own root is unsized: a sized one over it
        argv += image_binds(rootfs, targets)
    argv += ["--dev", "/dev", "--proc", "/proc", *size, "--perms", "1777", "--tmpfs", "/dev/shm"]
    for path in [*targets[len(binds):], *hide]:
        argv += [*size, "--tmpfs", path]
    for device in devices:
        argv += ["--dev-bind", device, device]
    for host, container in binds:
        argv += ["--bind", host, container]
    for fd, container in fd_binds:  # after the binds: each lies over its placeholder
        argv += ["--ro-bind-fd", str(fd), container]
    argv += ["--remount-ro", "/dev"]  # bwrap's /dev tmpfs is unsized: nothing to write
    argv.append("--clearenv")
    for name, value in env.items():
        argv += ["--setenv", name, value]
    if workdir:
        argv += ["--chdir", workdir]
    return argv + ["--", *command]


def image_binds(rootfs: str, targets: list[str], inside: str = "/") -> list[str]:
    """Read-only binds of the image's entries under `inside`. A directory a target lies in
    but that does not hold the target's path is not bound whole: it becomes a directory on
    bwrap's tmpfs root whose own entries are bound one by one, so the mount point can be
    made without writing to the image."""
    host_dir = os.path.join(rootfs, inside.lstrip("/"))
    argv: list[str] = []
    for name in sorted(os.listdir(host_dir)):
        path = inside.rstrip("/") + "/" + name
        if inside == "/" and name in SANDBOX_OWNED:
            continue
        host = os.path.join(host_dir, name)
        if os.path.islink(host):
            argv += ["--symlink", os.readlink(host), path]
        elif not os.path.isdir(host):
            argv += ["--ro-bind", host, path]
        elif any(_needs_split(rootfs, path, target) for target in targets):
            argv += ["--dir", path] + image_binds(rootfs, targets, path)
        else:
            argv += ["--ro-bind", host, path]
    return argv


def _needs_split(rootfs: str, directory: str, target: str) -> bool:
    """True when `target` lies below `directory` but its path is not all real directories
    of the image (so bwrap could not make the mount point inside a read-only bind)."""
    if not target.startswith(directory + "/"):
        return False
    host = os.path.join(rootfs, target.lstrip("/"))
    current = rootfs
    for part in target.lstrip("/").split("/"):
        current = os.path.join(current, part)
        if os.path.islink(current) or not os.path.isdir(current):
            return True
    return not os.path.isdir(host)


# ---- proot ----

def proot_argv(rootfs: str, binds: list[tuple[str, str]], env: dict[str, str],
               workdir: str | None, command: list[str], tmp_dir: str,
               hide: Sequence[str] = ()) -> list[str]:
    """proot over the image with only the task's binds (`-r`, not `-R`: no host /proc, /tmp,
    /dev, home...). proot itself runs with a clean host environment; the executor's is set
    inside by the image's own `env -i`, so LD_PRELOAD and friends never reach proot."""
    env_tool = next((p for p in ("/usr/bin/env", "/bin/env")
                     if os.path.exists(os.path.join(rootfs, p.lstrip("/")))
                     or os.path.islink(os.path.join(rootfs, p.lstrip("/")))), None)
    if env_tool is None:
        raise SandboxError("driver proot: the image has no env program (/usr/bin/env or "
                           "/bin/env) to set the executor's environment with")
    argv = ["proot", "-r", rootfs, "-b", f"{tmp_dir}:/tmp"]
    argv += [arg for device in PROOT_DEVICES for arg in ("-b", device)]
    argv += [arg for path in hide for arg in ("-b", f"{tmp_dir}:{path}")]
    for host, container in binds:
        argv += ["-b", f"{host}:{container}"]
    if command and "=" in command[0]:
        raise SandboxError(f"driver proot: a command may not start with a word holding '=' "
                           f"({command[0]!r}): env would take it for a variable")
    argv += ["-w", workdir or "/", env_tool, "-i"]
    argv += [f"{name}={value}" for name, value in env.items()]
    shell = os.path.join(rootfs, PROOT_WAITER[0].lstrip("/"))
    waiter = list(PROOT_WAITER) if os.path.exists(shell) or os.path.islink(shell) else []
    return argv + waiter + list(command)


# ---- charliecloud ----

def charliecloud_root(skeleton: str, rootfs: str, targets: list[str],
                      files: frozenset[str] = frozenset()) -> None:
    """A per-task root for ch-run, which (0.31) needs every mount point to exist in the image
    and mounts the image read-only: empty directories for /dev, /proc, /sys, /tmp, the task's
    binds (empty files for those in `files`) and the image's own path, and for every image
    entry a symlink to it at that path
    (bound read-only-by-ownership at the same path inside). Directories a bind lies in but
    the image lacks are made real and filled the same way, as in `image_binds`."""
    os.mkdir(skeleton, 0o755)
    for path in ("dev", "proc", "sys", "tmp", rootfs.lstrip("/")):
        os.makedirs(os.path.join(skeleton, path), 0o755, exist_ok=True)
    _link_entries(skeleton, rootfs, "/", targets)
    for target in targets:
        here = os.path.join(skeleton, target.lstrip("/"))
        if target in files:  # a file bound alone (directly under /): an empty file
            os.close(os.open(here, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
        else:
            os.makedirs(here, 0o755, exist_ok=True)


def _link_entries(skeleton: str, rootfs: str, inside: str, targets: list[str]) -> None:
    host_dir = os.path.join(rootfs, inside.lstrip("/"))
    for name in sorted(os.listdir(host_dir)):
        path = inside.rstrip("/") + "/" + name
        here = os.path.join(skeleton, path.lstrip("/"))
        if inside == "/" and name in SANDBOX_OWNED:
            continue
        host = os.path.join(host_dir, name)
        if os.path.islink(host):
            os.symlink(os.readlink(host), here)
        elif os.path.isdir(host) and any(_needs_split(rootfs, path, t) for t in targets):
            os.mkdir(here, 0o755)
            _link_entries(skeleton, rootfs, path, targets)
        else:
            os.symlink(host, here)


def charliecloud_argv(skeleton: str, rootfs: str, binds: list[tuple[str, str]],
                      env: dict[str, str], workdir: str | None,
                      command: list[str]) -> list[str]:
    """ch-run over `charliecloud_root`: its own user and mount namespaces, a private /tmp,
    no /etc/passwd from the host, the executor's environment only (set inside)."""
    argv = ["ch-run", "--no-passwd", "--private-tmp", "-b", f"{rootfs}:{rootfs}"]
    for host, container in binds:
        argv += ["-b", f"{host}:{container}"]
    argv += ["--unset-env=*", "--env-no-expand"]
    argv += [f"--set-env={name}={value}" for name, value in env.items()]
    if workdir:
        argv += ["-c", workdir]
    return argv + [skeleton, "--", *command]
