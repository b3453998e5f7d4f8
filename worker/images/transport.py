"""A small HTTP/1.1 GET client on http.client + ssl for registry.py (not named http.py: that
would read as the standard library's package).

Contract: `Transport(ca_file, allow_http, home).get(url, headers)` returns the open
`Response` to the first answer that is not a redirect. It follows 301/302/303/307/308 at most
MAX_REDIRECTS times, drops Authorization when a redirect leaves the scheme and host (blob
GETs often go to object storage), and refuses (`Refused`) a redirect from https to plain
http unless `allow_http`. One keep-alive connection per scheme and host, reused once a body
has been read to its end; HTTPS_PROXY / HTTP_PROXY / ALL_PROXY / NO_PROXY are read from the
environment as urllib (and requests) read them, with CONNECT tunnels for https. TLS trusts
`ca_file` alone for `home`, `ca_file` plus the system's CAs elsewhere. Connect timeout
CONNECT_TIMEOUT, read timeout READ_TIMEOUT, both cut to what is left of the `Deadline`
of the whole pull; bodies are read one socket read at a time with the deadline checked
between reads (a registry trickling a byte at a time cannot stretch a pull), and a
watchdog shuts the connections down when it passes (a trickle of headers or TLS records).
Failures are raised as they come: OSError and http.client.HTTPException (the caller
retries them), ssl.SSLError, and Expired once the deadline has passed (never retried).
Cost: http.client and ssl load in ~30 ms (requests: ~95 ms); urllib.request (~8 ms more)
loads only when a *_proxy variable is set.
"""

from __future__ import annotations

import http.client
import math
import os
import socket
import ssl
import time
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    import threading
    from collections.abc import Iterator

Key = tuple[str, str]                    # scheme, host[:port]: one kept-alive connection each
Proxy = tuple[str, int, "str | None"]    # host, port, Proxy-Authorization

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
CONNECT_TIMEOUT = 10  # seconds
READ_TIMEOUT = 60     # seconds without a byte
USER_AGENT = "funnel-hpc-worker"
DRAIN_LIMIT = 64 << 10  # read at most this much of an unwanted body to keep its connection
_CONTEXTS: dict[tuple[str | None, bool], ssl.SSLContext] = {}


class Refused(Exception):
    """A redirect or proxy setting this client will not follow; retrying will not help."""


class Expired(Exception):
    """The deadline of the whole pull has passed (not an OSError: never retried)."""


class Deadline:
    """The time by which a whole pull (all requests, retries included) must be done."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.end = math.inf if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self) -> None:
        if self.remaining() <= 0:
            raise Expired(f"deadline of {self.seconds:g} s passed")

    def timeout(self, limit: float) -> float:
        """A socket timeout: `limit`, or less if the deadline is nearer (Expired if passed)."""
        self.check()
        return min(limit, self.remaining())


def tls_context(ca_file: str | None, system: bool) -> ssl.SSLContext:
    """A verifying context trusting `ca_file`, the system's CAs if `system` or no `ca_file`,
    built once per process (loading the system's bundle costs ~10 ms: only when needed)."""
    context = _CONTEXTS.get((ca_file, system))
    if context is None:
        context = ssl.create_default_context(cafile=ca_file)
        if ca_file and system:
            context.load_default_certs()
        _CONTEXTS[ca_file, system] = context
    return context


class Response:
    """An answer whose body is being read; `close()` keeps the connection if the body ended."""

    def __init__(self, answer: http.client.HTTPResponse, transport: Transport, key: Key,
                 url: str, sock: socket.socket) -> None:
        self.answer = answer
        self.url = url  # where it came from, after redirects
        self.status = answer.status
        self.headers = answer.headers  # case-insensitive get()
        self.transport = transport
        self.key = key
        self.sock = sock

    def read(self, limit: int) -> bytes:
        """At most `limit` bytes of the body (fewer only at its end)."""
        parts = []
        while limit > 0 and (chunk := self._read1(limit)):
            parts.append(chunk)
            limit -= len(chunk)
        return b"".join(parts)

    def chunks(self, size: int) -> Iterator[bytes]:
        while chunk := self._read1(size):
            yield chunk

    def _read1(self, size: int) -> bytes:
        """What one socket read gives (at most `size` bytes), within the deadline."""
        if self.answer.isclosed():
            return b""
        if self.answer.length == 0:  # 3.11's read1 leaves the response open at its end
            self.answer.read()  # ends it, so that the connection carries the next request
            return b""
        self.sock.settimeout(self.transport.deadline.timeout(READ_TIMEOUT))
        chunk = self.answer.read1(size)
        if not chunk:  # the end, or the watchdog shut the connection at the deadline
            self.transport.deadline.check()
        return chunk

    def discard(self) -> None:
        """Read a small rest of the body, so that the connection can carry the next request."""
        if self.answer.length is not None and self.answer.length <= DRAIN_LIMIT:
            try:
                self.answer.read()
            except (OSError, http.client.HTTPException):
                pass  # cut off (by the watchdog too): the connection is dropped below
        self.close()

    def close(self) -> None:
        if not self.answer.isclosed():  # bytes left unread would be read as the next answer
            self.answer.close()
            self.transport.drop(self.key)

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Transport:
    """GETs over kept-alive connections, one per scheme and host, for one registry's settings."""

    # `ca_file` alone vouches for `home` (the registry); other hosts (a token service, object
    # storage behind a redirect) may hold certificates from the system's CAs or from ca_file
    def __init__(self, ca_file: str | None = None, allow_http: bool = False,
                 home: str | None = None, deadline: Deadline | None = None) -> None:
        self.ca_file = ca_file
        self.home = home
        self.allow_http = allow_http
        self.connections: dict[Key, http.client.HTTPConnection] = {}
        self.deadline = deadline or Deadline(None)
        self.watchdog: threading.Timer | None = None

    def close(self) -> None:
        """Stop the watchdog and close every kept-alive connection."""
        if self.watchdog is not None:
            self.watchdog.cancel()
        for key in list(self.connections):
            self.drop(key)

    def _arm(self) -> None:
        """Shut every connection down when the deadline passes, whatever it is waiting for."""
        if self.watchdog is None and self.deadline.end != math.inf:
            import threading
            self.watchdog = threading.Timer(max(0.0, self.deadline.remaining()), self._expire)
            self.watchdog.daemon = True
            self.watchdog.start()

    def _expire(self) -> None:
        for connection in list(self.connections.values()):
            sock = connection.sock
            if sock is not None:
                try:  # socket.socket's own: ssl's would unwrap under a reading thread
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed

    def get(self, url: str, headers: dict[str, str]) -> Response:
        for _ in range(MAX_REDIRECTS + 1):
            response = self._get_once(url, headers)
            location = response.headers.get("Location")
            if response.status not in REDIRECTS or not location:
                return response
            response.discard()
            target = self._redirect_target(url, location)
            if _origin(target) != _origin(url):  # credentials stay with the host they are for
                headers = {name: value for name, value in headers.items()
                           if name.lower() != "authorization"}
            url = target
        raise Refused(f"more than {MAX_REDIRECTS} redirects")

    def drop(self, key: Key) -> None:
        connection = self.connections.pop(key, None)
        if connection is not None:
            connection.close()

    def _redirect_target(self, url: str, location: str) -> str:
        target = urljoin(url, location.strip())
        if not target.isascii() or not target.isprintable() or " " in target:
            raise Refused("bad redirect location")  # http.client would refuse to send it
        try:
            scheme = urlsplit(target).scheme
            _origin(target)  # a bad port raises here rather than as a retryable error later
        except ValueError:
            raise Refused("bad redirect location") from None  # not quoted: it may hold a signature
        if scheme not in ("http", "https"):
            raise Refused(f"redirected to an unsupported scheme {scheme!r}")
        if scheme == "http" and url.startswith("https:") and not self.allow_http:
            raise Refused("redirected from https to plain http")
        return target

    def _get_once(self, url: str, headers: dict[str, str]) -> Response:
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc)
        proxy = proxy_for(parts.scheme, parts.hostname or "")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": USER_AGENT, **headers}
        if proxy and parts.scheme == "http":  # a forward proxy takes the whole URL
            target = url
            if proxy[2]:
                headers["Proxy-Authorization"] = proxy[2]
        reused = key in self.connections
        self._arm()
        while True:
            connection = self.connections.get(key) or self._connect(key, parts, proxy)
            try:
                if connection.sock is None:  # new, or closed by the server after its last answer
                    connection.timeout = self.deadline.timeout(CONNECT_TIMEOUT)
                    connection.connect()
                sock: socket.socket = connection.sock
                sock.settimeout(self.deadline.timeout(READ_TIMEOUT))
                connection.request("GET", target, headers=headers)
                return Response(connection.getresponse(), self, key, url, sock)
            except ConnectionError:
                self.drop(key)
                if not reused:
                    raise
                reused = False  # a kept-alive connection the server had closed: once more, fresh
            except BaseException:
                self.drop(key)
                raise

    def _connect(self, key: Key, parts: SplitResult,
                 proxy: Proxy | None) -> http.client.HTTPConnection:
        host, port = parts.hostname or "", _port(parts)
        via_host, via_port = (proxy[0], proxy[1]) if proxy else (host, port)
        connection: http.client.HTTPConnection
        if parts.scheme == "https":
            context = tls_context(self.ca_file, system=parts.netloc != self.home)
            connection = http.client.HTTPSConnection(via_host, via_port, timeout=CONNECT_TIMEOUT,
                                                     context=context)
            if proxy:
                connection.set_tunnel(host, port, headers=(
                    {"Proxy-Authorization": proxy[2]} if proxy[2] else None))
        else:
            connection = http.client.HTTPConnection(via_host, via_port, timeout=CONNECT_TIMEOUT)
        self.connections[key] = connection
        return connection


def proxy_for(scheme: str, hostname: str) -> Proxy | None:
    """(host, port, Proxy-Authorization or None) of the proxy for this URL, or None."""
    if not any(name.lower().endswith("_proxy") for name in os.environ):
        return None  # the common case, without importing urllib.request
    from urllib.request import (  # type: ignore[attr-defined]  # public, untyped in typeshed
        getproxies_environment,
        proxy_bypass_environment,
    )
    proxies = getproxies_environment()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or proxy_bypass_environment(hostname, proxies):
        return None
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    try:
        port = parts.port or 80
    except ValueError:
        raise Refused(f"bad {scheme} proxy port") from None  # the setting may hold a password
    if parts.scheme != "http":
        raise Refused(f"unsupported proxy scheme {parts.scheme!r} (want http://)")
    auth = None
    if parts.username is not None:
        import base64
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode()
    return parts.hostname or "", port, auth


def _port(parts: SplitResult) -> int:
    return parts.port or (443 if parts.scheme == "https" else 80)


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), _port(parts)
