"""Response headers every HTTP answer gets: security headers, and CORS for the API.

Security: a Content-Security-Policy that lets a page run only the scripts and styles
carrying this response's nonce (``g.csp_nonce``, put in the dashboard's templates)
and load nothing from other sites, ``X-Frame-Options: DENY``,
``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``.

CORS (``server.cors_origins``; empty: off) on the TES routes only: an origin listed
by name gets ``Access-Control-Allow-Origin: <origin>`` with
``Access-Control-Allow-Credentials: true``; ``"*"`` lets any other origin read
responses without credentials (``*`` is never combined with credentials). A
preflight (OPTIONS with ``Access-Control-Request-Method``) is answered 204 before
authentication, as browsers send preflights without credentials. Cost: a few
header writes per response.
"""

from __future__ import annotations

import secrets

from flask import Flask, Response, g, request

from funnel_hpc.gateway.web.tes_routes import LEGACY_PREFIX, TES_PREFIX

CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"
CORS_EXPOSE = "Retry-After, WWW-Authenticate, Warning"  # Warning: fields a create ignored
CORS_MAX_AGE = "600"


def _csp(nonce: str) -> str:
    return ("default-src 'none'; "
            f"script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")


class Cors:
    """Which origins may read API responses, and with credentials or not."""

    def __init__(self, origins: list[str]):
        self.named = {str(o).rstrip("/") for o in origins if o != "*"}
        self.any = "*" in origins

    @property
    def enabled(self) -> bool:
        return bool(self.named) or self.any

    def allow(self, origin: str | None) -> tuple[str, bool] | None:
        """(Access-Control-Allow-Origin value, credentials allowed) or None."""
        if not origin:
            return None
        if origin in self.named:
            return origin, True
        return ("*", False) if self.any else None

    def headers(self, resp: Response, origin: str | None) -> None:
        allowed = self.allow(origin)
        resp.vary.add("Origin")
        if allowed is None:
            return
        resp.headers["Access-Control-Allow-Origin"] = allowed[0]
        if allowed[1]:
            resp.headers["Access-Control-Allow-Credentials"] = "true"
        resp.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE


def _api_path(path: str) -> bool:
    return path.startswith((TES_PREFIX + "/", LEGACY_PREFIX + "/"))


def install(app: Flask, cors_origins: list[str]) -> None:
    """Register the hooks; call before any other before_request hook is added."""
    cors = Cors(cors_origins)

    @app.before_request
    def _preflight_and_nonce():
        g.csp_nonce = secrets.token_urlsafe(16)
        if (cors.enabled and request.method == "OPTIONS" and _api_path(request.path)
                and "Access-Control-Request-Method" in request.headers):
            resp = Response(status=204)
            if cors.allow(request.headers.get("Origin")):
                resp.headers["Access-Control-Allow-Methods"] = CORS_METHODS
                resp.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
                resp.headers["Access-Control-Max-Age"] = CORS_MAX_AGE
            return resp
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = _csp(g.get("csp_nonce") or "none")
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        if cors.enabled and _api_path(request.path):
            cors.headers(resp, request.headers.get("Origin"))
        return resp
