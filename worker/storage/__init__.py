"""Storage: one small interface per URL scheme, and the dispatcher that drives it.

A store (``<scheme>.py`` here, imported only when a URL of its scheme is used) moves
single objects: ``get_file(url, dest)``, ``put_file(src, url)``, ``list(url)`` (names of
the files under a directory URL, and ``name/`` for each empty directory there),
``make_dir(url)`` (an empty directory: a zero-byte ``name/`` marker object on object
stores, the convention of their consoles) and ``exists(url)``; it raises StorageError with
``transient`` set for what is worth trying again (connection reset, 5xx, throttling).
``Storage`` adds what every store shares: directories, retries with backoff and jitter
bounded by ``storage.retry_seconds`` (retry.py), and up to
``storage.max_parallel_transfers`` transfers at once (results and errors reported in the
order given). Sources are opened once without following a final symlink and handed to
stores as ``/proc/self/fd/N``, so what was checked is what is sent.
"""

from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import urlparse

from funnel_hpc.worker.storage.base import (
    Store,
    directory_names,
    inside,
    is_marker,
    join_url,
    make_dirs,
    open_source,
    redact,
    redact_in,
)
from funnel_hpc.worker.storage.errors import Stopped, StorageError

# what the worker and the gateway use of the stores' shared parts, by these names
__all__ = ["STORES", "Stopped", "Storage", "StorageError", "Store", "directory_names",
           "inside", "join_url", "redact", "redact_in"]

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, TypeVar

    T = TypeVar("T")

    from funnel_hpc.core.config import WorkerConfig

# scheme -> (module under funnel_hpc.worker.storage, factory name); imported on first use
STORES = {
    "file": ("local", "make_store"),
    "http": ("http", "make_store"),
    "https": ("http", "make_store"),
    "s3": ("s3", "make_store"),
    "gs": ("gs", "make_store"),
    "ftp": ("ftp", "make_store"),
}


class Storage:
    """Picks the store for a URL (refusing schemes not in storage.allowed_schemes) and runs
    transfers with retries, several at once."""

    def __init__(self, config: WorkerConfig, stop: threading.Event | None = None,
                 owner: str | None = None):
        self.config = config  # the stores read their storage.* (and worker.*) keys
        self.stop = stop  # set: transfers in progress give up at their next chunk
        self.owner = owner
        options = config.storage
        self.allowed_schemes = set(options.allowed_schemes)
        self.retry_seconds = options.retry_seconds
        self.parallel = max(1, options.max_parallel_transfers)
        self._stores: dict[str, Store] = {}
        self._lock = threading.Lock()

    def scheme(self, url: str) -> str:
        if url.startswith("/"):
            return "file"
        return urlparse(url).scheme.lower()

    def store(self, url: str) -> Store:
        scheme = self.scheme(url)
        if scheme not in self.allowed_schemes:
            allowed = ", ".join(sorted(self.allowed_schemes))
            raise StorageError(f"{redact(url)}: URL scheme {scheme or '(none)'!r} is not allowed "
                               f"(storage.allowed_schemes: {allowed})")
        if scheme not in STORES:
            raise StorageError(f"{redact(url)}: no storage for scheme {scheme!r}")
        with self._lock:
            if scheme not in self._stores:
                import importlib

                module_name, factory = STORES[scheme]
                module = importlib.import_module(f"funnel_hpc.worker.storage.{module_name}")
                store: Store = getattr(module, factory)(self.config, scheme)
                store.stop = self.stop
                store.owner = self.owner
                self._stores[scheme] = store
            return self._stores[scheme]

    def retry(self, url: str, attempt: Callable[[], T]) -> T:
        from funnel_hpc.worker.storage.retry import with_retries

        return with_retries(redact(url), attempt, self.retry_seconds, self.stop)

    # ---- transfers ----

    def get(self, url: str, dest: Path, is_dir: bool = False) -> None:
        self.get_many([(url, dest, is_dir)])

    def get_many(self, items: Sequence[tuple[str, Path, bool | None]]) -> list[bool]:
        """Download files and directories (is_dir None: whichever the URL is), up to
        max_parallel_transfers at once; returns whether each item was a directory. A
        failure raises StorageError with `index` naming the item; the others are abandoned."""
        jobs: list[tuple[int, Store, str, Path]] = []
        kinds: list[bool] = []
        for index, (url, dest, is_dir) in enumerate(items):
            with _indexed(index):
                store = self.store(url)
                names = None if is_dir is False else self._listing(store, url, is_dir is None)
                kinds.append(names is not None)
                if names is None:
                    jobs.append((index, store, url, dest))
                    continue
                make_dirs(dest, [name for name in names if is_marker(name)], url)
                jobs += [(index, store, store.child(url, name), inside(dest, name, url))
                         for name in names if not is_marker(name)]

        def one(job: tuple[int, Store, str, Path]) -> None:
            _index, store, url, dest = job
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                self.retry(url, lambda: store.get_file(url, dest))
            except OSError as exc:  # e.g. the work dir's disk is full: free what we wrote
                if dest.is_file():
                    dest.unlink()
                raise StorageError(f"{redact(url)}: cannot write {dest}: "
                                   f"{exc.strerror or exc}") from None

        self.run_all(jobs, one, [job[0] for job in jobs])
        return kinds

    def _listing(self, store: Store, url: str, probe: bool) -> list[str] | None:
        """The names under a directory URL; probe (a type not given): None when the URL
        cannot be listed as a directory, so that it is fetched as a file (whose own error,
        if any, is then the one reported). One list call per untyped input."""
        if not probe:
            return self.retry(url, _bind(store.list, url))
        try:
            return self.retry(url, _bind(store.list, url))
        except Stopped:
            raise
        except StorageError:
            return None

    def put(self, src: Path, url: str) -> int:
        sizes: list[int] = []
        self.put_many([(src, url)], lambda _index, size: sizes.append(size))
        return sizes[0]

    def put_many(self, items: Sequence[tuple[Path, str]],
                 done: Callable[[int, int], None]) -> None:
        """Upload files, up to max_parallel_transfers at once; done(index, size) is called
        in the order of items, each once its upload (and all before it) succeeded."""
        stores = []
        for index, (_src, url) in enumerate(items):
            with _indexed(index):
                stores.append(self.store(url))

        def one(index: int) -> int:
            src, url = items[index]
            with open_source(src) as (path, size):
                self.retry(url, lambda: stores[index].put_file(path, url))
            return size

        self.run_all(list(range(len(items))), one, list(range(len(items))), done)

    def make_dirs(self, urls: Sequence[str]) -> list[bool]:
        """Make an empty directory at each url (up to max_parallel_transfers at once);
        whether each store kept it (False: its scheme has no empty directories)."""
        stores = []
        for index, url in enumerate(urls):
            with _indexed(index):
                stores.append(self.store(url))
        kept: list[bool] = []

        def one(index: int) -> bool:
            return self.retry(urls[index], _bind(stores[index].make_dir, urls[index]))

        self.run_all(list(range(len(urls))), one, list(range(len(urls))),
                     lambda _index, made: kept.append(made))
        return kept

    def run_all(self, jobs: list[Any], work: Callable[[Any], Any], indexes: list[int],
                done: Callable[[int, Any], None] | None = None) -> None:
        """work(job) for every job, up to self.parallel at once; results in job order."""
        if self.parallel == 1 or len(jobs) <= 1:
            for job, index in zip(jobs, indexes, strict=True):
                with _indexed(index):
                    self._check_stop(job)
                    result = work(job)
                if done is not None:
                    done(index, result)
            return
        from concurrent.futures import ThreadPoolExecutor

        abandon = threading.Event()

        def guarded(job: Any) -> Any:
            if abandon.is_set():
                raise Stopped("abandoned after an earlier failure")
            self._check_stop(job)
            return work(job)

        pool = ThreadPoolExecutor(min(self.parallel, len(jobs)), thread_name_prefix="transfer")
        try:
            futures = [pool.submit(guarded, job) for job in jobs]
            for future, index in zip(futures, indexes, strict=True):
                with _indexed(index):
                    try:
                        result = future.result()
                    except BaseException:
                        abandon.set()
                        raise
                if done is not None:
                    done(index, result)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _check_stop(self, job: object) -> None:
        if self.stop is not None and self.stop.is_set():
            raise Stopped("transfer not started (task canceled)")


class _indexed:
    """Tags a StorageError raised inside with the index of the item being handled."""

    def __init__(self, index: int):
        self.index = index

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        if isinstance(exc, StorageError) and exc.index is None:
            exc.index = self.index


def _bind(method: Callable[[str], T], url: str) -> Callable[[], T]:
    return lambda: method(url)


def __getattr__(name: str) -> Any:
    """The stores' classes by their old names (benchmarks import them from here)."""
    where = {"LocalStore": "local", "clone_or_copy": "beneath",
             "S3Store": "s3", "HttpStore": "http", "FtpStore": "ftp", "GsStore": "gs"}
    if name not in where:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"funnel_hpc.worker.storage.{where[name]}"), name)
