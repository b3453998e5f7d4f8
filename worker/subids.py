"""A full id range inside bwrap for a worker that is not root: its /etc/subuid range.

Contract. With `worker.sandbox_uids.subordinate: auto`, a worker running as an ordinary
user (a site's service account; the task's owner with submit_as_owner) gives its bwrap
sandboxes a user namespace that maps root to its own uid and primary gid and ids 1-65535
to the first range of at least 65535 ids that /etc/subuid (/etc/subgid) grants it, looked
up by its uid and by its name as shadow-utils does. The namespace is made once per task
(a forked child unshares it and waits while the setuid `newuidmap`/`newgidmap` of
Debian's uidmap, from a fixed list of absolute paths, never PATH, write its maps, checking
the ranges against those files themselves as rootless podman's do); the worker holds a
descriptor of it and each bwrap joins it (`--userns FD`), then makes its own pid, mount,
ipc and uts namespaces as always. Ids outside the map stay unmapped (nobody) inside. Files
the task leaves with subordinate ids are re-owned to the worker before anything reads them
(outputs, removal): the worker cannot chown them itself, so a short bwrap in the same
namespace runs `reown.py` as root inside, with CAP_CHOWN, CAP_DAC_OVERRIDE and CAP_FOWNER
there only, which re-owns by directory descriptors without following links (`podman
unshare chown`'s way).

Without a range, without the tools, or with `off`: root only inside (today's
behaviour); `explain` says why, for the task's system logs and `funnel config show`.

Cost: once per task, reading two small files, a fork and the two setuid programs (~6 ms);
nothing per executor (joining the namespace costs bwrap what making one does: 1.02x, 200
runs); at the task's end one walk of its files and, only when one is not the worker's, the
re-owning bwrap (~15 ms: 12-24 ms, 15 runs). Mapping each sandbox with newuidmap while
bwrap waited cost ~3.5 ms a start (1.9-2.1x).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from funnel_hpc.worker.identity import BLOCK_CAPS
from funnel_hpc.worker.sandbox import SandboxError
from funnel_hpc.worker.standin import CLONE_NEWUSER, StandIn, UnshareFailed

SETTING = "worker.sandbox_uids.subordinate"
MODES = ("auto", "off")
INSIDE = 65535  # ids 1-65535 inside come from the range
SUBID_FILES = {"uid": "/etc/subuid", "gid": "/etc/subgid"}
# where Debian's uidmap (and every distribution's shadow-utils) installs them; never PATH
TOOLS = {"uid": ("/usr/bin/newuidmap", "/bin/newuidmap"),
         "gid": ("/usr/bin/newgidmap", "/bin/newgidmap")}
TOOL_TIMEOUT_SECONDS = 30.0
REOWN = str(Path(__file__).with_name("reown.py"))
REOWN_TIMEOUT_SECONDS = 600.0
# what the re-owning helper keeps as root inside its own namespace (reaching only ids
# of the map: the worker's and its range)
REOWN_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER")


class Subordinate:
    """A non-root worker's sandbox ids: root inside is (uid, gid), ids 1-65535 inside are
    host ids first_uid.. and first_gid.. (its subordinate ranges); the task's user
    namespace so mapped, made on first use and held until close()."""

    __slots__ = ("first_gid", "first_uid", "gid", "newgidmap", "newuidmap", "uid", "user_fd")

    def __init__(self, uid: int, gid: int, first_uid: int, first_gid: int,
                 newuidmap: str, newgidmap: str) -> None:
        self.uid = uid
        self.gid = gid
        self.first_uid = first_uid
        self.first_gid = first_gid
        self.newuidmap = newuidmap
        self.newgidmap = newgidmap
        self.user_fd = -1

    def describe(self) -> str:
        return (f"ids 0-{INSIDE} inside: root the worker's uid {self.uid}, ids 1-{INSIDE} "
                f"its subordinate uids {self.first_uid}-{self.first_uid + INSIDE - 1} and gids "
                f"{self.first_gid}-{self.first_gid + INSIDE - 1}")

    def owns_uid(self, uid: int) -> bool:
        return self.first_uid <= uid < self.first_uid + INSIDE

    def owns_gid(self, gid: int) -> bool:
        return self.first_gid <= gid < self.first_gid + INSIDE

    def map_argv(self, pid: int) -> list[list[str]]:
        """newuidmap's and newgidmap's argv for the namespace of process `pid`."""
        return [[self.newuidmap, str(pid), "0", str(self.uid), "1",
                 "1", str(self.first_uid), str(INSIDE)],
                [self.newgidmap, str(pid), "0", str(self.gid), "1",
                 "1", str(self.first_gid), str(INSIDE)]]

    def write_maps(self, pid: int) -> None:
        """Map the user namespace of process `pid` (both tools at once). Raises
        SandboxError naming the tool and its words."""
        runs = []
        try:
            for argv in self.map_argv(pid):
                runs.append((argv, subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE, env={}, cwd="/")))
        except OSError as error:
            raise SandboxError(f"{argv[0]}: {error.strerror}") from None
        finally:
            failures = []
            for argv, proc in runs:
                try:
                    _out, err = proc.communicate(timeout=TOOL_TIMEOUT_SECONDS)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _out, err = proc.communicate()
                if proc.returncode != 0:
                    words = err.decode(errors="replace").strip()[:300]
                    failures.append(f"{' '.join(argv)} failed ({proc.returncode}): {words}")
        if failures:
            raise SandboxError("; ".join(failures))

    def namespace(self) -> int:
        """A descriptor of the task's user namespace (made on first use). Raises
        SandboxError."""
        if self.user_fd < 0:
            self.user_fd = _mapped_namespace(self)
        return self.user_fd

    def join_argv(self, fd: int, caps: tuple[str, ...] = BLOCK_CAPS) -> list[str]:
        """bwrap options (after its --cap-drop ALL, instead of --unshare-user): join the
        namespace at descriptor `fd`; the capabilities root keeps there (by default a
        root worker's slot's set: they reach only ids of the map)."""
        return ["--userns", str(fd), *(arg for cap in caps for arg in ("--cap-add", cap))]

    def close(self) -> None:
        """Let the task's user namespace go (again: nothing)."""
        if self.user_fd >= 0:
            os.close(self.user_fd)
            self.user_fd = -1

    def take_back(self, roots: list[str]) -> None:
        """Re-own to the worker every entry under `roots` owned by a subordinate id (the
        task's processes have ended). Raises SandboxError naming what failed."""
        roots = [root for root in roots if os.path.lexists(root)]
        if not roots or all_own(roots, self.uid, self.gid):
            return
        fd = self.namespace()
        argv = ["bwrap", "--uid", "0", "--gid", "0", "--unshare-pid", "--unshare-ipc",
                "--unshare-net", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                *self.join_argv(fd, REOWN_CAPS), "--ro-bind", "/", "/", "--dev", "/dev"]
        for root in roots:
            argv += ["--bind", root, root]
        argv += ["--clearenv", "--", sys.executable, "-I", "-S", REOWN, *roots]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"},
                                    cwd="/", start_new_session=True, pass_fds=(fd,))
        except OSError as error:
            raise SandboxError(f"cannot start bwrap to re-own the task's files: "
                               f"{error.strerror}") from None
        try:
            _out, err = proc.communicate(timeout=REOWN_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            raise SandboxError(f"re-owning the task's files took over "
                               f"{REOWN_TIMEOUT_SECONDS:g} s") from None
        if proc.returncode != 0:
            raise SandboxError("cannot re-own the task's files to the worker: "
                               + err.decode(errors="replace").strip()[:300])


def _mapped_namespace(ids: Subordinate) -> int:
    """A new user namespace mapped as `ids` says, held by descriptor: a forked child makes
    it (unshare) and waits while newuidmap/newgidmap map it, then ends. Its descriptor.
    libc is resolved before the fork; the child only makes system calls."""
    import ctypes

    unshare = ctypes.CDLL(None, use_errno=True).unshare
    try:
        with StandIn(unshare, CLONE_NEWUSER) as pid:
            ids.write_maps(pid)
            try:
                return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as error:
                raise SandboxError(f"cannot hold the user namespace: {error.strerror}") from None
    except UnshareFailed as error:
        raise SandboxError(f"cannot make a user namespace for the subordinate ids: "
                           f"{error.strerror}") from None


def all_own(roots: list[str], uid: int, gid: int) -> bool:
    """True when every entry under roots is (uid, gid)'s and every directory could be
    read (then no subordinate id owns anything: nothing to re-own)."""
    for root in roots:
        info = os.lstat(root)
        if (info.st_uid, info.st_gid) != (uid, gid):
            return False
        if os.path.islink(root) or not os.path.isdir(root):
            continue
        failed: list[OSError] = []
        for dirpath, dirnames, filenames in os.walk(root, onerror=failed.append):
            for name in dirnames + filenames:
                entry = os.lstat(os.path.join(dirpath, name))
                if (entry.st_uid, entry.st_gid) != (uid, gid):
                    return False
        if failed:
            return False
    return True


def setting(value: str) -> str:
    """worker.sandbox_uids.subordinate, checked."""
    if value not in MODES:
        raise SandboxError(f"{SETTING} must be one of {', '.join(MODES)}, not {value!r}")
    return value


def find(mode: str, uid: int | None = None) -> Subordinate | str:
    """This (non-root) user's subordinate ids, or why there are none (a sentence)."""
    import pwd

    if setting(mode) == "off":
        return f"{SETTING} is off"
    uid = os.geteuid() if uid is None else uid
    if uid == 0:
        return "the worker is root (it uses worker.sandbox_uids.first and count)"
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return f"uid {uid} has no account, so no /etc/subuid entry"
    tools = {}
    for kind, paths in TOOLS.items():
        found = next((path for path in paths if _runnable(path)), None)
        if found is None:
            return (f"new{kind}map is not installed (looked for {' and '.join(paths)}; "
                    "Debian: uidmap)")
        tools[kind] = found
    firsts = {}
    for kind, path in SUBID_FILES.items():
        try:
            with open(path, encoding="utf-8", errors="replace") as lines:
                first = first_range(lines.read(), entry.pw_name, uid)
        except FileNotFoundError:
            return f"{path} does not exist"
        except OSError as error:
            return f"cannot read {path}: {error.strerror}"
        if first is None:
            return (f"{path} gives {entry.pw_name} (uid {uid}) no range of at least "
                    f"{INSIDE} ids")
        firsts[kind] = first
    return Subordinate(uid, entry.pw_gid, firsts["uid"], firsts["gid"], tools["uid"],
                       tools["gid"])


def first_range(text: str, name: str, uid: int) -> int | None:
    """The first id of the first range of at least INSIDE ids granted to the user (by
    name or by uid, as shadow-utils matches /etc/subuid lines), or None."""
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in (name, str(uid)):
            continue
        if not (fields[1].isdigit() and fields[2].isdigit()):
            continue
        first, count = int(fields[1]), int(fields[2])
        if count >= INSIDE and first > 0 and first + INSIDE - 1 <= 0xFFFFFFFE:
            return first
    return None


def _runnable(path: str) -> bool:
    """A regular file root owns (the setuid tool itself, not a user's stand-in)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    return info.st_uid == 0 and (info.st_mode & 0o170000) == 0o100000 \
        and os.access(path, os.X_OK)


def explain(mode: str, uid: int | None = None) -> str:
    """One line: what a bwrap sandbox of a worker running as this user (uid) gets inside
    with this setting, and why."""
    uid = os.geteuid() if uid is None else uid
    if uid == 0:
        return ("a root worker: ids 0-65535 inside with worker.sandbox_uids (first, count), "
                "else root only")
    try:
        found = find(mode, uid)
    except SandboxError as error:
        return str(error)
    if isinstance(found, str):
        return f"root only inside bwrap (no id range: {found})"
    return found.describe()
