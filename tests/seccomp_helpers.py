"""Attacker programs for the sandbox's seccomp filters, compiled static at test time (gcc).

- escape: openat2 (437, which proot 5.1 does not translate) of each path argument: prints
  what it read, or the errno; a directory is listed (how many entries are
  processes: numeric names). Then (x86_64) the first path again through the i386 ABI
  (int 0x80), which proot does not translate either.
- killer: F_SETSIG to SIGKILL, a 1 s CPU limit on its parent (proot, the tracer), tgkill,
  SIGKILL to its process group and to its parent, then open() of each path argument:
  untraced, a path reaches the host's file system.
- calls: a new user namespace, a keyring, bpf, perf_event_open, userfaultfd, mount,
  clone3, setns, and (x86_64) keyctl and unshare through the i386 ABI: prints name=errno
  for each (0: allowed).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.components import need

ESCAPE = r"""
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
  for (int i = 1; i < argc; i++) {
    struct open_how how; memset(&how, 0, sizeof how); how.flags = O_RDONLY;
    long fd = syscall(437, AT_FDCWD, argv[i], &how, sizeof how);
    if (fd < 0) { printf("%s errno=%d\n", argv[i], errno); continue; }
    char buf[4096]; int n = 0;
    long got = syscall(SYS_getdents64, fd, buf, sizeof buf);
    if (got >= 0) {
      for (long at = 0; at < got; at += ((struct dirent64 *)(buf + at))->d_reclen) {
        char first = ((struct dirent64 *)(buf + at))->d_name[0];
        n += first >= '0' && first <= '9';  /* a process */
      }
      printf("%s processes=%d\n", argv[i], n);
      continue;
    }
    long size = read(fd, buf, sizeof buf - 1); if (size < 0) size = 0; buf[size] = 0;
    printf("%s read=%s\n", argv[i], buf);
  }
#ifdef __x86_64__
  /* the i386 ABI's open (5) and read (3) through int 0x80, which proot does not translate;
     the path is copied to a static buffer (a static non-PIE binary: below 4 GiB) */
  static char low[256], text[256];
  long fd;
  strncpy(low, argc > 1 ? argv[1] : "/", sizeof low - 1);
  __asm__ volatile ("int $0x80" : "=a"(fd) : "a"(5), "b"(low), "c"(0) : "memory");
  if (fd < 0) { printf("int80 errno=%ld\n", -fd); return 0; }
  long size;
  __asm__ volatile ("int $0x80" : "=a"(size) : "a"(3), "b"(fd), "c"(text), "d"(255) : "memory");
  printf("int80 read=%s\n", size > 0 ? text : "");
#endif
  return 0;
}
"""

KILLER = r"""
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/syscall.h>
static void say(const char *name, long result) { printf("%s=%d\n", name, result < 0 ? errno : 0); }
int main(int argc, char **argv) {
  pid_t parent = 1;  /* proot: the init of the pid namespace the worker starts it in */
  int pipes[2]; pipe(pipes);
  struct rlimit one_second = {1, 1};
  say("fcntl_setsig", fcntl(pipes[0], 10 /* F_SETSIG */, SIGKILL));
  say("prlimit", syscall(SYS_prlimit64, parent, RLIMIT_CPU, &one_second, 0));
  say("tgkill", syscall(SYS_tgkill, parent, parent, SIGKILL));
  say("kill_group", kill(0, SIGKILL));
  say("kill", kill(parent, SIGKILL));
  fflush(stdout);
  usleep(300000);
  for (int i = 1; i < argc; i++) {
    char buf[256] = {0}; int fd = open(argv[i], O_RDONLY);
    if (fd < 0) { printf("%s errno=%d\n", argv[i], errno); continue; }
    long size = read(fd, buf, sizeof buf - 1); if (size < 0) size = 0; buf[size] = 0;
    printf("%s read=%s\n", argv[i], buf);
  }
  fflush(stdout);
  return 0;
}
"""

CALLS = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>
static void say(const char *name, long result) { printf("%s=%d\n", name, result < 0 ? errno : 0); }
int main(void) {
  struct perf_event_attr attr; memset(&attr, 0, sizeof attr);
  attr.type = PERF_TYPE_SOFTWARE; attr.size = sizeof attr;
  attr.config = PERF_COUNT_SW_TASK_CLOCK; attr.exclude_kernel = 1; attr.exclude_hv = 1;
  unsigned long long map[9] = {1, 4, 4, 1};  /* BPF_MAP_TYPE_HASH, key 4, value 4, 1 entry */
  unsigned long long clone_args[11] = {0};
  say("keyctl", syscall(SYS_keyctl, 1 /* KEYCTL_JOIN_SESSION_KEYRING */, 0));
  say("bpf", syscall(SYS_bpf, 0 /* BPF_MAP_CREATE */, map, 72));
  say("perf_event_open", syscall(SYS_perf_event_open, &attr, 0, -1, -1, 0));
  say("userfaultfd", syscall(SYS_userfaultfd, 1 /* UFFD_USER_MODE_ONLY */));
  say("mount", mount("none", "/tmp", "tmpfs", 0, 0));
  say("setns", syscall(SYS_setns, open("/proc/self/ns/uts", O_RDONLY), 0));
  say("clone3", syscall(435, clone_args, sizeof clone_args));
  say("unshare", unshare(CLONE_NEWUSER));
#ifdef __x86_64__
  long result;  /* the same through the i386 ABI (int 0x80): keyctl 288, unshare 310 */
  __asm__ volatile ("int $0x80" : "=a"(result) : "a"(288), "b"(1), "c"(0) : "memory");
  printf("i386_keyctl=%ld\n", result < 0 ? -result : 0);
  __asm__ volatile ("int $0x80" : "=a"(result) : "a"(310), "b"(CLONE_NEWUSER) : "memory");
  printf("i386_unshare=%ld\n", result < 0 ? -result : 0);
#endif
  fflush(stdout);
  return 0;
}
"""

PROGRAMS = {"escape": ESCAPE, "killer": KILLER, "calls": CALLS}


def compile_programs(directory: Path) -> dict[str, Path]:
    """Each program static, world-readable and executable, in `directory`."""
    gcc = shutil.which("gcc")
    need("gcc", gcc is not None, "scripts/setup/40-worker.sh installs it")
    assert gcc is not None
    built = {}
    for name, source in PROGRAMS.items():
        (directory / f"{name}.c").write_text(source)
        subprocess.run([gcc, "-static", "-no-pie", "-O1", "-o", str(directory / name),
                        str(directory / f"{name}.c")], check=True, capture_output=True)
        (directory / name).chmod(0o755)
        built[name] = directory / name
    return built


def parse(stdout: str) -> dict[str, str]:
    """The programs' "name=value" lines ("PATH errno=N", "PATH read=TEXT", "call=N")."""
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
