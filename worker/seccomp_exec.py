"""Install a seccomp filter, then exec a sandbox engine (proot, ch-run) under it.

    python -I -S seccomp_exec.py FD UID GID GUARD -- ENGINE ARGS...

FD: a descriptor of a BPF program (worker/seccomp.py's cached filter), read from offset 0;
UID GID: the user to become first ("-": stay); GUARD "proot": also keep the engine's own
process alive (below). Run as a file by the worker's own interpreter with -I -S (no site,
no environment, nothing of the task's), never as a preexec_fn (the worker is threaded):
the filter is set on this process and exec keeps it, so the engine and everything it
starts inherit it. Cost: one interpreter start and ctypes (~25 ms) per executor.

The proot guard: proot 5.1 sets no PTRACE_O_EXITKILL, so a tracee that kills proot with
SIGKILL (the one signal proot cannot catch to kill its tracees first) goes on untraced,
its paths no longer translated. The guard is a second, small filter that knows this
process's pid, which proot keeps across exec: SIGKILL sent to it, to its process group or
to every process (kill, tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo), prlimit64 on
it (a CPU limit ends in SIGKILL) and fcntl F_SETSIG to SIGKILL (SIGIO to an owner) answer
EPERM. Its program is assembled here (classic BPF, 30 instructions) because it is made
per run from the pid and this process must not load libseccomp; x86_64 only.
"""

import ctypes
import os
import struct
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_EPERM = 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM
SIGKILL = 9
F_SETSIG = 10
# x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl)
KILL, TKILL, TGKILL, RT_SIGQUEUEINFO, RT_TGSIGQUEUEINFO = 62, 200, 234, 129, 297
PRLIMIT64, FCNTL = 302, 72
# classic BPF opcodes
LD_W_ABS, JEQ_K, JSET_K, RET_K = 0x20, 0x15, 0x45, 0x06
NR, ARCH = 0, 4


def arg_low(index: int) -> int:
    """Offset of the low 32 bits of seccomp_data.args[index] (little-endian)."""
    return 16 + 8 * index


class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def guard_program(pid: int) -> bytes:
    """The proot guard for the engine whose pid is `pid` (see the module's docstring)."""
    program: list[tuple[int, object, object, int]] = []  # (code, jump-if-true, -false, k)

    def add(code: int, k: int, true: object = 0, false: object = 0) -> None:
        program.append((code, true, false, k))

    add(LD_W_ABS, ARCH)
    add(JEQ_K, AUDIT_ARCH_X86_64, 0, "allow")
    add(LD_W_ABS, NR)
    for nr, target in ((KILL, "sig1"), (TKILL, "sig1"), (RT_SIGQUEUEINFO, "sig1"),
                       (TGKILL, "sig2"), (RT_TGSIGQUEUEINFO, "sig2"), (PRLIMIT64, "self"),
                       (FCNTL, "fcntl")):
        add(JEQ_K, nr, target, 0)
    add(RET_K, SECCOMP_RET_ALLOW)
    labels = {}
    labels["sig1"] = len(program)
    add(LD_W_ABS, arg_low(1))
    add(JEQ_K, SIGKILL, "target", "allow")
    labels["sig2"] = len(program)
    add(LD_W_ABS, arg_low(2))
    add(JEQ_K, SIGKILL, "target", "allow")
    labels["target"] = len(program)
    add(LD_W_ABS, arg_low(0))
    add(JEQ_K, pid, "deny", 0)
    add(JEQ_K, 0, "deny", 0)  # kill(0): this process group, the engine with it
    add(JSET_K, 0x80000000, "deny", "allow")  # -1 (everyone) and -PGID
    labels["self"] = len(program)
    add(LD_W_ABS, arg_low(0))
    add(JEQ_K, pid, "deny", "allow")
    labels["fcntl"] = len(program)
    add(LD_W_ABS, arg_low(1))
    add(JEQ_K, F_SETSIG, 0, "allow")
    add(LD_W_ABS, arg_low(2))
    add(JEQ_K, SIGKILL, "deny", "allow")
    labels["deny"] = len(program)
    add(RET_K, SECCOMP_RET_EPERM)
    labels["allow"] = len(program)
    add(RET_K, SECCOMP_RET_ALLOW)
    raw = b""
    for index, (code, true, false, k) in enumerate(program):
        jumps = [labels[j] - index - 1 if isinstance(j, str) else j for j in (true, false)]
        raw += struct.pack("<HBBI", code, jumps[0], jumps[1], k)
    return raw


def install(libc: ctypes.CDLL, program: bytes) -> None:
    if not program or len(program) % 8:
        raise OSError(f"not a BPF program ({len(program)} bytes)")
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = Fprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"seccomp: {os.strerror(error)}")


def read_all(fd: int) -> bytes:
    data = b""
    while True:
        chunk = os.pread(fd, 1 << 16, len(data))
        if not chunk:
            return data
        data += chunk


def find_program(name: str) -> str:
    """name as execvp would find it on PATH (execvp itself imports modules: not after setuid)."""
    if "/" in name:
        return name
    for directory in os.environ.get("PATH", os.defpath).split(":"):
        path = os.path.join(directory or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    raise OSError(2, f"{name} not found on PATH")


def main(argv: list[str]) -> int:
    if len(argv) < 6 or argv[4] != "--":
        print("usage: seccomp_exec.py FD UID GID GUARD -- ENGINE ARGS...", file=sys.stderr)
        return 125
    fd, uid, gid, guard, command = int(argv[0]), argv[1], argv[2], argv[3], argv[5:]
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        engine = find_program(command[0])  # before becoming a user who may not read our libs
        program = read_all(fd)
        os.close(fd)
        if uid != "-":
            os.setgroups([])
            os.setgid(int(gid))
            os.setuid(int(uid))
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "no_new_privs")
        install(libc, program)
        if guard == "proot" and os.uname().machine == "x86_64":
            install(libc, guard_program(os.getpid()))
        os.execv(engine, command)
    except OSError as error:
        print(f"funnel seccomp_exec: {command[0]}: {error}", file=sys.stderr)
        return 126
    return 127  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
