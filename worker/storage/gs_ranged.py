"""Ranged, parallel downloads of large gs:// objects (see storage/gs.py), then a check.

The object's size, hashes and generation are read once (GsStore.get_file's metadata
request); every range asks for that generation (a newer upload fails the range with 412
instead of mixing versions) and is written at its offset in a file made at full size.
The result must have the size, and the CRC32C (else MD5) the object has, or it is removed
and the failure is transient (tried again). Cost: the ranges' requests, and one read of
the file to hash it (from the page cache, at memory speed).
"""

from __future__ import annotations

import base64
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, wait

from funnel_hpc.worker.storage.errors import Stopped, StorageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from typing import Any, Protocol

    class RangedStore(Protocol):
        """What ranged downloads use of a store (gs.py's GsStore)."""

        chunk: int
        timeout: float

        def check_stop(self, url: str) -> None: ...
        def call(self, url: str, work: Callable[[], Any]) -> Any: ...
        def pool(self) -> ThreadPoolExecutor: ...

READ_CHUNK = 1 << 20


class _Abandoned(Stopped):
    """A range given up because another range of the same file failed."""


class _At:
    """A file-like sink writing at an offset of an open file (the library calls write())."""

    def __init__(self, fd: int, offset: int, end: int, url: str, stop: threading.Event,
                 check: Callable[[], None]):
        self.fd = fd
        self.offset = offset
        self.end = end  # the range's last byte: a server that ignores Range is caught here
        self.url = url
        self.stop = stop  # another range failed: give up too
        self.check = check  # raises Stopped once the task is canceled

    def write(self, data: bytes) -> int:
        if self.stop.is_set():
            raise _Abandoned(f"{self.url}: range abandoned after another range failed")
        self.check()
        if self.offset + len(data) > self.end + 1:
            raise StorageError(f"{self.url}: the server sent more than the range ending at "
                               f"byte {self.end} (Range ignored?)")
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, self.offset)
            self.offset += written
            view = view[written:]
        return len(data)

    def tell(self) -> int:
        return self.offset


def download_ranges(store: RangedStore, url: str, blob: Any, dest: Path) -> None:
    """blob (with its metadata) into dest, in ranges of store.chunk, several at once."""
    size = int(blob.size)
    expected = {"crc32c": blob.crc32c, "md5": blob.md5_hash}  # before ranges touch blob
    generation = blob.generation
    bucket, name = blob.bucket, blob.name
    abandon = threading.Event()

    def one(start: int, end: int) -> None:
        store.check_stop(url)
        sink = _At(fd, start, end, url, abandon, lambda: store.check_stop(url))
        store.call(url, lambda: bucket.blob(name).download_to_file(
            sink, start=start, end=end, raw_download=True, checksum=None, retry=None,
            timeout=store.timeout, if_generation_match=generation))
        if sink.offset != end + 1:
            raise StorageError(f"{url}: range {start}-{end} ended after "
                               f"{sink.offset - start} bytes", transient=True)

    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        os.ftruncate(fd, size)
        pool = store.pool()
        futures = [pool.submit(one, start, min(start + store.chunk, size) - 1)
                   for start in range(0, size, store.chunk)]
        done, _running = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [future for future in done if future.exception() is not None]
        if failed:
            abandon.set()
            for future in futures:
                future.cancel()
            wait(futures)  # none may write to fd once it is closed
            raise _first_error(futures)
    finally:
        os.close(fd)
    _check(url, dest, size, expected)


def _first_error(futures: list[Any]) -> BaseException:
    """The first range's own failure (not another range's 'abandoned')."""
    errors = [future.exception() for future in futures
              if not future.cancelled() and future.exception() is not None]
    real = [error for error in errors if not isinstance(error, _Abandoned)]
    first: BaseException = (real or errors)[0]
    return first


def _check(url: str, dest: Path, size: int, expected: dict[str, str | None]) -> None:
    """dest has the object's size and hash, or it is removed (a transient failure)."""
    found = os.stat(dest).st_size
    problem = f"{found} bytes, not {size}" if found != size else None
    if problem is None and (expected["crc32c"] or expected["md5"]):
        kind = "crc32c" if expected["crc32c"] else "md5"
        digest = _digest(dest, kind)
        if digest != base64.b64decode(str(expected[kind])):
            problem = f"{kind.upper()} {base64.b64encode(digest).decode()}, not {expected[kind]}"
    if problem is not None:
        dest.unlink()
        raise StorageError(f"{url}: the ranges put together do not match the object: "
                           f"{problem}", transient=True)


def _digest(path: Path, kind: str) -> bytes:
    if kind == "crc32c":
        import google_crc32c

        hasher: Any = google_crc32c.Checksum()  # type: ignore[no-untyped-call]
    else:
        import hashlib

        hasher = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as source:
        while block := source.read(READ_CHUNK):
            hasher.update(block)
    return bytes(hasher.digest())
