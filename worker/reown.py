"""Re-own a task's files to the worker, run as root inside a user namespace whose map is
the sandbox's (worker/subids.py: root = the worker, 1-65535 = its subordinate ids).

    python -I -S reown.py ROOT...

Every entry under each ROOT (ROOT too) owned by an id other than 0 inside is chowned to
0 (the worker's uid or gid on the host), relative to its directory's descriptor, never
following a symlink (os.fwalk with follow_symlinks=False); a directory so re-owned gets
u+rwx, so the worker can empty and remove it. Entries of ids the map does not hold show
as the overflow id and cannot be chowned: they are named on stderr. Exit 0 when all
went, 1 otherwise. Standard library only; nothing of the task's runs here.
"""

import os
import stat
import sys


def reown(dir_fd: int, name: str, problems: list[str], shown: str) -> None:
    """Re-own one entry (relative to dir_fd) when it is not root's inside."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        uid = 0 if info.st_uid != 0 else -1
        gid = 0 if info.st_gid != 0 else -1
        if uid == -1 and gid == -1:
            return
        os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode) and (info.st_mode & 0o700) != 0o700:
            os.chmod(name, stat.S_IMODE(info.st_mode) | 0o700, dir_fd=dir_fd)
    except OSError as error:
        problems.append(f"{shown}: {error.strerror}")


def main(roots: list[str]) -> int:
    problems: list[str] = []
    for root in roots:
        parent, base = os.path.split(root.rstrip("/")) if root != "/" else ("/", ".")
        parent_fd = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            reown(parent_fd, base, problems, root)
        finally:
            os.close(parent_fd)
        if not os.path.isdir(root) or os.path.islink(root):
            continue

        def failed(error: OSError) -> None:
            problems.append(f"{error.filename}: {error.strerror}")

        for dirpath, dirnames, filenames, dir_fd in os.fwalk(root, onerror=failed,
                                                             follow_symlinks=False):
            for name in dirnames + filenames:
                # a directory is re-owned (and made searchable) before fwalk enters it
                reown(dir_fd, name, problems, os.path.join(dirpath, name))
    for problem in problems[:20]:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
