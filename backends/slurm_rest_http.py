"""HTTP to slurmrestd: JSON requests over one kept-open connection (standard library only).

Two transports, as backend.slurm.rest configures them:

- a unix socket (``socket``) with ``rest_auth/local``: slurmrestd takes the caller from
  the socket's peer credentials and accepts only its own uid (measured: another uid gets
  401 "Authentication failure"), so the gateway runs as slurmrestd's account;
- ``url`` (http or https) with ``rest_auth/jwt``: every request carries the
  X-SLURM-USER-NAME and X-SLURM-USER-TOKEN headers, the token read from ``token_file``
  (the token alone or ``scontrol token``'s line ``SLURM_JWT=...``; re-read when the
  file changes, so a cron job can renew it).

Cost: one request and one response on a connection kept across calls (slurmrestd keeps
HTTP/1.1 connections alive; it closes after an error answer, and the next call opens a
new one). Before reusing a connection the client checks whether slurmrestd closed it
meanwhile, so a submission is never sent twice: a POST is never retried, a GET or DELETE
once on a fresh connection. Failures to reach slurmrestd are ``BackendError(transient=True)``.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import ssl
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from funnel_hpc.backends.base import BackendError

USER_HEADER = "X-SLURM-USER-NAME"
TOKEN_HEADER = "X-SLURM-USER-TOKEN"
TOKEN_LINE = "SLURM_JWT="  # how `scontrol token` prints the token
# errors that mean "the kept connection was closed under us": the request may be sent anew
_DROPPED = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
            http.client.CannotSendRequest)
# 502-504: a proxy in front of slurmrestd could not reach it
_GATEWAY_STATUSES = frozenset({502, 503, 504})


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over an AF_UNIX stream socket."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Answer:
    """One slurmrestd answer: HTTP status and the JSON body (None when it was not JSON)."""

    def __init__(self, status: int, body: Any, text: str):
        self.status = status
        self.body = body
        self.text = text

    def errors(self) -> list[dict[str, Any]]:
        """The body's `errors` list (v0.0.36-0.0.38: error, error_number or error_code,
        description, source)."""
        errors = self.body.get("errors") if isinstance(self.body, dict) else None
        return [error for error in errors or [] if isinstance(error, dict)]

    def words(self) -> str:
        """What slurmrestd said, for a BackendError: its error texts, else the raw body."""
        parts = []
        for error in self.errors():
            text = " - ".join(str(error[key]) for key in ("error", "description")
                              if error.get(key))
            if text and text not in parts:
                parts.append(text)
        return ("; ".join(parts) or self.text.strip() or "(empty answer)")[:300]


class RestTransport:
    """JSON over HTTP to one slurmrestd, on one connection kept open (thread-safe: one
    request at a time). `requests` and `connects` count calls and connections made."""

    def __init__(self, socket_path: str = "", url: str = "", token_file: str = "",
                 user: str = "", timeout: float = 60):
        if bool(socket_path) == bool(url):
            raise ValueError("slurmrestd: give a unix socket path or a url, not both")
        self.socket_path, self.url, self.timeout = socket_path, url, timeout
        self.token_file, self.user = token_file, user
        self.where = f"unix:{socket_path}" if socket_path else url
        self.requests = 0
        self.connects = 0
        self._connection: http.client.HTTPConnection | None = None
        self._token: tuple[float, str] | None = None  # (file mtime, token)
        self._lock = threading.Lock()
        self._parsed = urllib.parse.urlsplit(url) if url else None

    # ---- connection ----

    def _open(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection
        if self.socket_path:
            connection = UnixHTTPConnection(self.socket_path, self.timeout)
        else:
            assert self._parsed is not None
            host, port = self._parsed.hostname or "", self._parsed.port
            if self._parsed.scheme == "https":
                connection = http.client.HTTPSConnection(
                    host, port, timeout=self.timeout, context=ssl.create_default_context())
            else:
                connection = http.client.HTTPConnection(host, port, timeout=self.timeout)
        connection.connect()
        self.connects += 1
        return connection

    def _connection_for(self, fresh: bool) -> http.client.HTTPConnection:
        """The kept connection, unless slurmrestd closed it meanwhile (readable with
        nothing to read: EOF) or `fresh` is asked; else a new one."""
        connection = self._connection
        if connection is not None and connection.sock is not None and not fresh:
            readable, _, _ = select.select([connection.sock], [], [], 0)
            if not readable:
                return connection
        self.close()
        self._connection = self._open()
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    # ---- requests ----

    def _headers(self, has_body: bool, acting: tuple[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if has_body:
            headers["Content-Type"] = "application/json"
        if acting is not None:
            headers[USER_HEADER], headers[TOKEN_HEADER] = acting
        elif self.token_file:
            headers[USER_HEADER] = self.user
            headers[TOKEN_HEADER] = self._read_token()
        return headers

    def _read_token(self) -> str:
        path = Path(self.token_file)
        try:
            mtime = path.stat().st_mtime
            if self._token is None or self._token[0] != mtime:
                # the token alone, or the line `scontrol token` prints (SLURM_JWT=...)
                token = path.read_text().strip().removeprefix(TOKEN_LINE)
                self._token = (mtime, token)
        except OSError as exc:
            raise BackendError(f"cannot read the slurmrestd token file {self.token_file}: "
                               f"{exc.strerror}", transient=True) from None
        # transient, as a refused token is: a renewal may be rewriting the file
        if not self._token[1] or any(c in self._token[1] for c in "\r\n\0"):
            raise BackendError(f"the slurmrestd token file {self.token_file} holds no token",
                               transient=True)
        return self._token[1]

    def request(self, method: str, path: str, body: Any = None,
                acting: tuple[str, str] | None = None) -> Answer:
        """Send one request, return slurmrestd's answer (whatever its status). Raises
        BackendError(transient=True) when slurmrestd could not be reached or timed out.
        acting: (user, token) of another account to send it as (rest_auth/jwt only)."""
        if acting is not None and not self.url:
            raise BackendError("slurmrestd on a unix socket acts for its caller only")
        data = json.dumps(body).encode() if body is not None else None
        headers = self._headers(data is not None, acting)
        retry = method in ("GET", "DELETE")  # idempotent: sent again on a fresh connection
        with self._lock:
            self.requests += 1
            for attempt in (0, 1):
                try:
                    connection = self._connection_for(fresh=attempt > 0)
                    connection.request(method, path, body=data, headers=headers)
                    response = connection.getresponse()
                    raw = response.read()
                    if response.will_close:
                        self.close()
                    break
                except _DROPPED as exc:
                    self.close()
                    if retry and attempt == 0:
                        continue
                    raise self._unreachable(method, path, exc) from None
                except PermissionError as exc:  # the socket's mode or directory: set-up
                    self.close()
                    raise BackendError(f"slurmrestd at {self.where}: {exc.strerror} (the "
                                       "gateway's account may not use the socket)") from None
                except (OSError, http.client.HTTPException) as exc:
                    self.close()
                    raise self._unreachable(method, path, exc) from None
        text = raw.decode(errors="replace")
        try:
            parsed = json.loads(text) if text.strip() else None
        except ValueError:
            parsed = None
        answer = Answer(response.status, parsed, text)
        if response.status in _GATEWAY_STATUSES:
            raise BackendError(f"slurmrestd {method} {path}: {response.status} "
                               f"{answer.words()}", transient=True)
        return answer

    def _unreachable(self, method: str, path: str, exc: BaseException) -> BackendError:
        reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                  else str(exc) or type(exc).__name__)
        return BackendError(f"slurmrestd at {self.where} unreachable ({method} {path}): "
                            f"{reason}", transient=True)


def default_user() -> str:
    """The account this process runs as (what rest_auth/local will see)."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())
