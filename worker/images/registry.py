"""OCI distribution / Docker Registry v2 client: manifests, blobs, auth, retries.

Contract: `open_registry(ref, registries, retry_seconds)` gives a `RegistryClient` whose
`resolve()` returns the manifest for this node's platform (following an index) with its
digest checked, and whose `download_blob(descriptor, file)` streams a blob into an open file
while hashing it, raising ImageError("digest") if its digest or size differ. Connection
errors, 5xx and 429 are retried with exponential backoff and jitter for `retry_seconds`;
404, 401 and 403 fail at once. Auth: anonymous, Basic, or Bearer tokens from the realm
named in a 401's WWW-Authenticate (with Basic credentials if configured). https unless the
registry's settings say `insecure: true` (plain http). A registry's `mirrors` are tried
before it, in order. Cost: one GET per manifest and per blob, plus one per 401 challenge.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import dataclass

import requests

from . import ImageError, platform
from .reference import DEFAULT_TAG, Reference

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
MAX_MANIFEST = 4 << 20
CHUNK = 1 << 20
TIMEOUT = (10, 60)  # connect, read (seconds)
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')
TRANSIENT = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


@dataclass(frozen=True)
class Resolved:
    """A reference resolved on a registry: digests, config and layer descriptors."""

    digest: str            # what the reference names (an index's digest for multi-arch)
    manifest_digest: str   # this platform's image manifest
    manifest: bytes
    config: dict           # descriptor
    layers: list


def open_registry(ref: Reference, registries: dict,
                  retry_seconds: float) -> RegistryClient | MirroredClient:
    """A client for the first of the registry's mirrors (then itself) that has the image."""
    mirrors = registries.get(ref.registry, {}).get("mirrors") or []
    if not mirrors:
        return RegistryClient(ref, ref.api_host, registries.get(ref.registry, {}), retry_seconds)
    return MirroredClient(ref, [*mirrors, ref.api_host], registries, retry_seconds)


class RegistryClient:
    """Talks to one registry host for one repository."""

    def __init__(self, ref: Reference, host: str, settings: dict, retry_seconds: float) -> None:
        self.ref = ref
        self.image = ref.canonical()
        self.retry_seconds = retry_seconds
        self.settings = settings
        self.base = f"{'http' if settings.get('insecure') else 'https'}://{host}/v2/{ref.repository}"
        self.session = requests.Session()
        # per request: a session-wide value would lose to REQUESTS_CA_BUNDLE in the environment
        self.verify = settings.get("ca_file") or True
        self.session.headers["User-Agent"] = "funnel-hpc-worker"
        self.auth_header: str | None = None
        username = settings.get("username")
        self.basic = _basic(username, settings.get("password")) if username is not None else None

    def resolve(self) -> Resolved:
        wanted = self.ref.digest or self.ref.tag or DEFAULT_TAG
        raw, media_type, digest = self.get_manifest(wanted)
        if self.ref.digest and digest != self.ref.digest:
            raise ImageError("digest", self.image, f"digest mismatch for manifest {digest}")
        manifest = self._decode(raw)
        manifest_digest = digest
        if media_type in INDEX_TYPES or "manifests" in manifest:
            manifest_digest = self._pick_platform(manifest)
            raw, media_type, got = self.get_manifest(manifest_digest)
            if got != manifest_digest:
                raise ImageError("digest", self.image, f"digest mismatch for manifest {got}")
            manifest = self._decode(raw)
        self._check_manifest(manifest)
        return Resolved(digest, manifest_digest, raw, manifest["config"], manifest["layers"])

    def get_manifest(self, reference: str) -> tuple[bytes, str, str]:
        response = self._request(f"{self.base}/manifests/{reference}", ACCEPT, stream=True)
        buffer = bytearray()
        with response:
            for chunk in response.iter_content(CHUNK):
                buffer += chunk
                if len(buffer) > MAX_MANIFEST:
                    raise ImageError("invalid", self.image, "manifest larger than 4 MiB")
        raw = bytes(buffer)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return raw, media_type, digest

    def download_blob(self, descriptor: dict, out) -> None:
        """Stream the blob into the binary file `out`, verifying its digest and size."""
        digest, size = descriptor["digest"], descriptor["size"]
        backoff = Backoff(self.image, self.retry_seconds)
        while True:
            out.seek(0)
            out.truncate()
            try:
                got, length = self._stream_blob(digest, size, out)
                break
            except TRANSIENT as error:  # cut off mid-stream: fetch the blob again
                backoff.wait(error)
        if length != size or got != digest:
            raise ImageError("digest", self.image, f"digest mismatch for blob {digest} "
                             f"(got {got}, {length} of {size} bytes)")

    def _stream_blob(self, digest: str, size: int, out) -> tuple[str, int]:
        hasher = hashlib.sha256()
        length = 0
        with self._request(f"{self.base}/blobs/{digest}", None, stream=True) as response:
            for chunk in response.iter_content(CHUNK):
                length += len(chunk)
                if length > size:
                    break
                hasher.update(chunk)
                out.write(chunk)
        return "sha256:" + hasher.hexdigest(), length

    def _request(self, url: str, accept: str | None, stream: bool) -> requests.Response:
        """GET with auth and retries; a non-2xx answer becomes an ImageError."""
        backoff = Backoff(self.image, self.retry_seconds)
        challenged = False
        # identity: a digest names the bytes as stored, not a transport encoding of them
        headers = {"Accept": accept or "*/*", "Accept-Encoding": "identity"}
        while True:
            if self.auth_header:
                headers["Authorization"] = self.auth_header
            try:
                response = self.session.get(url, headers=headers, stream=stream, timeout=TIMEOUT,
                                            verify=self.verify)
            except requests.exceptions.SSLError as error:  # a bad certificate will stay bad
                cause = str(error.args[0] if error.args else error)[:200]
                raise ImageError("unreachable", self.image, f"TLS failed: {cause}") from None
            except TRANSIENT as error:
                backoff.wait(error)
                continue
            if response.status_code == 401 and not challenged:
                challenged = True
                self._answer_challenge(response)
                continue
            if response.status_code == 429 or response.status_code >= 500:
                response.close()
                backoff.wait(f"HTTP {response.status_code}", response.headers.get("Retry-After"))
                continue
            if response.status_code >= 300:
                raise self._http_error(response)
            return response

    def _answer_challenge(self, response: requests.Response) -> None:
        challenge = response.headers.get("WWW-Authenticate", "")
        response.close()
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic" and self.basic:
            self.auth_header = self.basic
        elif scheme == "bearer":
            self.auth_header = "Bearer " + self._token(dict(CHALLENGE_RE.findall(challenge)))
        else:
            raise ImageError("auth", self.image, "authentication failed (registry wants "
                             f"{scheme or 'credentials'}{'' if self.basic else '; none configured'})")

    def _token(self, params: dict) -> str:
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise ImageError("auth", self.image, f"authentication failed (bad token realm {realm!r})")
        if realm.startswith("http://") and not self.settings.get("insecure"):
            raise ImageError("auth", self.image, "authentication failed (token realm is plain http)")
        params.setdefault("scope", f"repository:{self.ref.repository}:pull")
        headers = {"Authorization": self.basic} if self.basic else {}
        try:
            answer = self.session.get(realm, params=params, headers=headers, timeout=TIMEOUT,
                                      verify=self.verify)
        except (requests.ConnectionError, requests.Timeout) as error:
            raise ImageError("unreachable", self.image,
                             f"token service unreachable: {type(error).__name__}") from None
        if answer.status_code in (401, 403):
            raise ImageError("auth", self.image, "authentication failed (token service said "
                             f"{answer.status_code})")
        try:
            body = answer.json()
            return body.get("token") or body["access_token"]
        except (ValueError, KeyError, AttributeError):
            raise ImageError("auth", self.image, "authentication failed (no token in the token "
                             f"service's answer, HTTP {answer.status_code})") from None

    def _http_error(self, response: requests.Response) -> ImageError:
        said = _registry_said(response)
        response.close()
        if response.status_code in (401, 403):
            return ImageError("auth", self.image, f"authentication failed{said}")
        if response.status_code == 404:
            return ImageError("not_found", self.image, f"not found{said}")
        return ImageError("invalid", self.image, f"registry answered HTTP {response.status_code}{said}")

    def _decode(self, raw: bytes) -> dict:
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise ImageError("invalid", self.image, "manifest is not JSON") from None
        if not isinstance(manifest, dict) or manifest.get("schemaVersion") != 2:
            raise ImageError("invalid", self.image, "unsupported manifest (want schemaVersion 2)")
        return manifest

    def _pick_platform(self, index: dict) -> str:
        arch, variant = platform()
        offered = []
        for entry in index.get("manifests") or []:
            plat = entry.get("platform") or {}
            offered.append(f"{plat.get('os')}/{plat.get('architecture')}")
            if plat.get("os") == "linux" and plat.get("architecture") == arch and (
                    variant is None or plat.get("variant") in (None, variant)):
                self._check_descriptor(entry)
                return entry["digest"]
        raise ImageError("not_found", self.image, f"no linux/{arch} image in the index "
                         f"(has {', '.join(offered) or 'nothing'})")

    def _check_manifest(self, manifest: dict) -> None:
        layers = manifest.get("layers")
        if not isinstance(manifest.get("config"), dict) or not isinstance(layers, list):
            raise ImageError("invalid", self.image, "manifest lacks config or layers")
        for descriptor in [manifest["config"], *layers]:
            self._check_descriptor(descriptor)

    def _check_descriptor(self, descriptor: dict) -> None:
        digest, size = descriptor.get("digest"), descriptor.get("size")
        if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
            raise ImageError("invalid", self.image, f"unsupported digest {digest!r} (want sha256)")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError("invalid", self.image, f"bad size {size!r} for {digest}")


class MirroredClient:
    """Tries each mirror, then the registry itself; the first that resolves serves the blobs."""

    def __init__(self, ref: Reference, hosts: list[str], registries: dict,
                 retry_seconds: float) -> None:
        own = registries.get(ref.registry, {})
        self.clients = [RegistryClient(ref, host, registries.get(host, own if host == ref.api_host
                                                                  else {}), retry_seconds)
                        for host in hosts]
        self.chosen: RegistryClient | None = None

    def resolve(self) -> Resolved:
        for client in self.clients[:-1]:
            try:
                resolved = client.resolve()
            except ImageError as error:
                if error.reason in ("digest", "invalid"):
                    raise
                continue  # this mirror lacks the image or is down: try the next
            self.chosen = client
            return resolved
        self.chosen = self.clients[-1]
        return self.chosen.resolve()

    def download_blob(self, descriptor: dict, out) -> None:
        (self.chosen or self.clients[-1]).download_blob(descriptor, out)


def _basic(username: str, password: str | None) -> str:
    import base64
    token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
    return f"Basic {token}"


def _registry_said(response: requests.Response) -> str:
    try:
        errors = response.json().get("errors") or []
        words = "; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors)
    except (ValueError, AttributeError):
        words = ""
    return f" (registry said: {words[:200]})" if words else ""


class Backoff:
    """Exponential backoff with jitter until `retry_seconds` have passed, then unreachable."""

    def __init__(self, image: str, retry_seconds: float) -> None:
        self.image = image
        self.retry_seconds = retry_seconds
        self.deadline = time.monotonic() + retry_seconds
        self.attempt = 0

    def wait(self, error: Exception | str, retry_after: str | None = None) -> None:
        now = time.monotonic()
        if now >= self.deadline:
            what = error if isinstance(error, str) else type(error).__name__
            raise ImageError("unreachable", self.image,
                             f"registry unreachable after {self.retry_seconds:g} s: {what}")
        delay = min(8.0, 0.25 * 2 ** self.attempt) * random.uniform(0.5, 1.0)
        if retry_after and retry_after.isdigit():
            delay = max(delay, float(retry_after))
        self.attempt += 1
        time.sleep(max(0.0, min(delay, self.deadline - now)))
