"""The tes backend's HTTP client: one remote TES 1.1 server, its credentials, bounded answers.

Every call goes through ``call``: a ``requests`` session per thread (submissions run in
several threads), a timeout, no redirects (a 3xx is an error: credentials never follow a
redirect to another host), an answer read to at most ``MAX_ANSWER_BYTES`` and parsed as a
JSON object. Failures are one ``BackendError`` each, by one rule: the server could not be
reached, timed out, answered 5xx or 429 -> transient (asked again next tick); any other
answer -> permanent, quoting the server's words (its ``message``, or the text's start).

Credentials are read once, at start, from files (``token_file``: a bearer token;
``username`` + ``password_file``: HTTP basic): each must be a regular file that no group
or other user may read (mode 600 or stricter). They are sent only to ``url``'s host and
are never logged nor part of an error message.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import threading
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from funnel_hpc.backends.base import BackendError
from funnel_hpc.core.config import TesOptions

API_PREFIX = "/ga4gh/tes/v1"
MAX_ANSWER_BYTES = 32 << 20  # a page of BASIC tasks, or one FULL task with its log tails
_WORDS = 300                 # characters of a remote's error text quoted in an error
URL = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~%!$&'()*+,;=:@/-]*)?")
# the remote's task ids go into URL paths: a conservative alphabet (TES leaves ids free;
# funnel-hpc's, Funnel's and TESK's fit) so a hostile answer cannot steer a path
REMOTE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~:-]{0,127}")


class RemoteError(BackendError):
    """The remote answered an HTTP error status (`status`; 0: it did not answer)."""

    def __init__(self, message: str, status: int = 0, transient: bool = False):
        super().__init__(message, transient)
        self.status = status


def read_secret(path: str, key: str) -> str:
    """The first line of a secret file: a regular file no group or other may read.
    ValueError naming the key (never the content) otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"backend.tes.{key}: cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"backend.tes.{key}: {path} is not a regular file")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise ValueError(f"backend.tes.{key}: {path} may be read by others (mode "
                             f"{stat.S_IMODE(info.st_mode):o}): make it 600")
        data = os.read(fd, 64 << 10)
    finally:
        os.close(fd)
    lines = data.decode(errors="replace").splitlines()
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise ValueError(f"backend.tes.{key}: {path} is empty")
    return secret


def auth_headers(options: TesOptions) -> dict[str, str]:
    """The Authorization header of the configured credentials (none when none is set)."""
    if options.token_file and (options.username or options.password_file):
        raise ValueError("backend.tes: set token_file or username + password_file, not both")
    if options.token_file:
        return {"Authorization": "Bearer " + read_secret(options.token_file, "token_file")}
    if options.username or options.password_file:
        if not (options.username and options.password_file):
            raise ValueError("backend.tes: username and password_file go together")
        password = read_secret(options.password_file, "password_file")
        pair = f"{options.username}:{password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    return {}


class TesClient:
    """Calls to one remote TES server (base URL, credentials, TLS settings)."""

    def __init__(self, options: TesOptions):
        url = options.url.rstrip("/")
        if not URL.fullmatch(url):
            raise ValueError(f"backend.tes.url: {options.url!r} is not an http(s) URL")
        self.url = url
        self.api = url + API_PREFIX
        self.timeout = options.timeout_seconds
        self.verify: bool | str = options.ca_file or options.verify_tls
        if options.ca_file and not Path(options.ca_file).is_file():
            raise ValueError(f"backend.tes.ca_file: {options.ca_file} is not a file")
        self.headers = {"Accept": "application/json", **auth_headers(options)}
        # calls answered, by kind ("GET /tasks", "GET /tasks/{id}", "POST /tasks/{id}:cancel")
        self.calls: Counter[str] = Counter()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # no proxy or .netrc from the environment
            session.headers.update(self.headers)
            session.verify = self.verify
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def call(self, method: str, path: str, *, params: Any = None,
             body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON object the remote answered to METHOD api+path; BackendError otherwise."""
        what = f"{method} {path.split('?')[0]}"
        try:
            with self._session().request(method, self.api + path, params=params, json=body,
                                         timeout=self.timeout, allow_redirects=False,
                                         stream=True) as resp:
                data = _bounded(resp, what)
                status = resp.status_code
        except requests.RequestException as exc:
            raise RemoteError(f"tes {what}: {self.url} unreachable: "
                              f"{type(exc).__name__}", transient=True) from None
        self.calls[f"{method} {_kind(path)}"] += 1
        if status >= 300:
            raise RemoteError(f"tes {what}: HTTP {status}: {_words(data)}".rstrip(": "),
                              status, transient=status >= 500 or status == 429)
        try:
            answer = json.loads(data)
        except (ValueError, RecursionError):
            raise BackendError(f"tes {what}: the answer is not JSON: {_words(data)}") from None
        if not isinstance(answer, dict):
            raise BackendError(f"tes {what}: the answer is not a JSON object")
        return answer

    def task_path(self, remote_id: str) -> str:
        """/tasks/<id> for an id of REMOTE_ID's alphabet (checked by the caller)."""
        return "/tasks/" + quote(remote_id, safe="")

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()


def _bounded(resp: requests.Response, what: str) -> bytes:
    """The answer's body, at most MAX_ANSWER_BYTES (a longer one is an error)."""
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_content(1 << 16):
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise BackendError(f"tes {what}: the answer is longer than {MAX_ANSWER_BYTES} "
                               "bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _words(data: bytes) -> str:
    """What an error answer says: its JSON message (TES servers' and funnel-hpc's
    {"message": ...}), else the start of its text, printable only."""
    text = data[:4096].decode(errors="replace")
    try:
        answer = json.loads(data) if len(data) <= 65536 else None
    except (ValueError, RecursionError):
        answer = None
    if isinstance(answer, dict):
        for key in ("message", "msg", "error", "detail"):
            if isinstance(answer.get(key), str):
                text = answer[key]
                break
    return "".join(c if c.isprintable() else " " for c in text[:_WORDS]).strip()


def _kind(path: str) -> str:
    """The call's kind for `calls`: the path with the task id written {id}."""
    parts = path.split("?")[0].split("/")
    if len(parts) > 2:
        parts[2] = "{id}" + (":cancel" if parts[2].endswith(":cancel") else "")
    return "/".join(parts)
