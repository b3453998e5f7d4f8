"""worker.writable_root: a copy-on-write image root for bwrap executors with a uid block.

Contract. With a root worker, `worker.sandbox_uids` and bwrap, each executor's `/` is an
overlay: the cached image below, read-only and never written, an upper directory of the
executor's own on the task's disk above, so `useradd`, `dpkg -i`, `rm /bin/ls` work as in a
fresh container and change nothing another executor sees. The image's files are owned by
host ids (root, mostly), which the sandbox's user namespace does not map; so the lower
layer is an ID-MAPPED detached tree of the image (open_tree + mount_setattr(MOUNT_ATTR_IDMAP)
with a user namespace mapped as the slot): host id k of the image shows as id k inside
(root as root), stored as the slot's id base + k when copied up.

The overlay is made DETACHED (fsopen/fsconfig/fsmount: attached nowhere, gone when its
descriptor closes) and attached only in the MOUNT NAMESPACE OF THE SANDBOX ITSELF (bwrap's
child, owned by its user namespace, so its mounts are slaves of the host's and nothing
propagates back) by the worker's mounting thread (_Mounter: its own root and cwd, so it
alone joins that namespace with setns, and goes back), while bwrap waits for its id maps
(--userns-block-fd); bwrap then binds the overlay as its new `/`. It never exists in the
worker's or the host's namespace and goes with the sandbox's last process, however the
worker ends (kill -9 included): there is nothing to unmount.

A worker that is NOT root, with a subordinate id range (worker/subids.py), gets the same
root another way (OverlayRoot.own): its files, the cached image's included, belong to its
uid, which is root inside, so no id-mapped tree is needed; but overlayfs is mounted only
by a process with CAP_SYS_ADMIN in the user namespace owning the mount namespace, which
for a non-root worker means joining that user namespace, and a threaded process cannot.
So such a sandbox gets a user namespace of its own (--unshare-user, mapped as the task's
by newuidmap/newgidmap while bwrap waits, instead of joining the task's with --userns,
whose bwrap cannot wait), and a FORKED single-threaded helper per executor
(_mount_as_owner) joins its user namespace (the worker's uid is root there, with every
capability), then its mount namespace, opens the image and the executor's directory
again there (O_NOFOLLOW, checked by inode), makes the overlay (userxattr, volatile;
Linux 5.11+) and attaches it at `merged`, then exits. The upper layer's entries of
subordinate ids (`useradd -m`) are re-owned (subids.Subordinate.take_back) and its
directories opened up (_open_up: overlay's work/work is 0000) before removal. Measured:
see docs/admin.md.

On disk: `<task dir>/sandbox-root/<random>/{merged,upper,work}` per executor: root's 0700
but `upper` (the slot's base id's) and the two directories on the way to `merged` (root's,
the slot's group, 0710: bwrap resolves `merged` as the slot; an ACL entry above them, as
for its binds). The overlay's layers are named through a descriptor of the executor's
directory opened O_NOFOLLOW and checked by inode; the mounting thread opens it again inside
the namespace and checks it is the same inode before attaching at its `merged`. The upper
counts against disk_gb (the disk walk covers sandbox-root) and is removed, relative to
descriptors, once the executor ended.

Cost per executor (measured, benchmarks/sandbox_start.py): the next executor's directories
and detached overlay are made ahead over the last image, by the thread that removes the
ended executor's (Spares, Removals), so a start attaches it: a request to the mounting
thread, setns there and back, one open and one move_mount (~0.1-0.2 ms). A start over
another image makes its own (three mkdirs, the id-mapped tree, the overlay: ~0.7 ms).
Once per task and image, the probe (a fork that makes a user namespace, and the same
mounts in it: ~6 ms).
"""
from __future__ import annotations

import errno
import os
import stat

from funnel_hpc.worker.sandbox import SandboxError, grant_traverse
from funnel_hpc.worker.standin import CLONE_NEWUSER, StandIn, UnshareFailed

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

SETTING = "worker.writable_root"
MODES = ("auto", "off")
ROOTS = "sandbox-root"  # in the task dir (or its scratch): one directory per executor
LAYERS = ("merged", "upper", "work")
# What a trivial executor leaves (a volatile overlay's work dir), removed deepest first
# by one rmdir or unlink each before anything walks the tree (_quick_remove).
LEFT = (("work/work/incompat/volatile/dirty", False), ("work/work/incompat/volatile", True),
        ("work/work/incompat", True), ("work/work", True), ("work", True), ("upper", True),
        ("merged", True))
NOTE = "image root: copy-on-write"
# Syscall numbers: the mount API calls came after 5.0, when every architecture took the same
# numbers (x86_64 and aarch64 alike; asm-generic/unistd.h, arch/x86/.../syscall_64.tbl).
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 430, 431, 432
FSOPEN_CLOEXEC, FSMOUNT_CLOEXEC = 1, 1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
ARCHES = ("x86_64", "aarch64")
AT_FDCWD = -100
AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW, AT_RECURSIVE = 0x1000, 0x100, 0x8000
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, 0o2000000
MOVE_MOUNT_F_EMPTY_PATH = 4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
MOUNT_ATTR_IDMAP = 0x100000
MS_NOSUID, MS_NODEV = 0x2, 0x4
CLONE_FS, CLONE_NEWNS = 0x00000200, 0x00020000


class Unusable(Exception):
    """A copy-on-write root cannot be had here (why, for the system logs)."""


def setting(value: str) -> str:
    """worker.writable_root, checked."""
    if value not in MODES:
        raise SandboxError(f"{SETTING} must be one of {', '.join(MODES)}, not {value!r}")
    return value


class _Kernel:
    """libc's entry points, resolved before any fork (dlsym in a forked child of a threaded
    process could wait on a lock another thread held)."""

    def __init__(self) -> None:
        import ctypes
        import platform

        if platform.machine() not in ARCHES:
            raise Unusable(f"the mount API's syscall numbers are not known here for "
                           f"{platform.machine()} (only {', '.join(ARCHES)})")
        libc = ctypes.CDLL(None, use_errno=True)
        self.ctypes = ctypes
        self.syscall = libc.syscall
        self.setns = libc.setns
        self.unshare = libc.unshare
        self.mount = libc.mount

        class MountAttr(ctypes.Structure):
            _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                        ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

        self.MountAttr = MountAttr

    def check(self, result: int, what: str) -> int:
        if result < 0:
            number = self.ctypes.get_errno()
            raise OSError(number, f"{what}: {os.strerror(number)}")
        return result


_KERNEL: list[_Kernel] = []
_REACHABLE: set[tuple[str, tuple[int, int]]] = set()  # (parent, ids) granted the way to


def kernel() -> _Kernel:
    if not _KERNEL:
        _KERNEL.append(_Kernel())
    return _KERNEL[0]


class OverlayRoot:
    """One executor's copy-on-write root: its directories made by make(), mounted into a
    sandbox's mount namespace by mount(pid), removed by remove()."""

    def __init__(self, parent: str, rootfs: str, ids: tuple[int, int]):
        self.parent = parent  # <task dir>/sandbox-root, the worker's
        self.rootfs = rootfs  # the image, in the shared cache: only ever the lower layer
        self.ids = ids        # the slot's base uid and gid (root inside)
        self.name = ""
        self.identity = (0, 0)  # (st_dev, st_ino) of our directory
        self.spares: Spares | None = None  # where the next executor's comes from
        self.mount_fd = -1  # the detached overlay (prepare), until attached
        self.prepared_for = ""  # the image it was made over
        self.own = False  # a non-root worker's: mounted from its task's user namespace
        self.take_back: Callable[[list[str]], None] | None = None  # re-owns the
        #                   directory before removal (a non-root worker's subordinate ids)

    @property
    def path(self) -> str:
        return os.path.join(self.parent, self.name)

    @property
    def merged(self) -> str:
        """What bwrap binds as `/` (the overlay, once mounted in its namespace)."""
        return os.path.join(self.path, "merged")

    @classmethod
    def make(cls, task_dir: str, rootfs: str, ids: tuple[int, int], own: bool = False
             ) -> OverlayRoot:
        """The executor's directories, each made relative to its parent's descriptor.
        `own`: a non-root worker's (ids its own): every directory stays the worker's, who
        is root inside its sandboxes."""
        root = cls(os.path.join(task_dir, ROOTS), rootfs, ids)
        root.own = own
        parent_fd = _private_dir(task_dir, ROOTS)
        try:
            # the way to it, once per task and slot (a non-root worker's: its own dirs)
            if not own and (root.parent, ids) not in _REACHABLE:
                _searchable_by(parent_fd, ids[1])
                grant_traverse(root.parent, *ids)
                _REACHABLE.add((root.parent, ids))
            for _attempt in range(100):
                name = os.urandom(6).hex()
                try:
                    os.mkdir(name, 0o700, dir_fd=parent_fd)
                    break
                except FileExistsError:
                    continue
            else:
                raise OSError(errno.EEXIST, f"{root.parent}: 100 names taken")
            root.name = name
            fd = _open_checked(name, parent_fd, f"{root.parent}/{name}")
            try:
                root.identity = _identity(fd)
                if not own:
                    _searchable_by(fd, ids[1])  # bwrap resolves `merged` as the slot
                for layer in LAYERS:
                    os.mkdir(layer, 0o700, dir_fd=fd)
                if not own:
                    os.chown("upper", *ids, dir_fd=fd, follow_symlinks=False)
                os.chmod("upper", 0o755, dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)
        finally:
            os.close(parent_fd)
        return root

    def prepare(self, user_fd: int, rootfs: str | None = None) -> None:
        """Make the executor's overlay, DETACHED (attached nowhere, gone with its
        descriptor): the image (`rootfs`, else self.rootfs) id-mapped with the user
        namespace `user_fd` (the slot's map) as its read-only, nosuid, nodev lower layer,
        `upper` and `work` of the executor's directory (opened O_NOFOLLOW and checked by
        inode). Done ahead of the start for a spare (Spares.refill), else by mount().
        Raises OSError or SandboxError."""
        self.close_mount()
        rootfs = rootfs or self.rootfs
        fd = _open_checked(self.path, None, self.path)
        try:
            if _identity(fd) != self.identity:
                raise SandboxError(f"{SETTING}: {self.path} is no longer the executor's "
                                   "directory")
            self.mount_fd = _detached_overlay(kernel(), fd, rootfs, user_fd)
            self.prepared_for = rootfs
        finally:
            os.close(fd)

    def close_mount(self) -> None:
        """Drop a detached overlay never attached (again: nothing)."""
        if self.mount_fd >= 0:
            os.close(self.mount_fd)
            self.mount_fd = -1
            self.prepared_for = ""

    def mount(self, pid: int) -> None:
        """Attach the overlay at `merged` in the mount namespace of process `pid` (bwrap's
        child, waiting for its maps, which must be written): made now with its user
        namespace unless made ahead for this image. A non-root worker's (`own`): by a
        forked helper in the sandbox's user namespace (_mount_as_owner). Raises
        SandboxError."""
        if self.own:
            self._mount_as_owner(kernel(), pid)
            return
        code, message = _in_thread(kernel(), self._mount_in_namespace, pid)
        if code:
            raise SandboxError(f"{SETTING}: cannot mount the copy-on-write root: {message}")

    def _mount_in_namespace(self, lib: _Kernel, pid: int) -> None:
        fds: list[int] = []
        try:
            fds.append(os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC))
            fds.append(os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC))
            if self.mount_fd < 0 or self.prepared_for != self.rootfs:
                self.prepare(fds[1])
            if self.spares is not None:  # its map makes the next executor's ahead
                self.spares.keep_userns(fds[1])
            lib.check(lib.setns(fds[0], CLONE_NEWNS), "setns")
            # the same directory the worker made (by inode), whatever its path leads to
            fds.append(_open_checked(self.path, None, self.path))
            if _identity(fds[2]) != self.identity:
                raise OSError(errno.EXDEV, f"{self.path} is no longer the executor's "
                              "directory")
            lib.check(lib.syscall(SYS_MOVE_MOUNT, self.mount_fd, b"", fds[2], b"merged",
                                  MOVE_MOUNT_F_EMPTY_PATH), "move_mount")
        finally:
            for fd in fds:
                os.close(fd)
            self.close_mount()  # attached (it lives in the sandbox's namespace) or failed

    def _mount_as_owner(self, lib: _Kernel, pid: int) -> None:
        """A non-root worker's: a forked, single-threaded helper joins the user namespace
        of bwrap's child `pid` (mapped with the worker as root: all capabilities there),
        then its mount namespace, and there makes the overlay (the cached image, the
        worker's files, as its lower layer: no id-mapped mount is needed) and attaches it
        at `merged`. Nothing is mounted in the worker's or the host's namespace. The
        helper opens every layer again inside, O_NOFOLLOW, and checks them by inode (the
        kernel clones the layers from that namespace). Raises SandboxError."""
        fds: list[int] = []
        try:
            for kind in ("user", "mnt"):
                fds.append(os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC))
            fds.append(os.open(self.rootfs, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                               | os.O_CLOEXEC))
            lower = _identity(fds[2])
        except OSError as error:
            raise SandboxError(f"{SETTING}: cannot mount the copy-on-write root: "
                               f"{error.strerror}") from None
        # everything the child needs, made before the fork (it only makes system calls)
        job = _OwnMount(fds[0], fds[1], os.fsencode(self.path), self.identity,
                        os.fsencode(self.rootfs), lower)
        read_end, write_end = os.pipe()
        try:
            child = os.fork()
            if child == 0:  # single-threaded: may join a user namespace
                code = 1
                try:
                    os.close(read_end)
                    job.run(lib)
                    code = 0
                except BaseException as error:  # noqa: BLE001  # said through the pipe
                    try:
                        os.write(write_end, str(getattr(error, "strerror", None) or error)
                                 .encode(errors="replace")[:400])
                    except BaseException:  # noqa: BLE001  # the exit code says it
                        pass
                finally:
                    os._exit(code)
            os.close(write_end)
            write_end = -1
            said = _said(read_end, child)
            _pid, status = os.waitpid(child, 0)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
            for fd in fds:
                os.close(fd)
        if status != 0:
            raise SandboxError(f"{SETTING}: cannot mount the copy-on-write root: "
                               f"{said.decode(errors='replace') or f'helper status {status}'}")

    def remove(self) -> list[str]:
        """Remove the executor's directories (upper and all), relative to the parent's
        descriptor, never through a link; what could not be removed."""
        import shutil

        self.close_mount()
        problems: list[str] = []

        def failed(_function: object, path: str, info: tuple[object, BaseException, object]
                   ) -> None:
            problems.append(f"{path}: {getattr(info[1], 'strerror', None) or info[1]}")

        try:
            parent_fd = os.open(self.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        try:
            info = os.lstat(self.name, dir_fd=parent_fd)
            if (info.st_dev, info.st_ino) != self.identity:
                return [f"{self.path}: no longer the executor's directory: left alone"]
            if self.own:  # overlay's work/work (0000), the task's own 0000 directories
                first: list[str] = []  # (tried again once the re-owning opened more up)
                _open_up(parent_fd, self.name, first, self.path)
                if self.take_back is not None:  # entries of subordinate ids (useradd -m)
                    try:  # (a walk finding all the worker's: no bwrap)
                        self.take_back([self.path])
                    except SandboxError as error:
                        problems.append(f"{self.path}: {error}")
                    _open_up(parent_fd, self.name, problems, self.path)
                else:
                    problems += first
            if not _quick_remove(parent_fd, self.name, self.identity):
                shutil.rmtree(self.name, onerror=failed, dir_fd=parent_fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(parent_fd)
        return problems


HELPER_TIMEOUT_SECONDS = 60.0


def _said(read_end: int, child: int) -> bytes:
    """What the mounting helper wrote before it ended; a helper silent for
    HELPER_TIMEOUT_SECONDS (stuck on a lock another thread held at the fork) is killed."""
    import select
    import signal

    said = b""
    while True:
        ready, _w, _x = select.select([read_end], [], [], HELPER_TIMEOUT_SECONDS)
        if not ready:
            os.kill(child, signal.SIGKILL)
            return said + b"the mounting helper was stuck (killed)"
        chunk = os.read(read_end, 512)
        if not chunk:
            return said
        said += chunk


class _OwnMount:
    """What the forked helper of a non-root worker does in the sandbox's namespaces
    (OverlayRoot._mount_as_owner): plain values, made before the fork."""

    def __init__(self, user_fd: int, mnt_fd: int, path: bytes, identity: tuple[int, int],
                 rootfs: bytes, lower: tuple[int, int]) -> None:
        self.user_fd, self.mnt_fd = user_fd, mnt_fd
        self.path, self.identity = path, identity
        self.rootfs, self.lower = rootfs, lower

    def run(self, lib: _Kernel) -> None:
        lib.check(lib.setns(self.user_fd, CLONE_NEWUSER), "setns(user namespace)")
        lib.check(lib.setns(self.mnt_fd, CLONE_NEWNS), "setns(mount namespace)")
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        here = os.open(self.path, flags)  # the same directories, seen from inside
        if _identity(here) != self.identity:
            raise OSError(errno.EXDEV, "the executor's directory is no longer the one made")
        lower = os.open(self.rootfs, flags)
        if _identity(lower) != self.lower:
            raise OSError(errno.EXDEV, "the image's directory changed")
        layers = []
        for name in (b"upper", b"work"):  # never through a link
            layers.append(os.open(name, flags, dir_fd=here))
        context = lib.check(lib.syscall(SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC),
                            "fsopen(overlay) in a user namespace (Linux 5.11+)")
        for key, fd in ((b"lowerdir", lower), (b"upperdir", layers[0]),
                        (b"workdir", layers[1])):
            lib.check(lib.syscall(SYS_FSCONFIG, context, FSCONFIG_SET_STRING, key,
                                  b"/proc/self/fd/%d" % fd, 0), f"overlay {key.decode()}")
        for flag in (b"userxattr", b"volatile"):  # user.overlay.*: all a user ns may set
            lib.check(lib.syscall(SYS_FSCONFIG, context, FSCONFIG_SET_FLAG, flag, None, 0),
                      f"overlay {flag.decode()}")
        lib.check(lib.syscall(SYS_FSCONFIG, context, FSCONFIG_CMD_CREATE, None, None, 0),
                  "overlay (in the task's user namespace)")
        mount = lib.check(lib.syscall(SYS_FSMOUNT, context, FSMOUNT_CLOEXEC,
                                      MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV), "fsmount")
        lib.check(lib.syscall(SYS_MOVE_MOUNT, mount, b"", here, b"merged",
                              MOVE_MOUNT_F_EMPTY_PATH), "move_mount")


def _open_up(dir_fd: int, name: str, problems: list[str], shown: str) -> None:
    """Give every directory under dir_fd/name (it too) that the worker owns u+rwx, so a
    worker without CAP_DAC_OVERRIDE can empty it: top-down, relative to descriptors, never
    through a link (a mode is changed through an O_PATH descriptor's /proc link, which is
    that inode)."""
    flags = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            return
        if info.st_mode & 0o700 != 0o700:
            handle = os.open(name, flags | os.O_PATH, dir_fd=dir_fd)
            try:
                if _identity(handle) != (info.st_dev, info.st_ino):
                    return
                os.chmod(f"/proc/self/fd/{handle}", stat.S_IMODE(info.st_mode) | 0o700)
            finally:
                os.close(handle)
        fd = os.open(name, flags | os.O_RDONLY, dir_fd=dir_fd)
    except OSError as error:
        problems.append(f"{shown}: {error.strerror}")
        return
    try:
        if _identity(fd) != (info.st_dev, info.st_ino):
            return
        with os.scandir(fd) as entries:
            names = [entry.name for entry in entries if entry.is_dir(follow_symlinks=False)]
        for entry in names:
            _open_up(fd, entry, problems, os.path.join(shown, entry))
    finally:
        os.close(fd)


def _quick_remove(parent_fd: int, name: str, identity: tuple[int, int]) -> bool:
    """Remove an executor's directory that holds only what a trivial executor leaves
    (LEFT), one rmdir/unlink each relative to its descriptor (rmtree's walk costs ~1 ms
    more); False, with the rest left for rmtree, at the first entry that is not so."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=parent_fd)
    except OSError:
        return False
    try:
        if _identity(fd) != identity:
            return False
        for entry, directory in LEFT:
            try:
                if directory:
                    os.rmdir(entry, dir_fd=fd)
                else:
                    os.unlink(entry, dir_fd=fd)
            except FileNotFoundError:
                continue
            except OSError:
                return False
    finally:
        os.close(fd)
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except OSError:
        return False
    return True


class Spares:
    """Executors' roots made ahead, one kept ready per task and slot: the thread that
    removes an ended executor's root makes the next one's directories and its detached
    overlay over the same image (with the slot's user namespace, kept from the first
    executor's sandbox), so a start only attaches it (~0.1 ms instead of ~0.9 ms of
    directories, id-mapped image and overlay). A start over another image, or before any
    sandbox gave its map, makes its own as before. Each is checked again by inode when
    attached."""

    def __init__(self, task_dir: str, ids: tuple[int, int]) -> None:
        import threading

        self.task_dir = task_dir
        self.ids = ids
        self.user_fd = -1  # a user namespace mapped as the slot (held, not entered)
        self.rootfs = ""  # the image the last executor ran over
        self._ready: list[OverlayRoot] = []
        self._lock = threading.Lock()

    def take(self, rootfs: str) -> OverlayRoot:
        """An executor's root for this image: a spare, else made now."""
        with self._lock:
            root = self._ready.pop() if self._ready else None
            self.rootfs = rootfs
        if root is not None and root.prepared_for not in ("", rootfs):
            root.remove()  # made over another image: its work dir is used
            root = None
        if root is None:
            root = OverlayRoot.make(self.task_dir, rootfs, self.ids)
        root.rootfs = rootfs
        root.spares = self
        return root

    def keep_userns(self, user_fd: int) -> None:
        """Keep a user namespace with the slot's map (the first sandbox's) to make the
        spares' id-mapped image with."""
        with self._lock:
            if self.user_fd < 0:
                self.user_fd = os.dup(user_fd)
                os.set_inheritable(self.user_fd, False)

    def refill(self) -> None:
        """Make one spare unless one is ready (a failure: none, the next start makes its
        own and says what fails)."""
        with self._lock:
            if self._ready:
                return
            user_fd, rootfs = self.user_fd, self.rootfs
        try:
            root = OverlayRoot.make(self.task_dir, rootfs, self.ids)
        except (OSError, SandboxError):
            return
        if user_fd >= 0 and rootfs:
            try:
                root.prepare(user_fd)
            except (OSError, SandboxError):
                root.close_mount()  # mount() makes it, and says why it cannot
        with self._lock:
            self._ready.append(root)

    def drop(self) -> list[str]:
        """Remove the spares and let the namespace go (at the task's end): what could not
        be removed."""
        with self._lock:
            ready, self._ready = self._ready, []
            if self.user_fd >= 0:
                os.close(self.user_fd)
                self.user_fd = -1
        return [problem for root in ready for problem in root.remove()]


class Removals:
    """Executors' roots being removed in the background: an executor's goes once it ended
    (its processes are gone), off the way of the next start (a removal costs 1-8 ms of
    journalled unlinks), then the next executor's spare is made (Spares); the task waits
    for them all at its end."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._threads: list[Any] = []

    def add(self, root: OverlayRoot) -> None:
        import threading

        def remove() -> None:
            self.problems.extend(root.remove())
            if root.spares is not None:
                root.spares.refill()

        thread = threading.Thread(target=remove, name="overlay-root-removal", daemon=True)
        thread.start()
        self._threads.append(thread)

    def wait(self) -> list[str]:
        """Once every removal ended: what could not be removed."""
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        problems, self.problems = self.problems, []
        return problems


def _detached_overlay(lib: _Kernel, fd: int, rootfs: str, user_fd: int) -> int:
    """The overlay as a detached mount (fsopen/fsconfig/fsmount): the image id-mapped as
    a detached read-only, nosuid, nodev tree for its lower layer, the upper and work of
    the executor's directory `fd`, volatile (nothing synced when it goes). Its fd."""
    ctypes = lib.ctypes
    tree = lib.check(lib.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(rootfs),
                                 OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
                                 | AT_SYMLINK_NOFOLLOW), f"open_tree {rootfs}")
    context = -1
    try:
        attr = lib.MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
                             | MOUNT_ATTR_NODEV, 0, 0, user_fd)
        lib.check(lib.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH | AT_RECURSIVE,
                              ctypes.byref(attr), ctypes.sizeof(attr)),
                  "mount_setattr(MOUNT_ATTR_IDMAP)")
        context = lib.check(lib.syscall(SYS_FSOPEN, b"overlay", FSOPEN_CLOEXEC), "fsopen")
        here = f"/proc/self/fd/{fd}"
        for key, value in (("lowerdir", f"/proc/self/fd/{tree}"),
                           ("upperdir", f"{here}/upper"), ("workdir", f"{here}/work")):
            lib.check(lib.syscall(SYS_FSCONFIG, context, FSCONFIG_SET_STRING, key.encode(),
                                  value.encode(), 0), f"overlay {key}")
        lib.check(lib.syscall(SYS_FSCONFIG, context, FSCONFIG_SET_FLAG, b"volatile", None, 0),
                  "overlay volatile")
        lib.check(lib.syscall(SYS_FSCONFIG, context, FSCONFIG_CMD_CREATE, None, None, 0),
                  "overlay")
        return lib.check(lib.syscall(SYS_FSMOUNT, context, FSMOUNT_CLOEXEC,
                                     MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV), "fsmount")
    finally:
        os.close(tree)
        if context >= 0:
            os.close(context)


STUCK = "the mounting thread cannot return to the worker's mount namespace"


class _Mounter:
    """One thread of the worker that mounts copy-on-write roots, for the worker's life. It
    takes a private copy of the process's root and cwd once (unshare CLONE_FS), so that it
    alone may join another mount namespace (setns applies to the calling thread; a thread
    sharing them may not): per request it joins the sandbox's mount namespace, mounts, and
    goes back to the worker's own (a descriptor of it held from the start), so it holds no
    sandbox's namespace between requests and the worker's other threads never move.
    Starting a thread per mount cost ~0.35 ms of each start; a request costs ~0.05 ms. A
    thread that cannot go back ends (dropping that namespace) and the next request starts
    another."""

    def __init__(self, lib: _Kernel) -> None:
        import queue
        import threading

        self.lib = lib
        self.requests: Any = queue.SimpleQueue()
        self.alive = True
        threading.Thread(target=self._serve, name="overlay-root", daemon=True).start()

    def run(self, action, *args: object) -> tuple[int, str]:  # type: ignore[no-untyped-def]
        """action(lib, *args) in the mounting thread: (0, "") or (errno, what failed)."""
        import _thread

        outcome: list[tuple[int, str]] = []
        done = _thread.allocate_lock()
        done.acquire()
        self.requests.put((action, args, outcome, done))
        done.acquire()
        return outcome[0] if outcome else (1, "the mounting thread ended without a word")

    def _serve(self) -> None:
        lib = self.lib
        home = -1
        try:
            lib.check(lib.unshare(CLONE_FS), "unshare(CLONE_FS)")
            home = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            self.alive = False
            self._answer_all((error.errno or 1, f"cannot start the mounting thread: {error}"))
            return
        while True:
            action, args, outcome, done = self.requests.get()
            try:
                action(lib, *args)
                outcome.append((0, ""))
            except BaseException as error:  # noqa: BLE001  # the caller says what failed
                outcome.append((getattr(error, "errno", None) or 1,
                                str(getattr(error, "strerror", None) or error)))
            if lib.setns(home, CLONE_NEWNS) != 0:  # stuck in the sandbox's: end here
                self.alive = False
                done.release()
                self._answer_all((1, STUCK))
                return
            done.release()

    def _answer_all(self, outcome: tuple[int, str]) -> None:
        """Requests that came while the thread was ending fail with outcome."""
        import queue

        while True:
            try:
                _action, _args, answers, done = self.requests.get_nowait()
            except queue.Empty:
                return
            answers.append(outcome)
            done.release()


_MOUNTER: list[_Mounter] = []


def _in_thread(lib: _Kernel, action, *args: object) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Run action(lib, *args) in the worker's mounting thread (_Mounter): (0, "") or
    (errno, what failed). A fork would cost ~3 ms."""
    if not _MOUNTER or not _MOUNTER[0].alive:
        _MOUNTER[:] = [_Mounter(lib)]
    return _MOUNTER[0].run(action, *args)


def _private_dir(parent: str, name: str) -> int:
    """A descriptor of parent/name, made root's 0700 where missing, checked to be a real
    directory of the worker's that nobody else may write."""
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass
        return _open_checked(name, parent_fd, os.path.join(parent, name))
    finally:
        os.close(parent_fd)


def _searchable_by(fd: int, gid: int) -> None:
    """The directory root's, searchable (not listable) by the slot's group only: bwrap
    runs as the slot's base uid and gid, with no other group."""
    os.fchown(fd, 0, gid)
    os.fchmod(fd, 0o710)


def _open_checked(name: str, dir_fd: int | None, shown: str) -> int:
    """Open a directory O_NOFOLLOW; it must be the worker's and writable by it alone."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as error:
        raise SandboxError(f"{SETTING}: {shown}: {error.strerror} (a symlink or not a "
                           "directory?)") from None
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o022:
        os.close(fd)
        raise SandboxError(f"{SETTING}: {shown} is not the worker's private directory")
    return fd


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


# ---- may a task have one here? ----

def probe(task_dir: str, rootfs: str, ids: tuple[int, int]) -> None:
    """Make the same mounts once, over this image and the task's disk, in a user and mount
    namespace of a forked child mapped as a sandbox is (so a kernel without idmapped
    mounts, or a file system that refuses them, says so before any executor starts).
    Raises Unusable with the reason."""
    if os.geteuid() != 0:
        raise Unusable("the worker is not root")
    try:
        lib = kernel()
        root = OverlayRoot.make(task_dir, rootfs, ids)
    except (OSError, SandboxError) as error:
        raise Unusable(str(error)) from None
    try:
        _probe_in(lib, root)
    finally:
        root.remove()


def probe_own(task_dir: str, rootfs: str, write_maps: Callable[[int], None]) -> None:
    """probe() for a worker that is not root, with a subordinate range (write_maps maps a
    user namespace as its sandboxes are: subids.Subordinate.write_maps): the same mounts,
    by the same forked helper, in a stand-in's namespaces. Raises Unusable."""
    try:
        owner = os.stat(rootfs, follow_symlinks=False).st_uid
    except OSError as error:
        raise Unusable(f"{rootfs}: {error.strerror}") from None
    if owner != os.geteuid():  # e.g. a site-wide cache of another account's
        raise Unusable(f"the cached image belongs to uid {owner}, not the worker's "
                       f"{os.geteuid()}: its files would be nobody's inside and could not "
                       "be copied up")
    try:
        lib = kernel()
        root = OverlayRoot.make(task_dir, rootfs, (os.geteuid(), os.getegid()), own=True)
    except (OSError, SandboxError) as error:
        raise Unusable(str(error)) from None
    try:
        _probe_in(lib, root, write_maps)
    finally:
        root.remove()


def _probe_in(lib: _Kernel, root: OverlayRoot,
              write_maps: Callable[[int], None] | None = None) -> None:
    """The overlay mounted into a stand-in for bwrap's child (new user and mount
    namespaces), mapped as a sandbox is; Unusable saying why not."""
    try:
        with StandIn(lib.unshare, CLONE_NEWUSER | CLONE_NEWNS) as pid:
            if write_maps is not None:
                write_maps(pid)
            else:
                uid, gid = root.ids
                for name, first in (("uid_map", uid), ("gid_map", gid)):
                    with open(f"/proc/{pid}/{name}", "w") as mapping:
                        mapping.write(f"0 {first} 65536\n")
            root.mount(pid)
    except UnshareFailed as error:
        raise Unusable(f"cannot make a user and mount namespace: {error.strerror}") from None
    except (OSError, SandboxError) as error:
        raise Unusable(str(error)) from None
