"""A task's files on the host: its bound directories made, inputs staged in, outputs out.

Every path goes through TaskPaths (worker/paths.py), whose files/ root is in the task
directory or in worker.scratch_dir (worker/scratch.py); nothing here follows a symlink a
task planted out of it. Transfers go through Storage (retries, several at once).
Cost: one walk of each output directory; one Storage batch each way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from funnel_hpc.worker.failures import Canceled, SystemFailure
from funnel_hpc.worker.paths import WILDCARD, check_container_path
from funnel_hpc.worker.storage import StorageError, join_url

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    import threading
    from typing import Any

    from funnel_hpc.worker.bound_inputs import Binder
    from funnel_hpc.worker.events import EventLog
    from funnel_hpc.worker.paths import TaskPaths
    from funnel_hpc.worker.storage import Storage

# A task's input/output `type` -> is it a directory; absent: the worker finds out.
KNOWN_TYPES = {"FILE": False, "DIRECTORY": True}
# Metadata keys of the types found for untyped inputs and outputs: JSON {index: type}.
INPUT_TYPES, OUTPUT_TYPES = "input_types", "output_types"

Upload = tuple[Path, str, str, str]  # host file, container path, url, the output's path
EmptyDir = tuple[Path, str, str]  # host directory, container path, url


class Staging:
    """One task's inputs and outputs, moved between their URLs and paths.host()."""

    def __init__(self, task: dict[str, Any], paths: TaskPaths, storage: Storage,
                 events: EventLog, canceled: threading.Event):
        self.task = task
        self.paths = paths
        self.storage = storage
        self.events = events
        self.canceled = canceled
        # output files directly under / made empty before the run -> their mtime then
        self.placeholders: dict[str, int] = {}

    def check_cancel(self) -> None:
        if self.canceled.is_set():
            raise Canceled()

    def prepare_dirs(self) -> list[tuple[str, str]]:
        """Make the host twin of every directory to bind; (host, container) binds."""
        mounts = self.paths.mounts(self.task)
        files = self.paths.top_level(self.task)
        binds = []
        for container in mounts:
            host = self.paths.host(container)
            role = files.get(container)
            if role is None:
                host.mkdir(parents=True, exist_ok=True)
            elif role == "output":  # an empty file to bind; staged inputs make their own
                self.paths.files.mkdir(parents=True, exist_ok=True)
                fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644)
                self.placeholders[container] = os.fstat(fd).st_mtime_ns
                os.close(fd)
            self.paths.ensure_inside(host)
            binds.append((str(host), container))
        return binds

    # ---- in ----

    def stage_in(self, binder: Binder | None = None) -> None:
        """binder: worker.bind_inputs (worker/bound_inputs.py) binds what it can instead."""
        fetched: list[tuple[dict[str, Any], Path]] = []  # inputs with a URL: fetched together
        bound: dict[int, bool] = {}  # id(item) -> is a directory
        for index, item in enumerate(self.task.get("inputs") or []):
            self.check_cancel()
            dest = self.paths.host(item["path"])
            is_dir = binder.bind(index, item, dest) if binder is not None else None
            if is_dir is not None:
                self.paths.ensure_inside(dest)
                bound[id(item)] = is_dir
            elif item.get("content") is None:
                fetched.append((item, dest))
            else:
                self._write_content(item, dest)
        try:
            kinds = self.storage.get_many([(item.get("url") or "", dest,
                                            KNOWN_TYPES.get(str(item.get("type"))))
                                           for item, dest in fetched])
        except StorageError as exc:
            path = fetched[exc.index or 0][0]["path"] if fetched else "?"
            raise SystemFailure(f"input {path} from {exc}") from None
        for _item, dest in fetched:
            self.paths.ensure_inside(dest)
        inputs = self.task.get("inputs") or []
        found = {id(item): is_dir for (item, _dest), is_dir in zip(fetched, kinds, strict=True)}
        found.update(bound)
        self.report_types(INPUT_TYPES, {index: found.get(id(item), False)
                                        for index, item in enumerate(inputs)
                                        if not item.get("type")})

    def _write_content(self, item: dict[str, Any], dest: Path) -> None:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(item["content"], encoding="utf-8")
        except OSError as exc:  # e.g. the work dir's disk is full: free what we wrote
            if dest.is_file():
                dest.unlink()
            raise SystemFailure(f"input {item['path']}: cannot write {dest}: "
                                f"{exc.strerror or exc}") from None
        self.paths.ensure_inside(dest)

    def report_types(self, key: str, kinds: dict[int, bool]) -> None:
        """What the worker found at untyped inputs' or outputs' paths, as task metadata
        (the gateway shows it as their `type`, gateway/store/task_views.py)."""
        if kinds:
            self.events.emit("metadata", metadata={key: json.dumps(
                {str(index): "DIRECTORY" if is_dir else "FILE"
                 for index, is_dir in kinds.items()}, separators=(",", ":"))})

    # ---- out ----

    def stage_out(self) -> None:
        uploads, empty_dirs = self.outputs()

        def uploaded(index: int, size: int) -> None:  # called in the order of uploads
            _host, container, url, _output = uploads[index]
            self.events.emit("output", url=url, path=container, size_bytes=str(size))

        try:
            self.storage.put_many([(host, url) for host, _c, url, _o in uploads], uploaded)
        except StorageError as exc:
            output = uploads[exc.index or 0][3] if uploads else "?"
            raise SystemFailure(f"output {output} to {exc}") from None
        self._make_empty_dirs(empty_dirs)

    def _make_empty_dirs(self, empty_dirs: list[EmptyDir]) -> None:
        """The empty directories of directory outputs, kept where the store can."""
        try:
            kept = self.storage.make_dirs([url for _host, _path, url in empty_dirs])
        except StorageError as exc:
            path = empty_dirs[exc.index or 0][1] if empty_dirs else "?"
            raise SystemFailure(f"output directory {path} to {exc}") from None
        for (_host, path, url), made in zip(empty_dirs, kept, strict=True):
            if not made:
                self.events.system_log(f"output directory {path}: empty, not kept ({url}: "
                                       "this URL scheme has no empty directories)")

    def output_files(self) -> list[Upload]:
        """(host file, container path, url, the output's path) of every file to upload."""
        return self.outputs()[0]

    def outputs(self) -> tuple[list[Upload], list[EmptyDir]]:
        """Every file to upload, and the empty directories of directory outputs."""
        uploads: list[Upload] = []
        empty_dirs: list[EmptyDir] = []
        outputs = self.task.get("outputs") or []
        for item in outputs:
            self.check_cancel()
            path = item["path"]
            if WILDCARD.search(path):
                uploads += self._matches(item)
            elif item.get("type") == "DIRECTORY" or self._untyped_dir(item):
                files, dirs = self._tree(item)
                uploads += files
                empty_dirs += dirs
            else:
                host = self.paths.host(path)
                if not host.is_file() or self._untouched(path, host):
                    raise SystemFailure(f"output file {path} does not exist")
                uploads.append((host, path, item["url"], path))
        for host in [upload[0] for upload in uploads] + [empty[0] for empty in empty_dirs]:
            self.paths.ensure_inside(host)  # a symlink to elsewhere is refused
        self.report_types(OUTPUT_TYPES, {
            index: self._untyped_dir(item) for index, item in enumerate(outputs)
            if not item.get("type") and not WILDCARD.search(item["path"])})
        return uploads, empty_dirs

    def _matches(self, item: dict[str, Any]) -> list[Upload]:
        """The files a wildcard output matches (check_task made sure path_prefix is a
        prefix of its path)."""
        path = item["path"]
        prefix = check_container_path(item["path_prefix"]).rstrip("/") + "/"
        matches = [m for m in self.paths.glob(path) if m[0].startswith(prefix)]
        if not matches:
            self.events.system_log(f"output {path}: no files matched")
        return [(host, container, join_url(item["url"], container[len(prefix):]), path)
                for container, host in matches]

    def _tree(self, item: dict[str, Any]) -> tuple[list[Upload], list[EmptyDir]]:
        """The files of a directory output, in the same order on every file system, and
        its directories that hold nothing (the output itself, when it is empty)."""
        path = item["path"]
        root = self.paths.host(path)
        if not root.is_dir():
            raise SystemFailure(f"output directory {path} does not exist")
        uploads: list[Upload] = []
        empty_dirs: list[EmptyDir] = []
        for dirpath, dirs, files in os.walk(root):  # never into a symlink (followlinks)
            dirs.sort()
            if not dirs and not files:
                rel = str(Path(dirpath).relative_to(root))
                rel = "" if rel == "." else rel
                empty_dirs.append((Path(dirpath), path.rstrip("/") + ("/" + rel if rel else ""),
                                   join_url(item["url"], rel) if rel else item["url"]))
            for name in sorted(files):
                host = Path(dirpath) / name
                rel = str(host.relative_to(root))
                uploads.append((host, path.rstrip("/") + "/" + rel, join_url(item["url"], rel),
                                path))
        return uploads, empty_dirs

    def _untouched(self, path: str, host: Path) -> bool:
        """An output file under / that the worker made empty and no executor wrote."""
        made = self.placeholders.get(check_container_path(path))
        if made is None:
            return False
        info = host.stat()
        return info.st_size == 0 and info.st_mtime_ns == made

    def _untyped_dir(self, item: dict[str, Any]) -> bool:
        """An output without a type that is a directory (not a symlink to one)."""
        if item.get("type"):
            return False
        host = self.paths.host(item["path"])
        return host.is_dir() and not host.is_symlink()
