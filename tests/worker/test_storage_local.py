"""file:// staging: no symlink is ever followed, even one swapped in during a copy
(issue 16, finding 1), and the cheap ways to stage local files (hard link, reflink)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import pytest

from funnel_hpc.core import config as config_mod
from funnel_hpc.worker.storage import Storage, StorageError, beneath
from funnel_hpc.worker.storage.local import LocalStore
from tests.storage_helpers import SwapLoop
from tests.worker_helpers import sh

ROUNDS = 2000
# a swapped-in symlink is refused as one, or (the walk, when the swap is undone between
# the refused open and the look at why) as "not a directory"
REFUSED = ("symbolic link", "not a directory")


@pytest.fixture(params=["openat2", "nofollow-walk"])
def opener(request, monkeypatch):
    """Both ways of opening beneath a root: the kernel's openat2, and the O_NOFOLLOW walk
    used where the kernel lacks it."""
    if request.param == "nofollow-walk":
        monkeypatch.setattr(beneath, "_openat2_works", [False])
    else:
        monkeypatch.setattr(beneath, "_openat2_works", [None])
        fd = beneath._openat2(os.open("/", os.O_RDONLY), "tmp", os.O_RDONLY)
        if fd is None:
            pytest.skip("this kernel has no openat2")
        os.close(fd)
    return request.param


def race_layout(tmp_path: Path) -> tuple[Path, Path, Path]:
    """allowed/d (a real dir with f.txt) and allowed/link -> outside (with its own f.txt)."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "d").mkdir(parents=True)
    outside.mkdir()
    (allowed / "d" / "f.txt").write_text("inside")
    (outside / "f.txt").write_text("OUTSIDE")
    (allowed / "link").symlink_to(outside)
    return allowed, outside, allowed / "d"


def test_inputs_never_read_through_a_swapped_in_symlink(tmp_path, opener):
    allowed, _outside, swapped = race_layout(tmp_path)
    store = LocalStore([str(allowed)])
    dest = tmp_path / "dest.txt"
    read, refused = 0, 0
    with SwapLoop(swapped, allowed / "link") as loop:
        for _ in range(ROUNDS):
            try:
                store.get_file(f"file://{swapped}/f.txt", dest)
            except StorageError as exc:
                assert any(words in str(exc) for words in REFUSED), exc
                refused += 1
                continue
            assert dest.read_text() == "inside"
            read += 1
        swaps = loop.swaps
    assert read + refused == ROUNDS and swaps > ROUNDS // 10, (read, refused, swaps)


def test_outputs_never_written_through_a_swapped_in_symlink(tmp_path, opener):
    allowed, outside, swapped = race_layout(tmp_path)
    store = LocalStore([str(allowed)])
    src = tmp_path / "result.txt"
    src.write_text("result")
    with SwapLoop(swapped, allowed / "link"):
        for index in range(ROUNDS):
            try:
                store.put_file(src, f"file://{swapped}/sub/out{index}.txt")
            except StorageError as exc:
                assert any(words in str(exc) for words in REFUSED), exc
    assert sorted(p.name for p in outside.iterdir()) == ["f.txt"]
    assert (outside / "f.txt").read_text() == "OUTSIDE"


def test_directory_listing_under_the_swap_stays_inside(tmp_path, opener):
    allowed, _outside, swapped = race_layout(tmp_path)
    store = LocalStore([str(allowed)])
    with SwapLoop(swapped, allowed / "link"):
        for _ in range(ROUNDS // 4):
            try:
                names = store.list(f"file://{swapped}")
            except StorageError:
                continue
            assert names == ["f.txt"]


def test_real_tasks_under_the_swap_never_touch_outside(harness):
    allowed, outside, swapped = race_layout(harness.data)
    results = []
    with SwapLoop(swapped, allowed / "link"):
        for _ in range(8):
            run = harness.run(harness.task(
                inputs=[{"path": "/in/f.txt", "url": f"file://{swapped}/f.txt"}],
                outputs=[{"path": "/out/o.txt", "url": f"file://{swapped}/o{harness.count}.txt"}],
                executors=[sh("cat /in/f.txt; cp /in/f.txt /out/o.txt")]))
            results.append((run.state, run.system_logs[-300:]))
            if run.state == "COMPLETE":
                assert run.executor(0)["stdout"] == "inside", run.system_logs
            else:
                assert run.state == "SYSTEM_ERROR"
                assert any(words in run.system_logs for words in REFUSED), run.system_logs
    assert sorted(p.name for p in outside.iterdir()) == ["f.txt"], results


def test_symlinks_and_dotdot_in_file_urls_are_refused(tmp_path, opener):
    allowed = tmp_path / "allowed"
    (allowed / "real").mkdir(parents=True)
    (allowed / "real" / "x.txt").write_text("x")
    (allowed / "alias").symlink_to(allowed / "real")  # even one that stays inside
    store = LocalStore([str(allowed)])
    with pytest.raises(StorageError, match="symbolic link"):
        store.get_file(f"file://{allowed}/alias/x.txt", tmp_path / "a")
    with pytest.raises(StorageError, match="'..'"):
        store.get_file(f"file://{allowed}/real/../real/x.txt", tmp_path / "b")
    with pytest.raises(StorageError, match="outside the allowed directories"):
        store.get_file(f"file://{tmp_path}/elsewhere.txt", tmp_path / "c")
    store.get_file(f"file://{allowed}/real/x.txt", tmp_path / "d")
    assert (tmp_path / "d").read_text() == "x"


def test_an_allowed_dir_named_through_a_symlink_works(tmp_path, opener):
    real = tmp_path / "real"
    real.mkdir()
    (real / "x.txt").write_text("x")
    (tmp_path / "nice").symlink_to(real)  # the admin's spelling: /data -> /mnt/data
    store = LocalStore([str(tmp_path / "nice")])
    for url in (f"file://{tmp_path}/nice/x.txt", f"file://{real}/x.txt"):
        store.get_file(url, tmp_path / "out")
        assert (tmp_path / "out").read_text() == "x"


def test_a_fifo_is_refused_without_blocking(tmp_path, opener):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    os.mkfifo(allowed / "pipe")
    with pytest.raises(StorageError, match="not a regular file"):
        LocalStore([str(allowed)]).get_file(f"file://{allowed}/pipe", tmp_path / "x")


def test_link_inputs_hard_links_on_the_same_file_system(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    source = allowed / "big.bin"
    source.write_bytes(os.urandom(1 << 16))
    LocalStore([str(allowed)], link=True).get_file(f"file://{source}", tmp_path / "linked")
    assert (tmp_path / "linked").stat().st_ino == source.stat().st_ino
    LocalStore([str(allowed)], link=False).get_file(f"file://{source}", tmp_path / "copied")
    assert (tmp_path / "copied").stat().st_ino != source.stat().st_ino
    assert (tmp_path / "copied").read_bytes() == source.read_bytes()


def test_link_inputs_through_the_worker(harness):
    source = harness.data / "ref.txt"
    source.write_text("shared")
    run = harness.run(harness.task(inputs=[{"path": "/in/ref.txt", "url": f"file://{source}"}],
                                   executors=[sh("cat /in/ref.txt")]),
                      config=harness.config(link_inputs=True))
    assert run.state == "COMPLETE", run.system_logs
    assert run.executor(0)["stdout"] == "shared"
    assert run.host("/in/ref.txt").stat().st_ino == source.stat().st_ino


@pytest.mark.parametrize("spelling", ["file-url", "path"])
def test_directory_inputs_keep_odd_file_names(tmp_path, spelling):
    allowed = tmp_path / "allowed"
    names = ["a#b.txt", "c%20d.txt", "e?f.txt", "sp ace/g.txt"]
    for name in names:
        (allowed / "ref" / name).parent.mkdir(parents=True, exist_ok=True)
        (allowed / "ref" / name).write_text(name)
    storage = Storage(config_mod.load(environ={}, overrides={
        "worker": {"allowed_dirs": [str(allowed)]}, "storage": {"max_parallel_transfers": 2}})
        .for_worker())
    url = f"file://{quote(str(allowed / 'ref'))}" if spelling == "file-url" \
        else str(allowed / "ref")
    storage.get(url, tmp_path / "dest", is_dir=True)
    assert all((tmp_path / "dest" / name).read_text() == name for name in names)


LAZY_PROBE = """
import json, sys
from pathlib import Path
from funnel_hpc.core import config
from funnel_hpc.worker.storage import Storage
allowed = sys.argv[1]
storage = Storage(config.load(environ={}, overrides={"worker": {"allowed_dirs": [allowed]}})
                  .for_worker())
storage.get(f"file://{allowed}/in.txt", Path(allowed) / "out.txt")
print(json.dumps([m for m in ("boto3", "requests", "google.cloud.storage", "ftplib",
                              "concurrent.futures") if m in sys.modules]))
"""


def test_a_file_url_loads_no_other_store_library(tmp_path):
    import json
    import subprocess
    import sys

    (tmp_path / "in.txt").write_text("x")
    proc = subprocess.run([sys.executable, "-c", LAZY_PROBE, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    assert (tmp_path / "out.txt").read_text() == "x"
