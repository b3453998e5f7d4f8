"""Fetch a task's OCI image and unpack it into a root file system directory, rootless.

Contract: `ensure_rootfs(image, cache_dir)` returns an `ImageRoot` whose `rootfs` is a
complete, verified tree (never half-written) for this node's platform, or raises
`ImageError` with a `reason` in `REASONS` and a one-line message naming the image (never a
password). Many workers on many nodes may share `cache_dir` (NFS included): each blob is
downloaded once and each image unpacked once, under `fcntl.flock` locks (see cache.py).

Cost: importing this package loads nothing but `os`/`pathlib`; a warm start (the tag was
resolved before and the image is unpacked) reads two small JSON files and makes no network
call. A cold start costs one manifest GET (two for an index), one GET per blob, and the
unpack (unpack.py). Everything heavier (http.client, ssl, hashlib, tarfile, json) loads on use.
"""

from __future__ import annotations

import os
from pathlib import Path

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from typing import Any

    from .cache import Cache
    from .reference import Reference

    Json = dict[str, Any]  # a parsed JSON object: manifests, descriptors, image configs

REASONS = ("not_found", "auth", "digest", "unreachable", "invalid", "refused")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PULL_POLICIES = ("missing", "always")
ARCHES = {"x86_64": ("amd64", None), "aarch64": ("arm64", "v8"), "armv7l": ("arm", "v7"),
          "armv6l": ("arm", "v6"), "i686": ("386", None), "ppc64le": ("ppc64le", None),
          "s390x": ("s390x", None), "riscv64": ("riscv64", None)}


class ImageError(RuntimeError):
    """An image could not be resolved, fetched, verified or unpacked."""

    # Defined here, before any submodule is imported, so that they can `from . import ImageError`.
    def __init__(self, reason: str, image: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"image {image}: {detail}")
        self.reason = reason
        self.image = image


class ImageRoot:
    """An unpacked image: its root file system, image config and digests."""

    __slots__ = ("config", "digest", "manifest_digest", "reference", "rootfs")

    def __init__(self, rootfs: Path, config: Json, digest: str, manifest_digest: str,
                 reference: str) -> None:
        self.rootfs = rootfs                    # read-only tree to bind as "/"
        self.config = config                    # the image config's "config": Env, Cmd, ...
        self.digest = digest                    # what the reference resolved to (pin with it)
        self.manifest_digest = manifest_digest  # this platform's manifest (== digest unless index)
        self.reference = reference              # canonical reference, e.g. docker.io/library/x:1

    def __repr__(self) -> str:
        return f"ImageRoot({self.reference}@{self.digest} at {self.rootfs})"


def resolve(image: str) -> Reference:  # (reference.py is not imported at start)
    """Parse an image reference the way docker does (`alpine` = docker.io/library/alpine:latest)."""
    from .reference import parse
    return parse(image)


def ensure_rootfs(image: str, cache_dir: str | os.PathLike[str],
                  registries: dict[str, Json] | None = None,
                  retry_seconds: float = 30, pull: str = "missing",
                  tag_ttl: float | None = None) -> ImageRoot:
    """The unpacked root file system of `image` under `cache_dir`, pulling what is missing.

    `registries` maps a registry host ("docker.io", "host:port") to its settings: username,
    password, insecure (plain http), ca_file, mirrors. `pull="missing"` trusts a tag resolved
    before (for at most `tag_ttl` seconds when given); "always" asks the registry again.
    Digest references are immutable and never re-resolved.
    """
    if pull not in PULL_POLICIES:
        raise ValueError(f"pull must be one of {PULL_POLICIES}, not {pull!r}")
    from .cache import Cache
    ref = resolve(image)
    cache = Cache(Path(cache_dir))
    if pull == "missing" or ref.digest:
        found = cache.lookup(ref, tag_ttl)
        if found is not None:
            return found
    return _pull(ref, cache, registries or {}, retry_seconds)


def platform() -> tuple[str, str | None]:
    """This node's OCI architecture and variant (x86_64 -> amd64, aarch64 -> arm64/v8)."""
    machine = os.uname().machine
    return ARCHES.get(machine, (machine, None))


def _pull(ref: Reference, cache: Cache, registries: dict[str, Json],
          retry_seconds: float) -> ImageRoot:
    """Resolve on the registry, fetch the blobs that are missing, unpack once, remember."""
    from functools import partial

    from .registry import open_registry
    from .unpack import BlobCorrupt
    client = open_registry(ref, registries, retry_seconds)
    resolved = client.resolve()
    image = ref.canonical()
    for attempt in (1, 2):  # a cached layer found corrupt while unpacking is fetched again
        config_path = cache.ensure_blob(resolved.config, client.download_blob)
        layers = [(cache.ensure_blob(layer, client.download_blob), layer)
                  for layer in resolved.layers]
        try:
            cache.ensure_image(resolved.manifest_digest, partial(
                _build, config_path=config_path, layers=layers, image=image))
            break
        except BlobCorrupt as error:
            cache.discard_blob(error.digest)
            if attempt == 2:
                raise
    cache.remember(ref, resolved.digest, resolved.manifest_digest)
    found = cache.image(ref, resolved.digest, resolved.manifest_digest)
    if found is None:
        raise ImageError("invalid", image, f"unpacked image vanished from {cache.root}")
    return found


def _build(rootfs: Path, config_path: Path, layers: list[tuple[Path, Json]],
           image: str) -> Json:
    """Unpack the layers into `rootfs`; the image config's "config" section."""
    import hashlib
    import json

    from .unpack import BlobCorrupt, unpack_layers

    raw = config_path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != config_path.name:  # blobs are named by digest
        raise BlobCorrupt(image, f"sha256:{config_path.name}")  # torn by a crash: fetch again
    try:
        config = json.loads(raw)
    except ValueError:
        raise ImageError("invalid", image, "image config is not JSON") from None
    unpack_layers(rootfs, layers, image)
    inner = config.get("config") if isinstance(config, dict) else None
    return inner if isinstance(inner, dict) else {}


def env_from_config(config: Json) -> dict[str, str]:
    """The image's environment (config "Env" list) as a dict, with PATH always present."""
    nested = config.get("config")  # the whole image config, or its "config" section
    inner: Json = nested if isinstance(nested, dict) else config
    env: dict[str, str] = {}
    for item in inner.get("Env") or []:
        name, sep, value = str(item).partition("=")
        if sep and name:
            env[name] = value
    env.setdefault("PATH", DEFAULT_PATH)
    return env
