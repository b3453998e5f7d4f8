"""Pieces of the copy-on-write root tests (tests/worker/test_writable_root.py): a tiny .deb
and an archive of other owners made on the host, a fingerprint of an image in the cache,
the host's mounts, and where an image sits in the cache."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

DEB_PACKAGE = "funnel-tiny"
DEB_SAYS = "tiny-hello"


def tiny_deb(directory: Path) -> Path:
    """A .deb (built with the host's dpkg-deb) installing /usr/bin/funnel-tiny, which
    prints DEB_SAYS, and /etc/funnel-tiny.conf."""
    tree = directory / "deb"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {DEB_PACKAGE}\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: funnel tests <tests@example.invalid>\nDescription: a tiny test package\n")
    program = tree / "usr" / "bin" / DEB_PACKAGE
    program.write_text(f"#!/bin/sh\necho {DEB_SAYS}\n")
    program.chmod(0o755)
    (tree / "etc" / f"{DEB_PACKAGE}.conf").write_text("setting=1\n")
    deb = directory / f"{DEB_PACKAGE}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], check=True,
                   capture_output=True)
    return deb


def owners_tar(path: Path) -> Path:
    """An archive whose entries belong to ids other than root (as a vendor tarball's)."""
    with tarfile.open(path, "w") as archive:
        for name, uid, gid, data in (("pkg/bin/tool", 1234, 2345, b"tool\n"),
                                     ("pkg/share/doc", 40000, 40001, b"doc\n"),
                                     ("pkg/root-owned", 0, 0, b"root\n")):
            info = tarfile.TarInfo(name)
            info.uid, info.gid, info.size, info.mode = uid, gid, len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return path


def image_rootfs(cache: Path, system_logs: str, reference: str) -> Path:
    """The unpacked root of the image a task ran (its system logs name the digest:
    "image REF: REF@sha256:HEX"), in the cache's images/HEX/rootfs."""
    prefix = f"image {reference}: "
    line = next(line for line in system_logs.splitlines() if line.startswith(prefix))
    rootfs = cache / "images" / line.rsplit("@sha256:", 1)[1].strip() / "rootfs"
    assert rootfs.is_dir(), rootfs
    return rootfs


def fingerprint(rootfs: Path, hashed: tuple[str, ...]) -> dict[str, tuple]:
    """Every entry's type, mode, owner, size, mtime and ctime (never following a link),
    and the sha256 of the `hashed` paths: any write to the image changes it."""
    found: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            found[os.path.relpath(path, rootfs)] = (
                info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_mtime_ns,
                info.st_ctime_ns, info.st_ino)
    for relative in hashed:
        content = (rootfs / relative.lstrip("/")).read_bytes()
        found["sha256:" + relative] = (hashlib.sha256(content).hexdigest(),)
    return found


def host_mounts(*paths: str) -> list[str]:
    """The host's overlay mounts and those naming one of `paths` (this process's mount
    namespace), without their ids: what a copy-on-write root could have left."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return sorted(" ".join(line.split()[4:]) for line in lines
                  if " - overlay " in line or any(path in line for path in paths))
