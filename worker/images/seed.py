"""Seed an image cache with an image built from a local directory, with no registry.

`python -m funnel_hpc.worker.images seed docker.io/library/busybox:latest --from-dir DIR
--cache DIR` packs DIR (e.g. Debian's busybox-static installed into it) as one gzip layer,
writes that layer, an OCI image config and manifest as real blobs of the cache, unpacks
them through the same code as a pull (unpack.py) and records the reference, so a worker
with `worker.pull: missing` finds the image without asking any registry (the offline
quick start). Cost: one tar+gzip of DIR and one unpack.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from functools import partial
from pathlib import Path

from . import DEFAULT_PATH, ImageRoot, Limits, _build, platform, resolve
from .access import PUBLIC
from .cache import Cache

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from io import BufferedIOBase

    from . import Json

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
EPOCH = 0  # fixed mtimes: the same directory always makes the same digests


def seed(image: str, from_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str],
         env: list[str] | None = None, cmd: list[str] | None = None) -> ImageRoot:
    """Put `from_dir` in the cache as `image`; the unpacked ImageRoot."""
    ref = resolve(image)
    raw = _tar(Path(from_dir))
    layer = gzip.compress(raw, mtime=EPOCH)
    arch, variant = platform()
    config = {"architecture": arch, "os": "linux",
              "config": {"Env": env or [f"PATH={DEFAULT_PATH}"], "Cmd": cmd or ["sh"]},
              "rootfs": {"type": "layers", "diff_ids": [_digest(raw)]}}
    if variant:
        config["variant"] = variant
    config_blob = json.dumps(config, sort_keys=True).encode()
    layer_desc = _descriptor(OCI_LAYER, layer)
    config_desc = _descriptor(OCI_CONFIG, config_blob)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": config_desc, "layers": [layer_desc]},
                          sort_keys=True).encode()
    manifest_digest = _digest(manifest)
    cache = Cache(Path(cache_dir))
    blobs = {layer_desc["digest"]: layer, config_desc["digest"]: config_blob,
             manifest_digest: manifest}

    def write(descriptor: Json, out: BufferedIOBase) -> None:
        out.write(blobs[descriptor["digest"]])

    def public() -> str:  # the admin's seed is for every owner
        return PUBLIC

    cache.ensure_blob(_descriptor(OCI_MANIFEST, manifest), write, None, public)
    config_path = cache.ensure_blob(config_desc, write, None, public)
    layer_path = cache.ensure_blob(layer_desc, write, None, public)
    cache.ensure_image(manifest_digest, partial(
        _build, config_path=config_path, layers=[(layer_path, layer_desc)],
        image=ref.canonical(), limits=Limits()))
    cache.remember(ref, manifest_digest, manifest_digest, PUBLIC)
    found = cache.image(ref, manifest_digest, manifest_digest)
    assert found is not None
    return found


def _tar(directory: Path) -> bytes:
    """DIR as an uncompressed tar of relative names, owned by root, symlinks kept."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(directory.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(directory)))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = EPOCH
            if info.isreg():
                with path.open("rb") as data:
                    tar.addfile(info, data)
            else:
                tar.addfile(info)
    return buffer.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes) -> Json:
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data)}
