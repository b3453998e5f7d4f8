"""Image references parsed the way docker parses them; every part checked with re.fullmatch.

`alpine` is docker.io/library/alpine:latest; the first path component names a registry
only if it contains "." or ":" or is "localhost"; `name@sha256:<hex>` pins a digest (a tag
beside it is kept for display, the digest wins). Cost: one regex match per component.
"""

from __future__ import annotations

import re

from . import ImageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")
DEFAULT_TAG = "latest"
MAX_NAME = 255  # docker's limit on a repository name with its registry

HOST_RE = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)"
                     r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]{1,5})?"
                     r"|\[[0-9a-fA-F:.]+\](?::[0-9]{1,5})?")
COMPONENT_RE = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")


class Reference:
    """A parsed image reference: registry host, repository path, tag and/or digest."""

    # A plain immutable class, not a dataclass: a worker starting from a cached image
    # parses one reference, and importing dataclasses (inspect...) would cost every start.
    __slots__ = ("digest", "registry", "repository", "tag")
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    def __init__(self, registry: str, repository: str, tag: str | None,
                 digest: str | None) -> None:
        for name, value in (("registry", registry), ("repository", repository),
                            ("tag", tag), ("digest", digest)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Reference is immutable: cannot set {name}")

    def _key(self) -> tuple[str, str, str | None, str | None]:
        return (self.registry, self.repository, self.tag, self.digest)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reference) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Reference(registry={self.registry!r}, repository={self.repository!r}, "
                f"tag={self.tag!r}, digest={self.digest!r})")

    @property
    def api_host(self) -> str:
        """The host:port whose /v2/ API serves this registry."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def canonical(self) -> str:
        """registry/repository[:tag][@digest], with docker's defaults filled in."""
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.name}{tag}{digest}"

    def __str__(self) -> str:
        return self.canonical()


def parse(image: str) -> Reference:
    """Parse `image`; ImageError(reason="invalid") if any part is malformed."""
    if not isinstance(image, str) or not image or len(image) > 1024 or image != image.strip():
        raise ImageError("invalid", repr(image), "not a valid image reference")
    remainder, digest = _split_digest(image)
    registry, path = _split_registry(image, remainder)
    path, tag = _split_tag(image, path)
    components = path.split("/")
    if registry == DOCKER_HUB and len(components) == 1:
        components = ["library", *components]
    for component in components:
        if not COMPONENT_RE.fullmatch(component):
            raise ImageError("invalid", image, f"bad repository component {component!r} "
                             "(lowercase letters, digits and separators . _ __ -)")
    repository = "/".join(components)
    if len(registry) + 1 + len(repository) > MAX_NAME:
        raise ImageError("invalid", image, f"name longer than {MAX_NAME} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest)


def _split_digest(image: str) -> tuple[str, str | None]:
    remainder, at, digest = image.partition("@")
    if not at:
        return image, None
    if not DIGEST_RE.fullmatch(digest):
        raise ImageError("invalid", image, f"bad digest {digest!r} (want sha256:<64 hex>)")
    return remainder, digest


def _split_registry(image: str, remainder: str) -> tuple[str, str]:
    first, slash, rest = remainder.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not HOST_RE.fullmatch(first):
            raise ImageError("invalid", image, f"bad registry host {first!r}")
        host = DOCKER_HUB if first.lower() in DOCKER_HUB_ALIASES else first
        return host, rest
    return DOCKER_HUB, remainder


def _split_tag(image: str, path: str) -> tuple[str, str | None]:
    name, colon, tag = path.rpartition(":")
    if not colon:
        return path, None
    if "/" in tag or not TAG_RE.fullmatch(tag):
        raise ImageError("invalid", image, f"bad tag {tag!r}")
    return name, tag
