"""Helpers for the image tests: layer tarballs built in memory, and a tiny fake registry.

`FakeRegistry` is a Registry v2 server over plain http on 127.0.0.1 (ThreadingHTTPServer)
serving what a test put in it, counting every GET and connection, and able to misbehave on
purpose: corrupt a blob, answer 503 a few times, demand a Bearer token, or redirect blob GETs
elsewhere, or send slowly (a byte every `trickle` seconds, of a blob or of the headers);
it also serves as a forward proxy (GET http://other-host/...). `ConnectProxy` is an https
proxy (CONNECT tunnels) that records where each tunnel went. `gzip_bomb` makes a layer
that expands a thousandfold without ever holding it expanded.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import re
import secrets
import selectors
import socket
import subprocess
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast

REGISTRY_DIR = Path(os.environ.get("FUNNEL_TEST_REGISTRY_DIR", "/var/lib/funnel-test/registry"))
CA_FILE = REGISTRY_DIR / "tls" / "cert.pem"
OCI_LAYOUTS = REGISTRY_DIR / "oci"
ANONYMOUS = "127.0.0.1:5055"
AUTHENTICATED = "127.0.0.1:5056"
USERNAME = "funnel"
PASSWORD = "funnel-test-pw"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def registry_answers(host: str) -> bool:
    hostname, port = host.rsplit(":", 1)
    try:
        with socket.create_connection((hostname, int(port)), timeout=2):
            return True
    except OSError:
        return False


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(*entries: tuple, gzipped: bool = True) -> bytes:
    """A layer tarball from (name, kind, payload[, mode]) entries: kind is file (payload bytes),
    dir, symlink or hardlink (payload the link target), fifo or chardev."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload, *mode in entries:
            info = tarfile.TarInfo(name)
            info.mode = mode[0] if mode else (0o755 if kind == "dir" else 0o644)
            info.mtime = 1_700_000_000
            data = None
            if kind == "file":
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size = len(data)
            else:
                info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                             "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
                             "chardev": tarfile.CHRTYPE}[kind]
                info.linkname = payload or ""
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buffer.getvalue()
    return gzip.compress(raw, mtime=0) if gzipped else raw


def image_config(env: list[str] | None = None, workdir: str = "/") -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "config": {
        "Env": env or ["PATH=/bin"], "WorkingDir": workdir, "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": []}}).encode()


class FakeRegistry:
    """A Registry v2 server for tests: put images in, count the GETs, misbehave on demand."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.gets: Counter = Counter()      # path -> count
        self.corrupt: set[str] = set()      # blob digests served with one byte flipped
        self.fail_next = 0                  # answer this many requests with 503 first
        self.bearer: tuple[str, str] | None = None  # (username, password) the token needs
        self.redirect_blobs: str | None = None  # answer /v2/ blob GETs with 307 to this + path
        self.authorizations: list[tuple[str, str | None]] = []  # (path, Authorization header)
        self.proxied: Counter = Counter()   # GETs of absolute URLs (as a proxy): netloc -> count
        self.clients: set = set()           # client (host, port) pairs: one per connection
        self.silent_close = False           # close each connection after one answer, unannounced
        self.trickle = 0.0                  # > 0: send blob bodies a byte every this many s
        self.trickle_headers = False        # ... and every answer's headers too
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def settings(self) -> dict:
        return {self.host: {"insecure": True}}

    def add_blob(self, data: bytes) -> dict:
        self.blobs[digest_of(data)] = data
        return {"digest": digest_of(data), "size": len(data)}

    def add_image(self, repository: str, tag: str, layers: list[bytes],
                  config: bytes | None = None) -> str:
        """Store an OCI image; returns its manifest digest."""
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, **self.add_blob(config or image_config())},
                    "layers": [{"mediaType": TAR_GZIP, **self.add_blob(data)} for data in layers]}
        return self.add_manifest(repository, tag, json.dumps(manifest).encode(), OCI_MANIFEST)

    def add_manifest(self, repository: str, tag: str, raw: bytes, media_type: str) -> str:
        digest = digest_of(raw)
        self.manifests[(repository, tag)] = (raw, media_type)
        self.manifests[(repository, digest)] = (raw, media_type)
        return digest

    def blob_gets(self) -> Counter:
        """GETs per blob digest, whatever repository they were asked under."""
        counts: Counter = Counter()
        for path, count in self.gets.items():
            if "/blobs/" in path:
                counts[path.rsplit("/", 1)[1]] += count
        return counts

    def _handler(self):
        registry = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("http://"):  # a forward proxy's request: serve it here
                    netloc, _, rest = self.path[len("http://"):].partition("/")
                    registry.proxied[netloc] += 1
                    self.path = "/" + rest
                with registry.lock:
                    registry.gets[self.path.split("?")[0]] += 1
                    registry.clients.add(self.client_address)
                    registry.authorizations.append((self.path, self.headers.get("Authorization")))
                    failing = registry.fail_next > 0
                    registry.fail_next -= 1 if failing else 0
                if failing:
                    return self._send(503, b'{"errors":[{"code":"UNAVAILABLE"}]}')
                if self.path.startswith("/token"):
                    return self._token()
                if registry.bearer and self.headers.get("Authorization") != "Bearer good-token":
                    return self._send(401, b"{}", {"WWW-Authenticate": (
                        f'Bearer realm="http://{registry.host}/token",service="fake",'
                        f'scope="repository:x:pull"')})
                if registry.redirect_blobs and re.match(r"/v2/.*/blobs/", self.path):
                    return self._send(307, b"", {"Location": registry.redirect_blobs + self.path})
                if self.path.startswith("/storage/"):  # a redirect's target on this host
                    self.path = self.path[len("/storage"):]
                self._serve()
                self.close_connection = self.close_connection or registry.silent_close

            def _token(self) -> None:
                assert registry.bearer is not None  # only the 401 below names this realm
                expected = "Basic " + base64.b64encode(":".join(registry.bearer).encode()).decode()
                if self.headers.get("Authorization") != expected:
                    return self._send(401, b"{}")
                self._send(200, b'{"token": "good-token"}')

            def _serve(self) -> None:
                parts = self.path.split("?")[0].split("/")
                if len(parts) < 5 or parts[1] != "v2":
                    return self._send(404, b"{}")
                repository, kind, ref = "/".join(parts[2:-2]), parts[-2], parts[-1]
                if kind == "manifests" and (repository, ref) in registry.manifests:
                    raw, media_type = registry.manifests[(repository, ref)]
                    return self._send(200, raw, {"Content-Type": media_type,
                                                 "Docker-Content-Digest": digest_of(raw)})
                if kind == "blobs" and ref in registry.blobs:
                    data = registry.blobs[ref]
                    if ref in registry.corrupt:
                        data = bytes([data[0] ^ 0xFF]) + data[1:]
                    return self._send(200, data, {"Content-Type": "application/octet-stream"})
                code = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
                errors = {"errors": [{"code": code, "message": "unknown"}]}
                self._send(404, json.dumps(errors).encode())

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                if registry.trickle and registry.trickle_headers:
                    self.send_header("X-Padding", "x" * 1000)
                    buffered: list[bytes] = getattr(self, "_headers_buffer")  # noqa: B009
                    head = b"".join(buffered) + b"\r\n"  # http.server's, sent by hand
                    buffered.clear()
                    self._slowly(head)
                else:
                    self.end_headers()
                if registry.trickle and "/blobs/" in self.path:
                    return self._slowly(body)
                self.wfile.write(body)

            def _slowly(self, data: bytes) -> None:
                try:
                    for index in range(len(data)):
                        self.wfile.write(data[index:index + 1])
                        self.wfile.flush()
                        time.sleep(registry.trickle)
                except (OSError, ValueError):  # the client gave up, or the server closed
                    self.close_connection = True

        return Handler


class ConnectProxy:
    """An https proxy for tests: relays each CONNECT tunnel and records its target."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_CONNECT(self) -> None:
                proxy.tunnels.append(self.path)
                host, port = self.path.rsplit(":", 1)
                try:
                    upstream = socket.create_connection((host, int(port)), timeout=10)
                except OSError:
                    return self.send_error(502)
                self.send_response(200, "Connection established")
                self.end_headers()
                with upstream:
                    relay(self.connection, upstream)
                self.close_connection = True

        return Handler


def relay(one: socket.socket, other: socket.socket) -> None:
    """Copy bytes both ways until either side closes (or 30 s of silence)."""
    with selectors.DefaultSelector() as selector:
        selector.register(one, selectors.EVENT_READ, other)
        selector.register(other, selectors.EVENT_READ, one)
        while events := selector.select(timeout=30):
            for key, _ in events:
                data = cast(socket.socket, key.fileobj).recv(1 << 16)  # registered above
                if not data:
                    return
                key.data.sendall(data)


def gzip_bomb(expanded: int, name: str = "zeros") -> bytes:
    """A gzip layer of one file of `expanded` zero bytes, made without holding or writing
    them: each MiB of zeros deflates, after a full flush, to the same ~1 KB block, repeated
    (3 GiB -> ~3 MB). A real gzip stream: its CRC and size trailer are right."""
    import struct
    import zlib
    info = tarfile.TarInfo(name)
    info.size = expanded
    info.mtime = 1_700_000_000
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    chunk = bytes(1 << 20)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff",  # gzip header, no name, mtime 0
             compressor.compress(header) + compressor.flush(zlib.Z_FULL_FLUSH)]
    crc = zlib.crc32(header)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    whole, rest = divmod(expanded, len(chunk))
    parts.append(block * whole)
    for _ in range(whole):  # ~0.3 s per GiB
        crc = zlib.crc32(chunk, crc)
    tail = bytes(rest) + bytes(-expanded % tarfile.BLOCKSIZE) + bytes(2 * tarfile.BLOCKSIZE)
    parts.append(compressor.compress(tail) + compressor.flush())
    crc = zlib.crc32(tail, crc)
    size = len(header) + expanded + len(tail)
    parts.append(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))
    return b"".join(parts)


def local_user(prefix: str, groups: tuple[str, ...] = ()) -> str:
    """A real local account (useradd, no home), in `groups`; remove it with drop_user."""
    name = f"fh{prefix}{secrets.token_hex(3)}"
    extra = ["-G", ",".join(groups)] if groups else []
    subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", *extra, name], check=True)
    return name


def local_group(prefix: str) -> str:
    name = f"fh{prefix}{secrets.token_hex(3)}"
    subprocess.run(["groupadd", name], check=True)
    return name


def drop_user(name: str) -> None:
    subprocess.run(["userdel", name], check=False)


def drop_group(name: str) -> None:
    subprocess.run(["groupdel", name], check=False)
