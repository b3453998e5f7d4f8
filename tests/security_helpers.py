"""Helpers for tests/test_security_gateway.py: HTTP from a chosen loopback source
address (the login throttle is per address), dashboard form plumbing, a server's CPU time."""

from __future__ import annotations

import http.client
import os
import re
from email.message import Message
from urllib.parse import urlencode


def call(server, method: str, path: str, *, source: str = "127.0.0.1",
         headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, Message, bytes]:
    """One request to server from source (any 127.x.y.z: all of 127/8 is loopback)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def csrf_of(page: str) -> str:
    """The CSRF token of a dashboard form."""
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, page[:2000]
    return match.group(1)


def cookie_of(headers: Message) -> str:
    """name=value of the response's session cookie."""
    value = headers["Set-Cookie"]
    assert value, "no Set-Cookie"
    return value.split(";", 1)[0]


def form(server, source: str) -> tuple[str, str]:
    """(session cookie, CSRF token) of a fresh sign-in form fetched from source."""
    status, headers, body = call(server, "GET", "/login", source=source)
    assert status == 200, body
    return cookie_of(headers), csrf_of(body.decode())


def login(server, source: str, cookie: str, token: str, user: str,
          password: str) -> tuple[int, Message, bytes]:
    body = urlencode({"csrf_token": token, "username": user, "password": password}).encode()
    return call(server, "POST", "/login", source=source, body=body,
                headers={"Cookie": cookie,
                         "Content-Type": "application/x-www-form-urlencoded"})


def server_cpu_seconds(server) -> float:
    """User + system CPU time of the server process so far (/proc/<pid>/stat)."""
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
