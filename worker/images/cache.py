"""Content-addressed image cache, safe to share between workers on many nodes (NFS too).

Layout under the cache directory (what was fetched with credentials is 0600, and images/
and refs/<os-arch>/ are 0711: a local user cannot list them to find a private image):
    blobs/sha256/<hex>                 verified blobs (manifests, configs, layers), 0644
    images/<manifest hex>/rootfs/      an unpacked image; the directory appears by one rename,
    images/<manifest hex>/image.json   complete, with its config (so it is never half-written)
    refs/<os-arch>/<reference>.json    what a reference resolved to, when, and under which
                                       credential scope (access.py) it was fetched
    grants/<scope>/<hex>               the blob was fetched under that scope (an empty file;
                                       <scope> is "public" or the scope's sha256)
    locks/<name>.lock                  fcntl.flock locks: one per blob download, one per unpack
Images belong to whoever may pull them: a reference is served from its record, and a blob
reused by a pull, only for an owner who may use one of their scopes; otherwise it is fetched
again from the registry with the owner's rights (proof that the owner may have it) and its
new scope granted. An unpacked image is reached only through a reference record or a pull
whose blobs all passed that test (never from a manifest digest alone).
The first worker to need a blob or an image takes its lock and writes it under a temporary
name in the same directory, then renames it; the others wait on the lock and find it done.
Anything temporary left by a crashed worker is removed by the next holder of that lock.
Durability: blobs are not fsynced (every reader checks a blob's digest as it reads it, and a
torn one is fetched again); an unpacked tree is flushed with one syncfs before the rename
that publishes it, which also flushes the blobs it was made from.
Cost: a warm lookup reads two small JSON files; a cold blob costs one lock; an unpack one
syncfs (each fsync costs a journal commit, ~2-20 ms on a busy disk).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BufferedIOBase
from pathlib import Path

from . import ImageRoot, platform
from .access import PUBLIC
from .reference import Reference

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from . import Json

BLOBS = "blobs/sha256"
IMAGES = "images"
REFS = "refs"
GRANTS = "grants"
LOCKS = "locks"
IMAGE_FILE = "image.json"
ROOTFS = "rootfs"
TEMP = ".tmp-"
UNLISTED = 0o711
MAX_FILE_NAME = 240


class Cache:
    """One cache directory: blobs, unpacked images, resolved references and their locks."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def lookup(self, ref: Reference, tag_ttl: float | None,
               scopes: frozenset[str] | None) -> ImageRoot | None:
        """The image a reference resolved to before, if it is still unpacked (and fresh), and
        was fetched under one of `scopes` (None: any, for tools run by the admin)."""
        try:
            record = json.loads(self._ref_path(ref).read_bytes())
            if not ref.digest and tag_ttl is not None and time.time() - record["fetched"] > tag_ttl:
                return None
            if scopes is not None and record.get("scope") not in scopes:
                return None  # fetched with credentials this owner may not use (or unknown)
            return self.image(ref, record["digest"], record["manifest_digest"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            # never resolved here, or a torn record: a digest reference too is fetched from
            # its registry once (an unpacked manifest digest proves nothing about the owner)
            return None

    def image(self, ref: Reference, digest: str, manifest_digest: str) -> ImageRoot | None:
        """The unpacked image of `manifest_digest`, if there is one."""
        directory = self.root / IMAGES / _hex(manifest_digest)
        try:
            meta = json.loads((directory / IMAGE_FILE).read_bytes())
        except (OSError, ValueError):
            return None
        return ImageRoot(directory / ROOTFS, meta["config"], digest, manifest_digest,
                         ref.canonical())

    def remember(self, ref: Reference, digest: str, manifest_digest: str, scope: str) -> None:
        """Record what `ref` resolved to under `scope` (atomically: readers see the old or the
        new record)."""
        path = self._ref_path(ref)
        record = {"reference": ref.canonical(), "digest": digest,
                  "manifest_digest": manifest_digest, "fetched": time.time(), "scope": scope}
        self._unlisted(path.parent)
        fd, temp = tempfile.mkstemp(prefix=TEMP, dir=path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                os.fchmod(out.fileno(), _mode(scope))
                json.dump(record, out)
            os.rename(temp, path)
        except BaseException:
            _unlink(temp)
            raise

    def blob_path(self, digest: str) -> Path:
        return self.root / BLOBS / _hex(digest)

    def ensure_blob(self, descriptor: Json, download: Callable[[Json, BufferedIOBase], None],
                    scopes: frozenset[str] | None, scope: Callable[[], str]) -> Path:
        """The verified blob on disk; `download(descriptor, file)` fills it if it is missing
        or was fetched under none of `scopes` (None: any will do), then `scope()` says what
        the download was made under, and that is granted."""
        path = self.blob_path(descriptor["digest"])
        if _has_size(path, descriptor["size"]) and self._granted(path.name, scopes):
            return path
        self._mkdirs(path.parent)
        with self._lock(f"blob-{path.name}"):
            if _has_size(path, descriptor["size"]) and self._granted(path.name, scopes):
                return path  # another worker fetched it while we waited
            _remove_temps(path.parent, f"{TEMP}{path.name}-")
            fd, temp = tempfile.mkstemp(prefix=f"{TEMP}{path.name}-", dir=path.parent)
            try:
                with os.fdopen(fd, "w+b") as out:
                    download(descriptor, out)
                    os.fchmod(out.fileno(), _mode(scope()))
                # the same bytes if it was there (digest checked): a reader keeps its inode
                os.rename(temp, path)  # no fsync: see the module docstring
            except BaseException:
                _unlink(temp)
                raise
            self.grant(path.name, scope())
        return path

    def grant(self, blob_hex: str, scope: str) -> None:
        """Record that the blob was fetched under `scope`."""
        directory = self.root / GRANTS / _scope_dir(scope)
        self._mkdirs(directory)
        os.close(os.open(directory / blob_hex, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))

    def _granted(self, blob_hex: str, scopes: frozenset[str] | None) -> bool:
        if scopes is None:
            return True
        return any(os.path.exists(self.root / GRANTS / _scope_dir(scope) / blob_hex)
                   for scope in scopes)

    def discard_blob(self, digest: str) -> None:
        """Remove a blob found corrupt, so that the next ensure_blob fetches it again."""
        with self._lock(f"blob-{_hex(digest)}"):
            _unlink(self.blob_path(digest))

    def ensure_image(self, manifest_digest: str, build: Callable[[Path], Json]) -> None:
        """Unpack the image once: `build(rootfs)` fills a new directory and returns the config."""
        final = self.root / IMAGES / _hex(manifest_digest)
        if (final / IMAGE_FILE).exists():
            return
        self._unlisted(final.parent)
        with self._lock(f"image-{final.name}"):
            if (final / IMAGE_FILE).exists():
                return
            _remove_temps(final.parent, f"{TEMP}{final.name}-")
            temp = Path(tempfile.mkdtemp(prefix=f"{TEMP}{final.name}-", dir=final.parent))
            try:
                os.chmod(temp, 0o755)
                config = build(temp / ROOTFS)
                (temp / IMAGE_FILE).write_text(json.dumps(
                    {"manifest_digest": manifest_digest, "config": config}))
                os.chmod(temp / IMAGE_FILE, 0o644)
                _sync_file_system(temp)
                # not made durable itself: lost in a crash, the image is unpacked again
                os.rename(temp, final)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        self._mkdirs(self.root / LOCKS)
        # O_RDWR: on NFS flock is emulated with a POSIX write lock, which needs a writable fd
        fd = os.open(self.root / LOCKS / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _ref_path(self, ref: Reference) -> Path:
        arch, variant = platform()
        name = ref.canonical().replace("/", "+").replace(":", "=")  # neither is valid in a ref
        if len(name) > MAX_FILE_NAME:
            import hashlib
            name = hashlib.sha256(name.encode()).hexdigest()
        return self.root / REFS / f"linux-{arch}{'-' + variant if variant else ''}" / f"{name}.json"

    def _unlisted(self, path: Path) -> None:
        """A directory others may pass through but not list (images/, refs/<platform>/):
        a local user must not find the digests of private images there."""
        self._mkdirs(path)
        if os.stat(path).st_mode & 0o777 != UNLISTED:
            os.chmod(path, UNLISTED)

    def _mkdirs(self, path: Path) -> None:
        """Create `path` and missing parents 0755 whatever the umask (the cache is shared)."""
        if path.is_dir():
            return
        self._mkdirs(path.parent)
        try:
            os.mkdir(path, 0o755)
            os.chmod(path, 0o755)
        except FileExistsError:
            pass  # another worker made it


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def _mode(scope: str) -> int:
    """A blob's or record's mode: readable by all if public, else by the worker alone."""
    return 0o644 if scope == PUBLIC else 0o600


def _scope_dir(scope: str) -> str:
    """A scope as a file name: "public", or the sha256 of "<registry>|<username>"."""
    if scope == PUBLIC:
        return PUBLIC
    import hashlib
    return hashlib.sha256(scope.encode()).hexdigest()


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_temps(directory: Path, prefix: str) -> None:
    """Remove what a crashed holder of the same lock left behind."""
    for entry in os.scandir(directory):
        if entry.name.startswith(prefix):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                _unlink(entry.path)


def _sync_file_system(directory: Path) -> None:
    """Flush an unpacked tree before it is published: one syncfs instead of a fsync per file."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    os.sync()
