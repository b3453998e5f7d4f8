"""file:// access with the task owner's rights, not the worker's.

``worker.allowed_dirs`` entries with ``{user}`` become the owner's (``/scratch/{user}`` is
``/scratch/alice`` for alice's tasks); a task without an owner (auth off) or whose owner
has no local account gets only the entries without it. A root worker opens and lists
beneath the allowed roots in a child it forks for each request, which drops to the owner
for good (groups, gid, uid from the password database) and passes the opened descriptor
back over a socket (SCM_RIGHTS): the kernel, ACLs included, decides what the owner may
read, and what it creates (outputs, their directories) is the owner's; the worker copies
through the descriptor. A root worker refuses file:// for an owner with no local account
(it could only check as root). A worker that is not root opens itself: with
``submit_as_owner`` it is the owner. Cost: one fork (~1 ms) per file opened or listed.

The gateway writes the owner into task.json as ``owner`` (null: auth off).
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import struct

from funnel_hpc.worker.storage.beneath import (
    USER,
    Opener,
    RootUnusable,
    libc,
    list_in,
    open_in,
)
from funnel_hpc.worker.storage.errors import StorageError

TYPE_CHECKING = False  # not typing's: importing typing costs every start
if TYPE_CHECKING:
    from typing import Any, NoReturn

HEADER = struct.Struct(">I")  # a reply: its JSON body's length, then the body
MAX_REPLY = 1 << 28  # a listing of a few million names
OP_OPEN, OP_LIST = "open", "list"


def local_account(owner: str) -> pwd.struct_passwd | None:
    """The owner's local account, or None (no such account, or a name no path may hold)."""
    if not isinstance(owner, str) or not owner or "/" in owner or owner in (".", ".."):
        return None
    try:
        return pwd.getpwnam(owner)
    except (KeyError, ValueError):  # ValueError: an embedded NUL
        return None


def access_for(allowed_dirs: list[str], owner: str | None) -> tuple[list[str], Opener]:
    """The allowed directories of a task of `owner` and the opener that checks its access."""
    plain = [entry for entry in allowed_dirs if USER not in entry]
    if owner is None:
        return plain, Opener()
    account = local_account(owner)
    if account is None:
        if os.geteuid() == 0:
            return plain, Refused(f"the task's owner {owner!r} has no local account to "
                                  "check file access as")
        return plain, Opener()
    dirs = plain + [entry.replace(USER, account.pw_name)
                    for entry in allowed_dirs if USER in entry]
    if os.geteuid() != 0 or account.pw_uid == 0:  # the kernel checks as us: nobody to become
        return dirs, Opener()
    return dirs, OwnerOpener(account)


class Refused(Opener):
    """No file:// access at all, for a reason."""

    def __init__(self, reason: str):
        self.reason = reason

    def open(self, root: str, parts: list[str], flags: int, create_dirs: bool = False,
             readable: bool = False) -> int:
        raise StorageError(f"refused: {self.reason}")

    def list(self, root: str, parts: list[str]) -> tuple[list[str], str | None]:
        raise StorageError(f"refused: {self.reason}")


class OwnerOpener(Opener):
    """Opens and lists in a short-lived child of this process that became the owner."""

    def __init__(self, account: pwd.struct_passwd):
        self.account = account
        self.groups = os.getgrouplist(account.pw_name, account.pw_gid)
        self.as_whom = f" (as the task's owner {account.pw_name})"

    def open(self, root: str, parts: list[str], flags: int, create_dirs: bool = False,
             readable: bool = False) -> int:
        _reply, fd = self._call({"op": OP_OPEN, "root": root, "parts": parts, "flags": flags,
                                 "create_dirs": create_dirs, "readable": readable})
        if fd is None:
            raise StorageError(f"{root}: the owner's file access child sent no file")
        return fd

    def list(self, root: str, parts: list[str]) -> tuple[list[str], str | None]:
        reply, _fd = self._call({"op": OP_LIST, "root": root, "parts": parts})
        names, link = reply.get("names"), reply.get("link")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise StorageError(f"{root}: the owner's file access child sent no listing")
        return names, link if isinstance(link, str) else None

    def _call(self, request: dict[str, object]) -> tuple[dict[str, object], int | None]:
        """Fork, become the owner, do the request there; its errors are raised here."""
        libc()  # loaded here: dlopen's lock may be held by another thread at fork
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = os.fork()
            if pid == 0:  # the child: never returns
                ours.close()
                _child(theirs, self.account, self.groups, request)
            theirs.close()
            try:
                reply, fd = receive(ours)
            except OSError as exc:
                raise StorageError(f"the file access child as {self.account.pw_name} "
                                   f"failed: {exc.strerror or exc}") from None
            finally:
                os.waitpid(pid, 0)
        finally:
            ours.close()
            theirs.close()
        code = reply.get("errno")
        if isinstance(code, int):
            if fd is not None:
                os.close(fd)
            kind = RootUnusable if reply.get("root") else OSError
            raise kind(code, os.strerror(code), reply.get("filename"))
        return reply, fd


def _child(sock: socket.socket, account: pwd.struct_passwd, groups: list[int],
           request: dict[str, Any]) -> NoReturn:
    """Drop to the owner for good (groups, gid, uid: the kernel then also makes this
    process undumpable, so the owner cannot read the worker's memory it copied), answer,
    exit without running anything of the parent's (atexit, buffers)."""
    status = 1
    try:
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)  # not the worker's cancel handlers
        os.setgroups(groups)
        os.setresgid(account.pw_gid, account.pw_gid, account.pw_gid)
        os.setresuid(account.pw_uid, account.pw_uid, account.pw_uid)
        reply, fd = answer(request)
        body = json.dumps(reply).encode()
        data = HEADER.pack(len(body)) + body
        sent = socket.send_fds(sock, [data], [fd]) if fd is not None else 0
        sock.sendall(data[sent:])
        status = 0
    finally:
        os._exit(status)


def receive(sock: socket.socket) -> tuple[dict[str, object], int | None]:
    """One reply: its JSON body and the descriptor sent with it, if any."""
    data, fds = b"", []
    while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
        if len(data) >= HEADER.size and HEADER.unpack_from(data)[0] > MAX_REPLY:
            raise OSError(0, "reply too long")
        chunk, more_fds, flags, _address = socket.recv_fds(sock, 1 << 20, 1)
        fds += more_fds
        if flags & socket.MSG_CTRUNC or len(fds) > 1 or not chunk:
            for fd in fds:
                os.close(fd)
            raise OSError(0, "unexpected end of replies" if not chunk else "too many files")
        data += chunk
    body = json.loads(data[HEADER.size:])
    return (body if isinstance(body, dict) else {}), (fds[0] if fds else None)


def answer(request: dict[str, Any]) -> tuple[dict[str, object], int | None]:
    """The child's side: do what was asked with this process's rights."""
    root, parts = str(request["root"]), [str(part) for part in request["parts"]]
    try:
        if request["op"] == OP_LIST:
            names, link = list_in(root, parts)
            return {"names": names, "link": link}, None
        return {}, open_in(root, parts, int(request["flags"]), bool(request.get("create_dirs")),
                           bool(request.get("readable")))
    except OSError as exc:
        return {"errno": exc.errno or 0, "filename": exc.filename,
                "root": isinstance(exc, RootUnusable)}, None
