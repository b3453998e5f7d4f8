"""Seccomp filters for sandboxed executors: what a container runtime's default profile denies.

Contract: `filter_file(cache_dir, policy)` gives the path of a BPF program (libseccomp's
export, for this machine's architecture) that answers EPERM to what Docker's default
profile denies a container (new namespaces and mounts, keyrings, bpf, userfaultfd,
perf_event_open, kernel modules, kexec, the clocks, swap, reboot, file handles, io_uring,
clone3: ENOSYS so that libc falls back to clone, whose flags the filter can see...).
Policies, one per way the filter is installed:

- ``default`` (bwrap: ``--seccomp FD``, applied inside the sandbox, after bwrap's own set-up):
  all of the above, and ptrace.
- ``charliecloud`` (installed before ch-run by `seccomp_exec`): the same less the namespace
  and mount calls ch-run itself makes to build the container (they then run in ch-run's
  user namespace, without host privileges); ptrace denied.
- ``proot`` (installed before proot by `seccomp_exec`, inherited by every tracee): the
  default less ptrace (proot traces with it and emulates it for tracees), plus ENOSYS for
  every call proot 5.1 does not translate (openat2, statx, execveat, renameat2, faccessat2,
  io_uring, pidfd_*, the new mount API, process_vm_*...: programs then fall back to calls
  proot does translate), so no path reaches the host untranslated.

Calls through another ABI of the same kernel answer ENOSYS whatever they are (x32; and
under proot i386's int 0x80, which proot does not translate); bwrap's and ch-run's filters
hold the same rules for i386 programs, as Docker's profile does.
The filter is built once per architecture and policy (libseccomp through pyseccomp, a
ctypes binding: ~50 ms) and cached under cache_dir; later starts open the cached file.
When pyseccomp or libseccomp is missing, `FilterUnavailable` says why.
"""

from __future__ import annotations

import errno
import json
import os
import zlib

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from typing import BinaryIO

# Namespace flags of clone(2)/unshare(2) (linux/sched.h).
CLONE_NEWTIME = 0x00000080  # unshare only: clone's low byte is the exit signal
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_UNTRACED = 0x00800000  # a child no tracer follows: out of proot's reach
CLONE_NAMESPACES = (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER,
                    CLONE_NEWPID, CLONE_NEWNET)

# EPERM in every policy: what Docker's default profile refuses a container that has no
# extra capabilities (its allow-list leaves them out), as a deny-list.
DENIED = (
    "acct", "add_key", "keyctl", "request_key", "bpf", "userfaultfd", "perf_event_open",
    "init_module", "finit_module", "delete_module", "create_module", "get_kernel_syms",
    "query_module", "kexec_load", "kexec_file_load", "clock_settime", "clock_adjtime",
    "settimeofday", "adjtimex", "stime", "swapon", "swapoff", "reboot", "open_by_handle_at",
    "name_to_handle_at", "lookup_dcookie", "nfsservctl", "quotactl", "quotactl_fd", "iopl",
    "ioperm", "syslog", "vm86", "vm86old", "_sysctl", "uselib", "ustat", "sysfs",
    "fanotify_init", "io_uring_setup", "io_uring_enter", "io_uring_register", "pidfd_getfd",
)
# EPERM except under ch-run, which makes its container with them.
NAMESPACE_CALLS = (
    "setns", "mount", "umount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
)
# ENOSYS under proot: calls proot 5.1 (Debian 12) passes to the kernel untranslated although
# they take a path or reach another process (its translated list: src/syscall/seccomp.c).
PROOT_UNTRANSLATED = (
    "openat2", "statx", "execveat", "renameat2", "faccessat2", "fchmodat2", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "open_by_handle_at", "name_to_handle_at",
    "fanotify_init", "fanotify_mark", "open_tree", "move_mount", "fsopen", "fsconfig",
    "fsmount", "fspick", "mount_setattr", "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    "process_vm_readv", "process_vm_writev", "process_madvise", "process_mrelease", "kcmp",
    "setxattrat", "getxattrat", "listxattrat", "removexattrat", "open_tree_attr",
    "statmount", "listmount", "quotactl_fd",
)
# x86_64: every call numbered above proot 5.1's table (312, kcmp) answers ENOSYS unless it
# is known to take no path and reach no other process (so a call added to a later kernel
# is refused, not let through untranslated).
PROOT_TABLE_END = {"x86_64": 312}
PROOT_HIGHEST = 511
PROOT_SAFE_NEW = (
    "sched_setattr", "sched_getattr", "seccomp", "getrandom", "memfd_create", "membarrier",
    "mlock2", "copy_file_range", "preadv2", "pwritev2", "pkey_mprotect", "pkey_alloc",
    "pkey_free", "io_pgetevents", "rseq", "close_range", "epoll_pwait2",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "memfd_secret",
    "futex_waitv", "set_mempolicy_home_node", "cachestat", "map_shadow_stack", "futex_wake",
    "futex_wait", "futex_requeue", "mseal",
)
POLICIES = ("default", "charliecloud", "proot")
FORMAT = 2  # bump when the rules' meaning changes without their lists changing
CACHE_DIR = ".seccomp"
BPF_INSTRUCTION = 8  # bytes of one struct sock_filter


class FilterUnavailable(RuntimeError):
    """No seccomp filter can be built here (pyseccomp or libseccomp missing): why."""


def policy_rules(policy: str) -> dict[str, object]:
    """What a policy denies, as data (its digest names the cached filter)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown seccomp policy {policy!r}")
    eperm = list(DENIED)
    if policy != "charliecloud":
        eperm += NAMESPACE_CALLS
    if policy != "proot":
        eperm.append("ptrace")
    enosys = ["clone3"]
    if policy == "proot":
        enosys += PROOT_UNTRANSLATED
        eperm = [name for name in eperm if name not in enosys]
    namespaces = policy != "charliecloud"
    return {"format": FORMAT, "eperm": sorted(set(eperm)), "enosys": sorted(set(enosys)),
            "deny_namespaces": namespaces, "proot_numbers": policy == "proot",
            # the same rules for i386 programs on x86_64 (as Docker's profile), except under
            # proot, which translates no call a process makes through another ABI
            "with_i386": policy != "proot"}


def filter_file(cache_dir: str, policy: str) -> str:
    """The path of the policy's filter for this machine, built once and cached. Where the
    cache cannot be written (a worker running as the task's owner, a read-only work dir)
    it is built into a memfd of this process instead: /proc/self/fd/N."""
    rules = policy_rules(policy)
    arch = os.uname().machine
    # names the rules' content (zlib: hashlib is too costly to import at every worker start)
    digest = f"{zlib.crc32(json.dumps(rules, sort_keys=True).encode()):08x}"
    name = f"{arch}-{policy}-{digest}.bpf"
    directory = os.path.join(cache_dir, CACHE_DIR)
    path = os.path.join(directory, name)
    try:
        if os.stat(path).st_size % BPF_INSTRUCTION == 0:
            return path
    except OSError:
        pass
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        temporary = f"{path}.{os.getpid()}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    except OSError:
        return _in_memory(name, rules, arch)
    try:
        with os.fdopen(fd, "wb") as sink:
            build(rules, arch, sink)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return path


_MEMORY: dict[str, str] = {}  # filter name -> /proc/self/fd/N of its memfd


def _in_memory(name: str, rules: dict[str, object], arch: str) -> str:
    if name not in _MEMORY:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        with os.fdopen(os.dup(fd), "wb") as sink:
            build(rules, arch, sink)
        _MEMORY[name] = f"/proc/self/fd/{fd}"
    return _MEMORY[name]


def open_filter(cache_dir: str, policy: str) -> int:
    """A read-only descriptor of the policy's filter at offset 0 (not inheritable: pass it
    with pass_fds)."""
    return open_path(filter_file(cache_dir, policy))


def open_path(path: str) -> int:
    """A new descriptor of a filter_file path (its own offset: bwrap reads from it)."""
    in_memory = path.startswith("/proc/self/fd/")  # a magic link: O_NOFOLLOW would refuse it
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | (0 if in_memory else os.O_NOFOLLOW))


def build(rules: dict[str, object], arch: str, sink: BinaryIO) -> None:
    """Write the BPF program of `rules` for the native architecture (libseccomp) to sink."""
    try:
        import pyseccomp as seccomp  # type: ignore[import-untyped]
    except (ImportError, RuntimeError, OSError) as error:  # RuntimeError: no libseccomp
        raise FilterUnavailable(f"no seccomp filter: pyseccomp/libseccomp cannot be "
                                f"loaded ({error})") from None
    syscall_filter = seccomp.SyscallFilter(seccomp.ALLOW)
    # another ABI's calls (int 0x80, x32) are never let through a native-only filter; ENOSYS,
    # not a kill: proot voids a call by setting its number to -1, which looks like one
    syscall_filter.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.ERRNO(errno.ENOSYS))
    syscall_filter.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)  # a binary tree, not a list
    native = seccomp.system_arch()
    if rules["with_i386"] and arch == "x86_64":
        syscall_filter.add_arch(seccomp.Arch.X86)
    enosys = seccomp.ERRNO(errno.ENOSYS)
    eperm = seccomp.ERRNO(errno.EPERM)

    def number(name: str) -> int | None:
        try:
            resolved = seccomp.resolve_syscall(native, name)
        except (ValueError, OSError):
            return None
        return resolved if isinstance(resolved, int) and resolved >= 0 else None

    for action, names in ((enosys, rules["enosys"]), (eperm, rules["eperm"])):
        assert isinstance(names, list)
        for name in names:
            try:  # by name: each arch its own number (vm86, stime: i386's only)
                syscall_filter.add_rule(action, name)
            except (OSError, ValueError):  # a call no arch of the filter has, or one
                continue                   # newer than libseccomp (the numbers below)
    if rules["deny_namespaces"]:
        for flag in CLONE_NAMESPACES + (CLONE_NEWTIME,):
            syscall_filter.add_rule(eperm, "unshare", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    else:
        syscall_filter.add_rule(eperm, "unshare",
                                seccomp.Arg(0, seccomp.MASKED_EQ, CLONE_NEWTIME, CLONE_NEWTIME))
    clone_flags = (CLONE_UNTRACED,) + (CLONE_NAMESPACES if rules["deny_namespaces"] else ())
    for flag in clone_flags:  # clone's flags are its first argument on every arch but s390
        syscall_filter.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    if rules["proot_numbers"] and arch in PROOT_TABLE_END:
        safe = {number(name) for name in PROOT_SAFE_NEW}
        listed = {number(name) for name in [*rules["enosys"], *rules["eperm"]]}  # type: ignore[misc]
        for nr in range(PROOT_TABLE_END[arch] + 1, PROOT_HIGHEST + 1):
            if nr not in safe and nr not in listed:
                syscall_filter.add_rule(enosys, nr)
    syscall_filter.export_bpf(sink)
