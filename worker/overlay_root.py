"""worker.writable_root: a copy-on-write image root for bwrap executors with a uid block.

Contract. With a root worker, `worker.sandbox_uids` and bwrap, each executor's `/` is an
overlay: the cached image below, read-only and never written, an upper directory of the
executor's own on the task's disk above, so `useradd`, `dpkg -i`, `rm /bin/ls` work as in a
fresh container and change nothing another executor sees. The image's files are owned by
host ids (root, mostly), which the sandbox's user namespace does not map; so the lower
layer is an ID-MAPPED mount of the image (open_tree + mount_setattr(MOUNT_ATTR_IDMAP) with
the sandbox's own user namespace + move_mount): host id k of the image shows as id k inside
(root as root), stored as the slot's id base + k when copied up.

Both mounts are made in the MOUNT NAMESPACE OF THE SANDBOX ITSELF (bwrap's child, owned by
its user namespace, so its mounts are slaves of the host's and nothing propagates back),
by a thread of the worker that joins it alone (unshare CLONE_FS, setns) while bwrap waits
for its id maps (--userns-block-fd); bwrap then binds the overlay as its new `/`. They
never exist in the worker's or the host's namespace and go with the sandbox's last
process, however the worker ends (kill -9 included): there is nothing to unmount.

On disk: `<task dir>/sandbox-root/<random>/{lower,merged,upper,work}` per executor: root's
0700 but `upper` (the slot's base id's) and the two directories on the way to `merged`
(root's, the slot's group, 0710: bwrap resolves `merged` as the slot; an ACL entry above
them, as for its binds). The mounting thread opens the executor's directory again inside
the namespace O_NOFOLLOW and checks it is the same inode before naming anything in it
(through /proc/self/fd/N, which is also all `mountinfo` shows inside). The upper counts
against disk_gb (the disk walk covers sandbox-root) and is removed, relative to
descriptors, once the executor ended.

Cost per executor (measured, quiet: ~1 ms): five mkdirs, a short thread making six
syscalls (a volatile overlay: nothing synced when it goes), the tree's removal in the
background (Removals); once per task and image, the probe (a fork that makes a user
namespace, and the same mounts in it: ~6 ms).
"""

from __future__ import annotations

import errno
import os
import stat

from funnel_hpc.worker.sandbox import SandboxError, grant_traverse

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from typing import Any

SETTING = "worker.writable_root"
MODES = ("auto", "off")
ROOTS = "sandbox-root"  # in the task dir (or its scratch): one directory per executor
LAYERS = ("lower", "merged", "upper", "work")
NOTE = "image root: copy-on-write"
# Syscall numbers: the mount API calls came after 5.0, when every architecture took the same
# numbers (x86_64 and aarch64 alike; asm-generic/unistd.h, arch/x86/.../syscall_64.tbl).
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
ARCHES = ("x86_64", "aarch64")
AT_FDCWD = -100
AT_EMPTY_PATH, AT_SYMLINK_NOFOLLOW, AT_RECURSIVE = 0x1000, 0x100, 0x8000
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, 0o2000000
MOVE_MOUNT_F_EMPTY_PATH = 4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
MOUNT_ATTR_IDMAP = 0x100000
MS_NOSUID, MS_NODEV = 0x2, 0x4
CLONE_FS, CLONE_NEWNS, CLONE_NEWUSER = 0x00000200, 0x00020000, 0x10000000


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

    @property
    def path(self) -> str:
        return os.path.join(self.parent, self.name)

    @property
    def merged(self) -> str:
        """What bwrap binds as `/` (the overlay, once mounted in its namespace)."""
        return os.path.join(self.path, "merged")

    @classmethod
    def make(cls, task_dir: str, rootfs: str, ids: tuple[int, int]) -> OverlayRoot:
        """The executor's directories, each made relative to its parent's descriptor."""
        root = cls(os.path.join(task_dir, ROOTS), rootfs, ids)
        parent_fd = _private_dir(task_dir, ROOTS)
        try:
            if (root.parent, ids) not in _REACHABLE:  # the way to it, once per task and slot
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
                _searchable_by(fd, ids[1])  # bwrap resolves `merged` as the slot
                for layer in LAYERS:
                    os.mkdir(layer, 0o700, dir_fd=fd)
                os.chown("upper", *ids, dir_fd=fd, follow_symlinks=False)
                os.chmod("upper", 0o755, dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)
        finally:
            os.close(parent_fd)
        return root

    def mount(self, pid: int) -> None:
        """Mount the overlay at `merged` in the mount namespace of process `pid` (bwrap's
        child, waiting for its maps, which must be written). Raises SandboxError."""
        code, message = _in_thread(kernel(), self._mount_in_namespace, pid)
        if code:
            raise SandboxError(f"{SETTING}: cannot mount the copy-on-write root: {message}")

    def _mount_in_namespace(self, lib: _Kernel, pid: int) -> None:
        fds: list[int] = []
        try:
            fds.append(os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC))
            fds.append(os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC))
            lib.check(lib.setns(fds[0], CLONE_NEWNS), "setns")
            # the same directory the worker made (by inode), whatever its path leads to
            fds.append(_open_checked(self.path, None, self.path))
            if _identity(fds[2]) != self.identity:
                raise OSError(errno.EXDEV, f"{self.path} is no longer the executor's "
                              "directory")
            _mount_layers(lib, fds[2], self.rootfs, fds[1])
        finally:
            for fd in fds:
                os.close(fd)

    def remove(self) -> list[str]:
        """Remove the executor's directories (upper and all), relative to the parent's
        descriptor, never through a link; what could not be removed."""
        import shutil

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
            shutil.rmtree(self.name, onerror=failed, dir_fd=parent_fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(parent_fd)
        return problems


class Removals:
    """Executors' roots being removed in the background: an executor's goes once it ended
    (its processes are gone), off the way of the next start (a removal costs 1-8 ms of
    journalled unlinks); the task waits for them all at its end."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._threads: list[Any] = []

    def add(self, root: OverlayRoot) -> None:
        import threading

        thread = threading.Thread(target=lambda: self.problems.extend(root.remove()),
                                  name="overlay-root-removal", daemon=True)
        thread.start()
        self._threads.append(thread)

    def wait(self) -> list[str]:
        """Once every removal ended: what could not be removed."""
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        problems, self.problems = self.problems, []
        return problems


def _mount_layers(lib: _Kernel, fd: int, rootfs: str, user_fd: int) -> None:
    """In the sandbox's mount namespace: the image id-mapped (read-only, nosuid, nodev) on
    `lower`, the overlay on `merged`. fd: the executor's directory."""
    ctypes = lib.ctypes
    tree = lib.check(lib.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(rootfs),
                                 OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
                                 | AT_SYMLINK_NOFOLLOW), f"open_tree {rootfs}")
    try:
        attr = lib.MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
                             | MOUNT_ATTR_NODEV, 0, 0, user_fd)
        lib.check(lib.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH | AT_RECURSIVE,
                              ctypes.byref(attr), ctypes.sizeof(attr)),
                  "mount_setattr(MOUNT_ATTR_IDMAP)")
        lib.check(lib.syscall(SYS_MOVE_MOUNT, tree, b"", fd, b"lower",
                              MOVE_MOUNT_F_EMPTY_PATH), "move_mount")
    finally:
        os.close(tree)
    here = f"/proc/self/fd/{fd}"
    options = f"lowerdir={here}/lower,upperdir={here}/upper,workdir={here}/work,volatile"
    lib.check(lib.mount(b"overlay", f"{here}/merged".encode(), b"overlay",
                        MS_NOSUID | MS_NODEV, options.encode()), "mount overlay")


def _in_thread(lib: _Kernel, action, *args: object) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    """Run action(lib, *args) in a thread of its own that first takes a private copy of
    the process's root and cwd (unshare CLONE_FS), so that it alone may join another mount
    namespace (setns applies to the calling thread; a thread sharing them may not): the
    worker's other threads stay where they are. The thread ends with it, and its hold on
    that namespace with it. (0, "") or (errno, what failed). A fork would cost ~3 ms."""
    import threading

    outcome: list[tuple[int, str]] = []

    def run() -> None:
        try:
            lib.check(lib.unshare(CLONE_FS), "unshare(CLONE_FS)")
            action(lib, *args)
            outcome.append((0, ""))
        except BaseException as error:  # noqa: BLE001  # the caller says what failed
            outcome.append((getattr(error, "errno", None) or 1,
                            str(getattr(error, "strerror", None) or error)))

    thread = threading.Thread(target=run, name="overlay-root")
    thread.start()
    thread.join()
    return outcome[0] if outcome else (1, "the mounting thread ended without a word")


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


def _probe_in(lib: _Kernel, root: OverlayRoot) -> None:
    go_read, go_write = os.pipe()
    ready_read, ready_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a stand-in for bwrap's child: new user and mount namespaces, then wait
        try:
            os.close(go_write)
            os.close(ready_read)
            code = 0 if lib.unshare(CLONE_NEWUSER | CLONE_NEWNS) == 0 else 1
            os.write(ready_write, str(code).encode())
            os.read(go_read, 1)
        finally:
            os._exit(0)
    os.close(go_read)
    os.close(ready_write)
    try:
        if os.read(ready_read, 1) != b"0":
            raise Unusable("cannot make a user and mount namespace")
        uid, gid = root.ids
        for name, first in (("uid_map", uid), ("gid_map", gid)):
            with open(f"/proc/{pid}/{name}", "w") as mapping:
                mapping.write(f"0 {first} 65536\n")
        root.mount(pid)
    except (OSError, SandboxError) as error:
        raise Unusable(str(error)) from None
    finally:
        os.close(ready_read)
        os.close(go_write)
        os.waitpid(pid, 0)
