"""Who a task's sandbox is on the host: one identity per running task.

Contract. A root worker gives each task its own slot of ``worker.sandbox_uids``: slot k is
the block of 65536 host ids starting at ``first + k * 65536`` (uid and gid alike, like an
/etc/subuid line). The engine runs as the block's first id; inside bwrap that id is root and
the next 65535 are ids 1-65535 (written into the sandbox's uid_map/gid_map by this
process while bwrap waits on ``--userns-block-fd``), so chown and ``tar x`` as root work
as under a container engine (the image itself stays read-only), with the few
capabilities those need, which reach only what the block owns. A slot is held with an
flock on ``<lock_dir>/<first id>`` (a dead worker's lock dies with it); before a slot is
used and when it is given back, every process left with an id of the block is killed.
With ``sandbox_uids`` off (first: 0) every task runs as ``worker.sandbox_user`` (one
shared uid, root only inside bwrap); a worker that is not root runs tasks as itself (with
submit_as_owner: the owner).

ch-run and proot get their pid namespace from pid_namespace.py.

Cost: one flock per task; one scan of /proc (a status read per process) when a slot is
taken and when it is given back; one walk of the task's files to re-own them to the worker.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import select
import signal
import stat

from funnel_hpc.worker.sandbox import SandboxError, sandbox_ids

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Iterable

    from funnel_hpc.core.config import SandboxUids, WorkerSection
    from funnel_hpc.worker.cgroups import Process
    from funnel_hpc.worker.overlay_root import OverlayRoot
    from funnel_hpc.worker.subids import Subordinate

BLOCK = 65536  # ids per slot: root and ids 1-65535 inside
MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "no change" to chown: never handed out
SWEEP_ROUNDS = 100  # /proc scans killing a block's processes before giving up...
SWEEP_PAUSE_SECONDS = 0.05  # ...with this pause between them (~5 s in all)
INFO_TIMEOUT_SECONDS = 60.0  # bwrap says its child's pid at once; this is for a wedged one
# What root inside bwrap keeps when it has a whole block of ids (Docker's default set less
# MKNOD, NET_RAW and AUDIT_WRITE). In the sandbox's user namespace these act only on what
# the block owns: files of other users are unmapped there, other tasks' processes are in
# other user namespaces.
BLOCK_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
              "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_SETFCAP", "CAP_SYS_CHROOT",
              "CAP_NET_BIND_SERVICE")


class Range:
    """worker.sandbox_uids, checked: `count` blocks of BLOCK ids from `first`."""

    __slots__ = ("count", "first", "lock_dir")

    def __init__(self, first: int, count: int, lock_dir: str) -> None:
        self.first = first
        self.count = count
        self.lock_dir = lock_dir

    def base(self, slot: int) -> int:
        return self.first + slot * BLOCK


def parse_range(uids: SandboxUids) -> Range | None:
    """The configured range (worker.sandbox_uids), or None when it is off (first: 0)."""
    first, count = uids.first, uids.count
    if first < 0 or count < 0:
        raise SandboxError("worker.sandbox_uids.first and .count must be whole numbers >= 0")
    if first == 0:
        return None
    if first < BLOCK or count < 1 or first + count * BLOCK - 1 > MAX_ID:
        raise SandboxError(f"worker.sandbox_uids: first ({first}) must be at least {BLOCK} "
                           f"and count ({count}) at least 1, with first + count * {BLOCK} "
                           f"ids below {MAX_ID + 1}")
    lock_dir = uids.lock_dir
    if not lock_dir.startswith("/"):
        raise SandboxError(f"worker.sandbox_uids.lock_dir must be absolute, not {lock_dir!r}")
    return Range(first, count, lock_dir)


class Identity:
    """The host ids one task's sandbox runs as: `span` ids from (uid, gid); a slot's lock."""

    __slots__ = ("gid", "lock_fd", "span", "uid")

    def __init__(self, uid: int, gid: int, span: int = 1, lock_fd: int | None = None):
        self.uid = uid
        self.gid = gid
        self.span = span        # BLOCK for a slot (a whole id range inside), 1 for a user
        self.lock_fd = lock_fd  # the slot's flock, held until release()

    @property
    def ids(self) -> tuple[int, int]:
        return self.uid, self.gid

    @property
    def block(self) -> bool:
        """A slot of its own (not the shared sandbox_user)."""
        return self.span > 1

    def owns_uid(self, uid: int) -> bool:
        return self.uid <= uid < self.uid + self.span

    def owns_gid(self, gid: int) -> bool:
        return self.gid <= gid < self.gid + self.span

    def release(self) -> None:
        """Kill what is left of the task and give the slot back (again: a no-op)."""
        if self.lock_fd is None:
            return
        sweep(self.uid, self.span)
        os.close(self.lock_fd)
        self.lock_fd = None

    def write_maps(self, pid: int) -> None:
        """Map the user namespace of `pid` (bwrap's child, waiting): 0 is the slot's first
        id, the next span - 1 ids follow it."""
        with open(f"/proc/{pid}/uid_map", "w") as uid_map:
            uid_map.write(f"0 {self.uid} {self.span}\n")
        with open(f"/proc/{pid}/gid_map", "w") as gid_map:
            gid_map.write(f"0 {self.gid} {self.span}\n")

    def take_back(self, roots: Iterable[str]) -> None:
        """Re-own to the worker every entry under roots that belongs to this identity's ids
        (never following a symlink), so nothing the task made stays with its ids once the
        slot may go to another task. The kernel drops set-user/group-ID bits and file
        capabilities on the way."""
        to_uid, to_gid = os.geteuid(), os.getegid()
        for root in roots:
            if not os.path.lexists(root):
                continue
            self._reown(root, to_uid, to_gid)
            if not os.path.isdir(root) or os.path.islink(root):
                continue
            for dirpath, dirnames, filenames in os.walk(root):
                for name in dirnames + filenames:
                    self._reown(os.path.join(dirpath, name), to_uid, to_gid)

    def _reown(self, path: str, to_uid: int, to_gid: int) -> None:
        info = os.lstat(path)
        uid = to_uid if self.owns_uid(info.st_uid) else -1
        gid = to_gid if self.owns_gid(info.st_gid) else -1
        if uid != -1 or gid != -1:
            os.lchown(path, uid, gid)


def acquire(worker: WorkerSection) -> Identity | None:
    """This task's identity: a free slot of worker.sandbox_uids, else sandbox_user; None
    when the worker is not root (it runs tasks as itself)."""
    if os.geteuid() != 0:
        return None
    uids = parse_range(worker.sandbox_uids)
    if uids is None:
        ids = sandbox_ids(worker.sandbox_user)
        assert ids is not None  # root
        return Identity(*ids)
    _check_lock_dir(uids.lock_dir)
    for slot in range(uids.count):
        base = uids.base(slot)
        fd = os.open(os.path.join(uids.lock_dir, str(base)),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _check_free(base)
        sweep(base, BLOCK)  # what a crashed worker's task left
        return Identity(base, base, BLOCK, fd)
    raise SandboxError(f"all {uids.count} slots of worker.sandbox_uids are in use on this "
                       "node (raise count)")


def _check_lock_dir(path: str) -> None:
    """The lock directory is root's alone: nobody else may make or remove a slot's lock."""
    os.makedirs(path, 0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o022:
        raise SandboxError(f"worker.sandbox_uids.lock_dir {path} must be a directory owned "
                           "by root and writable by root only")


def _check_free(base: int) -> None:
    import pwd

    try:
        name = pwd.getpwuid(base).pw_name
    except KeyError:
        return
    raise SandboxError(f"worker.sandbox_uids: uid {base} is the account {name!r}; the range "
                       "must hold no account")


def sweep(first: int, span: int) -> None:
    """SIGKILL every process with a real or effective uid in [first, first + span), until
    none is left (zombies aside: they run nothing). A pid namespace the kernel is tearing
    down takes a moment, hence the pauses; a process forking faster than it is killed
    still runs out of rounds."""
    import time

    for _round in range(SWEEP_ROUNDS):
        found = False
        for pid in _pids_of(first, span):
            found = True
            _kill(pid, first, span)
        if not found:
            return
        time.sleep(SWEEP_PAUSE_SECONDS)
    raise SandboxError(f"processes of host uids {first}-{first + span - 1} survive "
                       f"{SWEEP_ROUNDS} rounds of SIGKILL")


def _pids_of(first: int, span: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _uid_in(int(name), first, span):
            pids.append(int(name))
    return pids


def _uid_in(pid: int, first: int, span: int) -> bool:
    """A live (not zombie) process whose real or effective uid is in the range."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"State:") and line.split()[1] in (b"Z", b"X"):
                    return False
                if line.startswith(b"Uid:"):
                    real, effective = (int(word) for word in line.split()[1:3])
                    return first <= real < first + span or first <= effective < first + span
    except (OSError, ValueError):
        pass  # gone meanwhile
    return False


def _kill(pid: int, first: int, span: int) -> None:
    """SIGKILL through a pidfd, after checking again that the pid is still the block's."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # gone
    try:
        if _uid_in(pid, first, span):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError as error:
        if error.errno != errno.ESRCH:
            raise
    finally:
        os.close(pidfd)


# ---- bwrap: the whole block mapped inside ----

class NamespaceMap:
    """The pipes bwrap waits on (--userns-block-fd, --info-fd) while this process writes
    the sandbox's uid_map and gid_map (0-65535 inside are the identity's block); then,
    with a copy-on-write root (worker/overlay_root.py), mounts it in the sandbox's
    namespace. (A worker that is not root joins a namespace made once per task instead:
    worker/subids.py; with a copy-on-write root, `ids` is its subids.Subordinate, whose
    newuidmap/newgidmap map each sandbox.)"""

    def __init__(self, ids: Identity | Subordinate, root: OverlayRoot | None = None):
        self.ids = ids
        self.root = root
        self.info_read, self.info_write = os.pipe()
        self.block_read, self.block_write = os.pipe()

    def argv(self) -> list[str]:
        """bwrap options (after its --cap-drop ALL): wait for the maps; the block's caps."""
        argv = ["--userns-block-fd", str(self.block_read), "--info-fd", str(self.info_write)]
        return argv + [arg for cap in BLOCK_CAPS for arg in ("--cap-add", cap)]

    @property
    def pass_fds(self) -> tuple[int, int]:
        return self.block_read, self.info_write

    def started(self, proc: Process) -> None:
        """Write the maps of the bwrap just started, then let it go on. A failure kills it
        (it would otherwise run with root unmapped) and raises SandboxError."""
        os.close(self.block_read)
        os.close(self.info_write)
        try:
            pid = self._child_pid()
            self.ids.write_maps(pid)
            if self.root is not None:  # its lower layer is id-mapped with these maps
                self.root.mount(pid)
            os.write(self.block_write, b"1")
        except (OSError, ValueError, KeyError, SandboxError) as error:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise SandboxError(f"cannot map the sandbox's ids: {error}") from None
        finally:
            os.close(self.block_write)
            os.close(self.info_read)

    def _child_pid(self) -> int:
        data = b""
        while True:
            ready, _w, _x = select.select([self.info_read], [], [], INFO_TIMEOUT_SECONDS)
            if not ready:
                raise SandboxError(f"bwrap said nothing in {INFO_TIMEOUT_SECONDS:g} s")
            chunk = os.read(self.info_read, 4096)
            if not chunk:
                break
            data += chunk
        if not data:
            raise SandboxError("bwrap ended before starting its sandbox")
        pid = json.loads(data)["child-pid"]
        if not isinstance(pid, int) or pid <= 0:
            raise ValueError(f"bwrap's child-pid {pid!r}")
        return pid
