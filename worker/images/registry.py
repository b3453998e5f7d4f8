"""OCI distribution / Docker Registry v2 client: manifests, blobs, auth, retries.

Contract: `open_registry(ref, registries, retry_seconds, deadline)` gives a client whose
`resolve()` returns the manifest for this node's platform (following an index) with its
digest checked, and whose `download_blob(descriptor, file)` streams a blob into an open file
while hashing it, raising ImageError("digest") if its digest or size differ. Connection
errors, 5xx and 429 are retried with exponential backoff and jitter for `retry_seconds`;
404, 401 and 403 fail at once; nothing outlives the `deadline` of the whole pull
(transport.Expired). Auth: anonymous, Basic, or Bearer tokens from the realm named in a
401's WWW-Authenticate (with Basic credentials if configured); `scope()` says whether
credentials were sent (access.py: what they fetched is not for every owner). https (verified
against `ca_file` if set, else the system's CAs; a certificate error fails at once) unless
the registry's settings say `insecure: true` (plain http). A registry's `mirrors` are tried
before it, in order. HTTP itself (redirects, proxies, keep-alive) is transport.py's, on the
standard library: requests took ~90 ms to import, more than a small pull's ~65 ms.
Cost: one GET per manifest and per blob, plus one per 401 challenge, over one kept-alive
connection per host.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import ssl
import time
from urllib.parse import urlencode

from . import ImageError, platform
from .access import PUBLIC, restricted, scope_of
from .reference import DEFAULT_TAG, Reference
from .transport import Deadline, Refused, Response, Transport

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from io import BufferedIOBase

    from . import Json

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
ACCEPT = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
MAX_MANIFEST = 4 << 20
MAX_SMALL_BODY = 1 << 20  # a token answer or an error document
CHUNK = 1 << 20
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')
TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # what may follow "Bearer " in a header
# refused connections, resets, timeouts, cut-off bodies; and ssl.SSLError, an OSError too,
# which _check_tls turns into a failure unless the connection was merely cut off
TRANSIENT = (OSError, http.client.HTTPException)


class Resolved:
    """A reference resolved on a registry: digests, config and layer descriptors."""

    # a plain class, like reference.Reference: importing dataclasses (inspect...) costs ~7 ms
    __slots__ = ("config", "digest", "layers", "manifest", "manifest_digest")

    def __init__(self, digest: str, manifest_digest: str, manifest: bytes, config: Json,
                 layers: list[Json]) -> None:
        self.digest = digest                    # what the reference names (an index's, multi-arch)
        self.manifest_digest = manifest_digest  # this platform's image manifest
        self.manifest = manifest
        self.config = config                    # descriptor
        self.layers = layers


def open_registry(ref: Reference, registries: dict[str, Json], retry_seconds: float,
                  deadline: Deadline | None = None) -> RegistryClient | MirroredClient:
    """A client for the first of the registry's mirrors (then itself) that has the image."""
    deadline = deadline or Deadline(None)
    mirrors = registries.get(ref.registry, {}).get("mirrors") or []
    if not mirrors:
        return RegistryClient(ref, ref.api_host, ref.registry, registries.get(ref.registry, {}),
                              retry_seconds, deadline)
    return MirroredClient(ref, [*mirrors, ref.api_host], registries, retry_seconds, deadline)


class RegistryClient:
    """Talks to one registry host for one repository."""

    def __init__(self, ref: Reference, host: str, key: str, settings: Json,
                 retry_seconds: float, deadline: Deadline) -> None:
        self.ref = ref
        self.image = ref.canonical()
        self.retry_seconds = retry_seconds
        self.deadline = deadline
        self.key = key  # the worker.registries entry `settings` came from
        self.settings = settings
        self.origin = f"{'http' if settings.get('insecure') else 'https'}://{host}/"
        self.base = f"{self.origin}v2/{ref.repository}"
        self.transport = Transport(settings.get("ca_file"), bool(settings.get("insecure")), host,
                                   deadline)
        self.auth_header: str | None = None
        self.sent_credentials = False  # has any request carried them (or a token from them)?
        username = settings.get("username")
        self.basic = _basic(username, settings.get("password")) if username is not None else None

    def scope(self) -> str:
        """The cache scope of what this client fetched so far (access.py)."""
        return scope_of(self.key, self.settings) if self.sent_credentials else PUBLIC

    def close(self) -> None:
        self.transport.close()

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
        with self._request(f"{self.base}/manifests/{reference}", ACCEPT) as response:
            raw = response.read(MAX_MANIFEST + 1)
        if len(raw) > MAX_MANIFEST:
            raise ImageError("invalid", self.image, "manifest larger than 4 MiB")
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return raw, media_type, digest

    def download_blob(self, descriptor: Json, out: BufferedIOBase) -> None:
        """Stream the blob into the binary file `out`, verifying its digest and size."""
        digest, size = descriptor["digest"], descriptor["size"]
        backoff = Backoff(self.image, self.retry_seconds, self.deadline)
        while True:
            out.seek(0)
            out.truncate()
            try:
                got, length = self._stream_blob(digest, size, out)
                break
            except TRANSIENT as error:  # cut off mid-stream: fetch the blob again
                self._check_tls(error)
                backoff.wait(_describe(error))
        if length != size or got != digest:
            raise ImageError("digest", self.image, f"digest mismatch for blob {digest} "
                             f"(got {got}, {length} of {size} bytes)")

    def _stream_blob(self, digest: str, size: int, out: BufferedIOBase) -> tuple[str, int]:
        hasher = hashlib.sha256()
        length = 0
        with self._request(f"{self.base}/blobs/{digest}", None) as response:
            for chunk in response.chunks(CHUNK):
                length += len(chunk)
                if length > size:
                    break
                hasher.update(chunk)
                out.write(chunk)
        return "sha256:" + hasher.hexdigest(), length

    def _request(self, url: str, accept: str | None) -> Response:
        """GET with auth and retries; a non-2xx answer becomes an ImageError."""
        backoff = Backoff(self.image, self.retry_seconds, self.deadline)
        challenged = False
        # identity: a digest names the bytes as stored, not a transport encoding of them
        headers = {"Accept": accept or "*/*", "Accept-Encoding": "identity"}
        while True:
            if self.auth_header:
                headers["Authorization"] = self.auth_header
            try:
                response = self.transport.get(url, headers)
            except Refused as error:
                raise ImageError("invalid", self.image, str(error)) from None
            except TRANSIENT as error:
                self._check_tls(error)
                backoff.wait(_describe(error))
                continue
            # a challenge from elsewhere (object storage behind a redirect) gets no credentials
            if response.status == 401 and not challenged and response.url.startswith(self.origin):
                challenged = True
                self._answer_challenge(response)
                continue
            if response.status == 429 or response.status >= 500:
                response.discard()
                backoff.wait(f"HTTP {response.status}", response.headers.get("Retry-After"))
                continue
            if response.status >= 300:
                raise self._http_error(response)
            return response

    def _check_tls(self, error: Exception) -> None:
        """A TLS failure, other than a connection cut off mid-stream, will not heal: fail now."""
        if not isinstance(error, ssl.SSLError) or isinstance(error, ssl.SSLEOFError):
            return
        if isinstance(error, ssl.SSLCertVerificationError):
            hint = "" if self.settings.get("ca_file") else " (set this registry's ca_file?)"
            raise ImageError("unreachable", self.image, "TLS failed: certificate verify failed: "
                             f"{error.verify_message}{hint}") from None
        raise ImageError("unreachable", self.image,
                         f"TLS failed: {error.reason or error}") from None

    def _answer_challenge(self, response: Response) -> None:
        challenge = response.headers.get("WWW-Authenticate", "")
        response.discard()
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic" and self.basic:
            self.auth_header = self.basic
            self.sent_credentials = True
        elif scheme == "bearer":
            self.auth_header = "Bearer " + self._token(dict(CHALLENGE_RE.findall(challenge)))
        else:
            missing = "" if self.basic else self._withheld() or "; none configured"
            raise ImageError("auth", self.image, "authentication failed (registry wants "
                             f"{scheme or 'credentials'}{missing})")

    def _withheld(self) -> str:
        """Why no credentials were sent when the settings had some for other owners."""
        if self.basic or not restricted(self.settings):
            return ""
        return "; its credentials in worker.registries are not for this task's owner"

    def _token(self, params: dict[str, str]) -> str:
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise ImageError("auth", self.image,
                             f"authentication failed (bad token realm {realm!r})")
        if realm.startswith("http://") and not self.settings.get("insecure"):
            raise ImageError("auth", self.image,
                             "authentication failed (token realm is plain http)")
        params.setdefault("scope", f"repository:{self.ref.repository}:pull")
        headers = {"Accept": "application/json"}
        if self.basic:
            headers["Authorization"] = self.basic
            self.sent_credentials = True
        url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(params)}"
        try:
            with self.transport.get(url, headers) as answer:
                status, raw = answer.status, answer.read(MAX_SMALL_BODY)
        except Refused as error:
            raise ImageError("auth", self.image, f"authentication failed ({error})") from None
        except TRANSIENT as error:
            self._check_tls(error)
            raise ImageError("unreachable", self.image,
                             f"token service unreachable: {_describe(error)}") from None
        if status in (401, 403):
            raise ImageError("auth", self.image, "authentication failed (token service said "
                             f"{status}{self._withheld()})")
        try:
            body = json.loads(raw)
            token = body.get("token") or body["access_token"]
            if isinstance(token, str) and TOKEN_RE.fullmatch(token):
                return token
        except (ValueError, KeyError, AttributeError, TypeError):
            pass
        raise ImageError("auth", self.image, "authentication failed (no token in the token "
                         f"service's answer, HTTP {status})")

    def _http_error(self, response: Response) -> ImageError:
        said = _registry_said(response)
        if response.status in (401, 403):
            return ImageError("auth", self.image, f"authentication failed{said}"
                              f"{self._withheld()}")
        if response.status == 404:
            return ImageError("not_found", self.image, f"not found{said}")
        return ImageError("invalid", self.image, f"registry answered HTTP {response.status}{said}")

    def _decode(self, raw: bytes) -> Json:
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise ImageError("invalid", self.image, "manifest is not JSON") from None
        if not isinstance(manifest, dict) or manifest.get("schemaVersion") != 2:
            raise ImageError("invalid", self.image, "unsupported manifest (want schemaVersion 2)")
        return manifest

    def _pick_platform(self, index: Json) -> str:
        arch, variant = platform()
        offered = []
        for entry in index.get("manifests") or []:
            plat = entry.get("platform") or {}
            offered.append(f"{plat.get('os')}/{plat.get('architecture')}")
            if plat.get("os") == "linux" and plat.get("architecture") == arch and (
                    variant is None or plat.get("variant") in (None, variant)):
                self._check_descriptor(entry)
                return str(entry["digest"])
        raise ImageError("not_found", self.image, f"no linux/{arch} image in the index "
                         f"(has {', '.join(offered) or 'nothing'})")

    def _check_manifest(self, manifest: Json) -> None:
        layers = manifest.get("layers")
        if not isinstance(manifest.get("config"), dict) or not isinstance(layers, list):
            raise ImageError("invalid", self.image, "manifest lacks config or layers")
        for descriptor in [manifest["config"], *layers]:
            self._check_descriptor(descriptor)

    def _check_descriptor(self, descriptor: Json) -> None:
        digest, size = descriptor.get("digest"), descriptor.get("size")
        if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
            raise ImageError("invalid", self.image, f"unsupported digest {digest!r} (want sha256)")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError("invalid", self.image, f"bad size {size!r} for {digest}")


class MirroredClient:
    """Tries each mirror, then the registry itself; the first that resolves serves the blobs."""

    def __init__(self, ref: Reference, hosts: list[str], registries: dict[str, Json],
                 retry_seconds: float, deadline: Deadline) -> None:
        self.clients = []
        for host in hosts:
            # the registry itself: its own entry (by API host or by name); a mirror: its own
            key = host if host in registries or host != ref.api_host else ref.registry
            self.clients.append(RegistryClient(ref, host, key, registries.get(key, {}),
                                               retry_seconds, deadline))
        self.chosen: RegistryClient | None = None

    def scope(self) -> str:
        return (self.chosen or self.clients[-1]).scope()

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def resolve(self) -> Resolved:
        for client in self.clients[:-1]:
            try:
                resolved = client.resolve()
            except ImageError as error:
                if error.reason in ("digest", "invalid", "timeout"):
                    raise
                continue  # this mirror lacks the image or is down: try the next
            self.chosen = client
            return resolved
        self.chosen = self.clients[-1]
        return self.chosen.resolve()

    def download_blob(self, descriptor: Json, out: BufferedIOBase) -> None:
        (self.chosen or self.clients[-1]).download_blob(descriptor, out)


def _basic(username: str, password: str | None) -> str:
    import base64
    token = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
    return f"Basic {token}"


def _registry_said(response: Response) -> str:
    """The registry's error document, in a few words (read, then the response closed)."""
    try:
        with response:
            errors = json.loads(response.read(MAX_SMALL_BODY)).get("errors") or []
        words = "; ".join(f"{e.get('code', '')} {e.get('message', '')}".strip() for e in errors)
    except (*TRANSIENT, ValueError, AttributeError, TypeError):  # no document, no words
        words = ""
    return f" (registry said: {words[:200]})" if words else ""


def _describe(error: Exception) -> str:
    """A retryable failure in a few words (no URL: a redirect's may hold a signature)."""
    kind = "Timeout" if isinstance(error, TimeoutError) else "ConnectionError"
    return f"{kind} ({str(error)[:150] or type(error).__name__})"


class Backoff:
    """Exponential backoff with jitter until `retry_seconds` have passed, then unreachable;
    never past the pull's deadline (transport.Expired)."""

    def __init__(self, image: str, retry_seconds: float, pull: Deadline | None = None) -> None:
        self.image = image
        self.retry_seconds = retry_seconds
        self.deadline = time.monotonic() + retry_seconds
        self.pull = pull or Deadline(None)
        self.attempt = 0

    def wait(self, error: Exception | str, retry_after: str | None = None) -> None:
        self.pull.check()
        now = time.monotonic()
        if now >= self.deadline:
            what = error if isinstance(error, str) else type(error).__name__
            raise ImageError("unreachable", self.image,
                             f"registry unreachable after {self.retry_seconds:g} s: {what}")
        import random  # only on a retry: ~1 ms to import

        delay = min(8.0, 0.25 * 2 ** self.attempt) * random.uniform(0.5, 1.0)
        if retry_after and retry_after.isdigit():
            delay = max(delay, float(retry_after))
        self.attempt += 1
        time.sleep(max(0.0, min(delay, self.deadline - now, self.pull.remaining())))
