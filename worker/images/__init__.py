"""Fetch a task's OCI image and unpack it into a root file system directory, rootless.

Contract: `ensure_rootfs(image, cache_dir, owner=...)` returns an `ImageRoot` whose `rootfs`
is a complete, verified tree (never half-written) for this node's platform, or raises
`ImageError` with a `reason` in `REASONS` and a one-line message naming the image (never a
password). Many workers on many nodes may share `cache_dir` (NFS included): each blob is
downloaded once and each image unpacked once, under `fcntl.flock` locks (see cache.py).
Images belong to whoever may pull them (access.py): what was fetched with a registry's
credentials is served from the cache only to owners who may use those credentials. A pull
ends within `Limits.pull_seconds` (transport.py's Deadline) and an unpack within the
`Limits` caps (unpack.py), or fails naming the `worker.` key it passed.

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
    from collections.abc import Mapping
    from typing import Any

    from .access import Access
    from .cache import Cache
    from .reference import Reference
    from .registry import MirroredClient, RegistryClient, Resolved

    Json = dict[str, Any]  # a parsed JSON object: manifests, descriptors, image configs

    from funnel_hpc.core.config import WorkerSection

REASONS = ("not_found", "auth", "digest", "unreachable", "invalid", "refused", "timeout")
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


class Limits:
    """What one image may cost: the pull's deadline and the unpacking caps (worker.image_*)."""

    # A plain class (no dataclasses import at start). The defaults are conf/default.yaml's (a test
    # checks that they agree), here for callers without a configuration (benchmarks, seed).
    __slots__ = ("max_bytes", "max_entries", "max_ratio", "pull_seconds",
                 "ratio_min_layer_bytes")
    KEYS = {"image_max_bytes": "max_bytes", "image_max_entries": "max_entries",
            "image_max_ratio": "max_ratio", "image_ratio_min_layer_bytes": "ratio_min_layer_bytes",
            "image_pull_seconds": "pull_seconds"}

    def __init__(self, max_bytes: int = 20 << 30, max_entries: int = 1_000_000,
                 max_ratio: int = 100, ratio_min_layer_bytes: int = 4 << 20,
                 pull_seconds: float = 600) -> None:
        self.max_bytes = max_bytes                          # all layers, expanded
        self.max_entries = max_entries                      # all layers' tar entries
        self.max_ratio = max_ratio                          # expanded / compressed, per layer
        self.ratio_min_layer_bytes = ratio_min_layer_bytes  # smaller layers count as this big
        self.pull_seconds = pull_seconds                    # every request of one pull

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Limits) and all(
            getattr(self, name) == getattr(other, name) for name in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_worker(cls, worker: WorkerSection) -> Limits:
        """The limits a `worker` configuration section sets; ValueError naming a bad key."""
        values: dict[str, Any] = {}
        for key, name in cls.KEYS.items():
            value = getattr(worker, key)
            whole = name != "pull_seconds"
            if value <= 0:
                raise ValueError(f"worker.{key} must be a positive "
                                 f"{'integer' if whole else 'number'}, not {value!r}")
            values[name] = value
        return cls(**values)


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
                  registries: Mapping[str, object] | None = None,
                  retry_seconds: float = 30, pull: str = "missing",
                  tag_ttl: float | None = None, *, owner: str | None = None,
                  limits: Limits | None = None) -> ImageRoot:
    """The unpacked root file system of `image` under `cache_dir`, pulling what is missing.

    `registries` maps a registry host ("docker.io", "host:port") to its settings: username,
    password, users and groups (who may use them), insecure (plain http), ca_file, mirrors.
    `owner` is the task's owner (None: auth off): it gets only the credentials it may use,
    and only what the cache holds under those or none (access.py). `pull="missing"` trusts
    a tag resolved before (for at most `tag_ttl` seconds when given); "always" asks the
    registry again. Digest references are immutable and never re-resolved, but fetched
    from their registry once for each credential scope before the cache serves them.
    """
    if pull not in PULL_POLICIES:
        raise ValueError(f"worker.pull must be one of {PULL_POLICIES}, not {pull!r}")
    from .access import for_owner
    from .cache import Cache
    ref = resolve(image)
    access = for_owner(registries or {}, owner)
    cache = Cache(Path(cache_dir))
    if pull == "missing" or ref.digest:
        found = cache.lookup(ref, tag_ttl, access.scopes)
        if found is not None:
            return found
    return _pull(ref, cache, access, retry_seconds, limits or Limits())


def platform() -> tuple[str, str | None]:
    """This node's OCI architecture and variant (x86_64 -> amd64, aarch64 -> arm64/v8)."""
    machine = os.uname().machine
    return ARCHES.get(machine, (machine, None))


def _pull(ref: Reference, cache: Cache, access: Access, retry_seconds: float,
          limits: Limits) -> ImageRoot:
    """Resolve on the registry, fetch the blobs that are missing (or that this owner may not
    take from the cache), unpack once, remember under the pull's credential scope."""
    from .registry import open_registry
    from .transport import Deadline, Expired
    image = ref.canonical()
    client = open_registry(ref, access.registries, retry_seconds,
                           Deadline(limits.pull_seconds))
    try:
        resolved = client.resolve()
        found = _fetch_and_unpack(ref, cache, access, client, resolved, limits)
    except Expired:
        raise ImageError("timeout", image, "pull took longer than worker.image_pull_seconds "
                         f"({limits.pull_seconds:g} s)") from None
    finally:
        client.close()
    return found


def _fetch_and_unpack(ref: Reference, cache: Cache, access: Access,
                      client: RegistryClient | MirroredClient, resolved: Resolved,
                      limits: Limits) -> ImageRoot:
    """The blobs (fetched again where the owner may not reuse them), the unpacked root,
    and the records of the reference (and, for a tag, of its digest) under the pull's scope."""
    from functools import partial

    from .reference import Reference
    from .unpack import BlobCorrupt, CapExceeded
    image = ref.canonical()
    for attempt in (1, 2):  # a cached layer found corrupt while unpacking is fetched again
        config_path = cache.ensure_blob(resolved.config, client.download_blob, access.scopes,
                                        client.scope)
        layers = [(cache.ensure_blob(layer, client.download_blob, access.scopes,
                                     client.scope), layer)
                  for layer in resolved.layers]
        try:
            cache.ensure_image(resolved.manifest_digest, partial(
                _build, config_path=config_path, layers=layers, image=image, limits=limits))
            break
        except BlobCorrupt as error:
            cache.discard_blob(error.digest)
            if attempt == 2:
                raise
        except CapExceeded as error:
            cache.discard_blob(error.digest)  # hostile: nothing will ever unpack it
            raise
    scope = client.scope()
    cache.remember(ref, resolved.digest, resolved.manifest_digest, scope)
    if ref.tag:  # the digest it resolved to, for `name@digest` references of the same owner
        cache.remember(Reference(ref.registry, ref.repository, None, resolved.digest),
                       resolved.digest, resolved.manifest_digest, scope)
    found = cache.image(ref, resolved.digest, resolved.manifest_digest)
    if found is None:
        raise ImageError("invalid", image, f"unpacked image vanished from {cache.root}")
    return found


def _build(rootfs: Path, config_path: Path, layers: list[tuple[Path, Json]],
           image: str, limits: Limits) -> Json:
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
    unpack_layers(rootfs, layers, image, limits)
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
