"""Apply OCI layer tarballs to a root file system directory, rootless and hostile-layer safe.

Contract: `unpack_layers(rootfs, layers, image)` creates `rootfs` and applies each
(path, descriptor) layer in order: whiteouts (`.wh.NAME`) and opaque directories
(`.wh..wh..opq`) remove what lower layers put there; symlinks are created as they are and
never followed; hard links must point at a file already inside the root. Every directory is
entered with O_NOFOLLOW from the root down, so nothing a layer plants can send a later entry
outside: an entry with a `..` component, or whose parent is a symlink or a file, or a hard
link to a missing or outside path raises ImageError("refused") naming the entry. Absolute
names are re-rooted. Device nodes and fifos are skipped (returned as notes), setuid/setgid
bits dropped, owners not changed, group/other write removed (the image is shared, read-only).
Each layer's digest is checked again as it is read: a corrupt cached blob raises BlobCorrupt.
Caps (`Limits`): each entry's header is checked before its data is read or written, so a
layer that would expand past `worker.image_max_bytes` (all layers), past
`worker.image_max_ratio` times its compressed size (at least `image_ratio_min_layer_bytes`),
or hold more than `worker.image_max_entries` entries (all layers) raises CapExceeded
("refused", naming the key) having written at most the cap; pax and GNU long-name headers
over MAX_META are refused before tarfile reads them into memory.
Cost: one read of each layer; per entry a few syscalls (parent directories stay open; a
name is created first and only replaced when something is there).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tarfile
import zlib
from pathlib import Path

from . import ImageError, Limits

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from io import BufferedIOBase

    from . import Json

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
CHUNK = 1 << 20
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# headers whose data tarfile reads whole into memory: pax, GNU long names; real ones are small
META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
              tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
MAX_META = 1 << 20


class BlobCorrupt(ImageError):
    """A cached layer's bytes no longer match its digest."""

    def __init__(self, image: str, digest: str) -> None:
        super().__init__("digest", image, f"digest mismatch for blob {digest} (cached copy)")
        self.digest = digest


class CapExceeded(ImageError):
    """A layer would expand past one of the caps of `Limits` (worker.image_max_*)."""

    def __init__(self, image: str, digest: str, why: str) -> None:
        super().__init__("refused", image, f"layer {digest} {why}")
        self.digest = digest


class Budget:
    """What the layers unpacked so far used of the caps; refuses an entry that would pass one."""

    def __init__(self, limits: Limits, image: str) -> None:
        self.limits = limits
        self.image = image
        self.bytes_before = 0  # expanded bytes of the layers already applied
        self.entries = 0
        self.digest = ""
        self.layer_cap = 0     # expanded bytes the current layer may reach (ratio)

    def start_layer(self, descriptor: Json) -> None:
        self.digest = str(descriptor.get("digest", "?"))
        size = descriptor.get("size")
        compressed = size if isinstance(size, int) and size > 0 else 0
        self.layer_cap = max(compressed, self.limits.ratio_min_layer_bytes) * self.limits.max_ratio

    def end_layer(self, expanded: int) -> None:
        self.bytes_before += expanded

    def admit(self, end: int) -> None:
        """An entry after which the current layer has expanded to `end` bytes (its stream,
        or the sizes of its files if larger: a sparse file's holes are written out)."""
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise self._refuse(f"passes worker.image_max_entries ({self.limits.max_entries} "
                               "entries in the image)")
        self.check(end)

    def check(self, end: int) -> None:
        """Would the current layer's expanded stream reaching `end` bytes pass a cap?"""
        if self.bytes_before + end > self.limits.max_bytes:
            raise self._refuse(f"expands past worker.image_max_bytes "
                               f"({self.limits.max_bytes} bytes)")
        if end > self.layer_cap:
            raise self._refuse(f"expands past worker.image_max_ratio ({self.limits.max_ratio} "
                               f"times its compressed size, at least "
                               f"worker.image_ratio_min_layer_bytes): more than "
                               f"{self.layer_cap} bytes")

    def _refuse(self, why: str) -> CapExceeded:
        return CapExceeded(self.image, self.digest, why)


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses, before tarfile reads it into memory, a header larger than
    MAX_META or passing the layer's caps (tarfile reads pax and long-name data whole)."""

    def _proc_member(self, tar: LayerTar) -> tarfile.TarInfo:  # tarfile's private hook
        if self.type in META_TYPES:
            budget: Budget = tar.budget
            if self.size > MAX_META:
                raise budget._refuse(f"has a {self.size}-byte extended header (more than "
                                     f"{MAX_META})")
            budget.check(self.offset + tarfile.BLOCKSIZE + self.size)
        member: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]
        return member  # (_proc_member is not in typeshed)


class LayerTar(tarfile.TarFile):
    """A streamed layer tar whose headers are checked against a Budget."""

    tarinfo = BoundedTarInfo

    def __init__(self, *args: object, budget: Budget, **kwargs: object) -> None:
        self.budget = budget
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def unpack_layers(rootfs: Path, layers: list[tuple[Path, Json]], image: str,
                  limits: Limits | None = None) -> list[str]:
    """Create `rootfs` and apply the layers in order; returns notes on skipped entries."""
    os.mkdir(rootfs, 0o755)
    os.chmod(rootfs, 0o755)
    notes: list[str] = []
    budget = Budget(limits or Limits(), image)
    root_fd = os.open(rootfs, DIR_FLAGS)
    try:
        for path, descriptor in layers:
            notes += apply_layer(root_fd, path, descriptor, image, budget)
    finally:
        os.close(root_fd)
    return notes


def apply_layer(root_fd: int, path: Path, descriptor: Json, image: str,
                budget: Budget) -> list[str]:
    """Apply one layer file to the tree open at `root_fd`."""
    media_type = descriptor.get("mediaType", LAYER_TYPES[1])
    if media_type not in LAYER_TYPES:
        raise ImageError("invalid", image, f"unsupported layer media type {media_type}")
    budget.start_layer(descriptor)
    with open(path, "rb") as raw:
        reader = HashingReader(raw)
        applier = LayerApplier(root_fd, image)
        try:
            # ignored: typeshed's tarfile._Fileobj also wants write/seek/tell; "r|" only reads
            with LayerTar.open(fileobj=reader, mode="r|*",  # type: ignore[call-overload]
                               budget=budget) as tar:
                files = 0  # what this layer's files hold: more than its stream if sparse
                while (member := tar.next()) is not None:
                    files += member.size if member.isreg() else 0
                    budget.admit(max(tar.offset, files))  # before its data is read
                    tar.members.clear()  # a stream keeps every member: not a million of them
                    applier.apply(member, tar)
                budget.end_layer(max(tar.offset, files))
        except (tarfile.TarError, EOFError, zlib.error) as error:
            if reader.finish() == descriptor.get("digest"):
                raise ImageError("invalid", image, f"layer {descriptor.get('digest')} is not a "
                                 f"valid tar: {error}") from None
            raise BlobCorrupt(image, descriptor["digest"]) from None
        finally:
            applier.close()
        if "digest" in descriptor and reader.finish() != descriptor["digest"]:
            raise BlobCorrupt(image, descriptor["digest"])
    return applier.notes


class HashingReader:
    """A read-only file that hashes what passes through it (to re-check a cached blob)."""

    def __init__(self, raw: BufferedIOBase) -> None:
        self.raw = raw
        self.hasher = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.hasher.update(data)
        return data

    def finish(self) -> str:
        """Hash the rest of the file (tar's end blocks, padding) and return the digest."""
        while self.read(CHUNK):
            pass
        return "sha256:" + self.hasher.hexdigest()


class LayerApplier:
    """Applies the entries of one layer; remembers what this layer wrote (for whiteouts)."""

    def __init__(self, root_fd: int, image: str) -> None:
        self.root_fd = root_fd
        self.image = image
        self.written: set[str] = set()        # paths written by this layer
        self.holding: set[str] = set()        # directories holding what this layer wrote
        self.open_dirs: list[tuple[str, int]] = []  # the last parent chain, kept open
        self.notes: list[str] = []
        self.member = ""

    def close(self) -> None:
        self._forget_dirs()

    def apply(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        """Apply one entry; a file system refusal becomes ImageError naming it (not a full disk)."""
        self.member = member.name
        try:
            self._apply(member, tar)
        except ValueError as error:  # e.g. a NUL byte in a PAX name
            raise ImageError("invalid", self.image,
                             f"layer entry {self.member[:200]!r}: {error}") from None
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                raise
            raise ImageError("invalid", self.image, f"layer entry {self.member[:200]!r}: "
                             f"{error.strerror or error}") from None

    def _apply(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        parts = self._parts(member.name)
        if not parts:
            return  # the root itself keeps its mode
        parent = self._open_parent(parts[:-1])
        name, path = parts[-1], "/".join(parts)
        if name == OPAQUE:
            self._clear(parent, "/".join(parts[:-1]))
        elif name.startswith(WHITEOUT + WHITEOUT):
            return  # aufs bookkeeping (.wh..wh.plnk and the like), not content
        elif name.startswith(WHITEOUT):
            self._whiteout(parent, parts[:-1], name[len(WHITEOUT):])
        elif member.isdir():
            self._directory(parent, name, member.mode)
        elif member.isreg():
            self._file(parent, name, member, tar)
        elif member.issym():
            try:  # most names are new: try first, replace what is there only if needed
                os.symlink(member.linkname, name, dir_fd=parent)
            except FileExistsError:
                self._replace(parent, name)
                os.symlink(member.linkname, name, dir_fd=parent)
        elif member.islnk():
            self._hard_link(parent, name, path, member.linkname)
        else:
            self.notes.append(f"skipped {member.name!r}: device node, fifo or unknown type")
            return
        self.written.add(path)
        for depth in range(1, len(parts)):
            self.holding.add("/".join(parts[:depth]))

    def _refuse(self, why: str) -> ImageError:
        return ImageError("refused", self.image,
                          f"hostile layer entry {self.member[:200]!r}: {why}")

    def _parts(self, name: str) -> list[str]:
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise self._refuse("'..' in its path")
        return parts

    def _open_parent(self, dirs: list[str]) -> int:
        """The directory `dirs` under the root, entered without following any symlink."""
        shared = 0
        while (shared < len(self.open_dirs) and shared < len(dirs)
               and self.open_dirs[shared][0] == dirs[shared]):
            shared += 1
        for _, fd in self.open_dirs[shared:]:
            os.close(fd)
        del self.open_dirs[shared:]
        for depth in range(shared, len(dirs)):
            parent = self.open_dirs[-1][1] if self.open_dirs else self.root_fd
            fd = self._enter(parent, dirs[depth], "/".join(dirs[:depth + 1]), create=True)
            self.open_dirs.append((dirs[depth], fd))
        return self.open_dirs[-1][1] if self.open_dirs else self.root_fd

    def _enter(self, parent: int, name: str, path: str, create: bool) -> int:
        try:
            return os.open(name, DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise self._refuse(f"{path!r} does not exist") from None
            os.mkdir(name, 0o755, dir_fd=parent)  # a parent the layer implies
            self.written.add(path)
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            os.fchmod(fd, 0o755)
            return fd
        except OSError:  # ELOOP or ENOTDIR: a symlink (possibly planted) or a file
            raise self._refuse(f"{path!r} is a symlink or a file, not a directory") from None

    def _forget_dirs(self) -> None:
        """Close the kept parent chain: after a removal it may name a deleted directory."""
        for _, fd in self.open_dirs:
            os.close(fd)
        self.open_dirs.clear()

    def _directory(self, parent: int, name: str, mode: int) -> None:
        existing = _lstat(parent, name)
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            self._replace(parent, name)
            os.mkdir(name, 0o700, dir_fd=parent)
        fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        try:
            os.fchmod(fd, dir_mode(mode))
        finally:
            os.close(fd)

    def _file(self, parent: int, name: str, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        source = tar.extractfile(member)
        if source is None:
            raise self._refuse("a regular file without data")
        try:  # O_EXCL: never write into an existing inode (it may be linked)
            fd = os.open(name, FILE_FLAGS, 0o600, dir_fd=parent)
        except FileExistsError:
            self._replace(parent, name)
            fd = os.open(name, FILE_FLAGS, 0o600, dir_fd=parent)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
            os.fchmod(fd, file_mode(member.mode))
            out.flush()
            try:
                os.utime(fd, (member.mtime, member.mtime))
            except (OverflowError, ValueError):
                pass  # a nonsense time stamp: keep the extraction time

    def _hard_link(self, parent: int, name: str, path: str, target: str) -> None:
        parts = self._parts(target)
        if not parts:
            raise self._refuse("hard link to the root")
        if "/".join(parts) == path:
            return  # a link to itself: the file is already there
        target_parent = self.root_fd
        opened = []
        try:
            for depth, component in enumerate(parts[:-1]):
                target_parent = self._enter(target_parent, component,
                                            "/".join(parts[:depth + 1]), create=False)
                opened.append(target_parent)
            found = _lstat(target_parent, parts[-1])
            if found is None or stat.S_ISDIR(found.st_mode):
                raise self._refuse(f"hard link to {target!r}, which is not a file in the image")
            self._replace(parent, name)
            os.link(parts[-1], name, src_dir_fd=target_parent, dst_dir_fd=parent,
                    follow_symlinks=False)
        finally:
            for fd in opened:
                os.close(fd)

    def _replace(self, parent: int, name: str) -> None:
        """Remove whatever is at `name` (a directory with all it holds)."""
        existing = _lstat(parent, name)
        if existing is None:
            return
        if stat.S_ISDIR(existing.st_mode):
            self._forget_dirs_after(parent)
            shutil.rmtree(name, dir_fd=parent)
        else:
            os.unlink(name, dir_fd=parent)

    def _forget_dirs_after(self, parent: int) -> None:
        """Close kept directories below `parent` (they are about to be removed)."""
        for index, (_, fd) in enumerate(self.open_dirs):
            if fd == parent:
                for _, below in self.open_dirs[index + 1:]:
                    os.close(below)
                del self.open_dirs[index + 1:]
                return
        if parent == self.root_fd:
            self._forget_dirs()

    def _whiteout(self, parent: int, dirs: list[str], name: str) -> None:
        if name in ("", ".", "..") or name.startswith(WHITEOUT):
            raise self._refuse(f"bad whiteout name {name!r}")
        path = "/".join([*dirs, name])
        if path not in self.written and path not in self.holding:  # hides lower layers only
            self._replace(parent, name)

    def _clear(self, directory: int, prefix: str) -> None:
        """Opaque directory: remove what lower layers put here, keep this layer's entries."""
        self._forget_dirs_after(directory)
        for name in os.listdir(directory):
            path = f"{prefix}/{name}" if prefix else name
            if path not in self.written and path not in self.holding:
                self._replace(directory, name)
                continue
            found = _lstat(directory, name)
            if found is not None and stat.S_ISDIR(found.st_mode):
                inner = os.open(name, DIR_FLAGS, dir_fd=directory)
                try:
                    self._clear(inner, path)  # kept, but lower layers' contents go
                finally:
                    os.close(inner)


def _lstat(parent: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


def dir_mode(mode: int) -> int:
    """Image directories: sticky kept, setuid/setgid and group/other write dropped, >= 0755."""
    return (mode & 0o1755) | 0o755


def file_mode(mode: int) -> int:
    """Image files: setuid/setgid/sticky and group/other write dropped, readable by all."""
    mode = (mode & 0o755) | 0o644
    return mode | 0o111 if mode & 0o100 else mode
