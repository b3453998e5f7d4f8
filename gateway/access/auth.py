"""Who is calling: HTTP Basic, bearer tokens (static or OIDC/JWT), or nobody.

``auth.mode`` selects it:
- ``none``: no authentication; every caller sees every task (local quick start only).
- ``basic``: HTTP Basic against ``auth.users`` (name -> password hash) and/or an
  htpasswd-style file (``name:hash`` lines; werkzeug ``scrypt:``/``pbkdf2:`` or bcrypt
  ``$2y$`` hashes).
- ``bearer``: ``Authorization: Bearer <token>``; a token listed in ``auth.tokens``
  (token -> user name) or a JWT signed by a key of the JWKS in ``auth.oidc.jwks_file``
  or ``auth.oidc.jwks_url``, with issuer/audience checked when configured.
- ``basic+bearer``: either.

Users named in ``auth.admins`` (or JWTs whose ``auth.oidc.admin_claim`` holds one of
``auth.oidc.admin_values``) see and cancel every task; everyone else only their own.

Given the client's address, every check goes through a ``LoginThrottle``
(gateway/access/ratelimit.py) first: a locked-out address is refused (``Throttled``) before
any credential is looked at, and each password-hash check draws on its bucket. A
correct Basic password is remembered (keyed by an HMAC, ``VERIFIED_TTL`` seconds), so
an API client sending Basic on every request pays for one hash, not one per
request. Unknown users cost the same hash work as known ones (``_dummy_hash``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from werkzeug.security import check_password_hash, generate_password_hash

from funnel_hpc.core import worker_tokens
from funnel_hpc.core.config import AuthSection
from funnel_hpc.gateway.access.ratelimit import LoginThrottle

log = logging.getLogger(__name__)

MODES = ("none", "basic", "bearer", "basic+bearer")


@dataclass(frozen=True)
class Principal:
    user: str | None   # None only when auth is off
    admin: bool
    task: str | None = None  # a worker's token: this task only (core/worker_tokens.py)

    @property
    def scope(self) -> str | None:
        """Owner filter for reads and cancels: None means all tasks (a worker's requests
        are held to its own task before they get this far)."""
        return None if self.admin or self.task else self.user


ANONYMOUS_ADMIN = Principal(None, True)


VERIFIED_TTL = 300.0  # seconds a correct Basic password is remembered
VERIFIED_MAX = 10_000


class AuthError(Exception):
    """Credentials missing or wrong (HTTP 401 / gRPC UNAUTHENTICATED)."""


class Throttled(Exception):
    """Too many attempts from one address (HTTP 429 / gRPC RESOURCE_EXHAUSTED)."""

    def __init__(self, retry_after: float):
        super().__init__(f"too many sign-in attempts; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


def _check_hash(stored: str, password: str) -> bool:
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        try:
            import bcrypt
        except ImportError:  # pragma: no cover - bcrypt is a dependency
            return False
        return bcrypt.checkpw(password.encode(), stored.replace("$2y$", "$2b$", 1).encode())
    try:
        return check_password_hash(stored, password)
    except (ValueError, TypeError):
        return False


def _hash_method(stored: str) -> str:
    """"scrypt:32768:8:1", "pbkdf2:sha256:600000" or "$2b$12": algorithm and cost."""
    if stored.startswith(("$2a$", "$2b$", "$2y$")):
        return stored[:6]
    return stored.split("$", 1)[0]


def _dummy_hash(hashes: Iterable[str]) -> str:
    """A hash of a random password made with the most common algorithm and cost among
    the configured hashes, checked for unknown users: they then cost what known ones do."""
    methods = Counter(_hash_method(h) for h in hashes)
    method = methods.most_common(1)[0][0] if methods else "scrypt"
    password = secrets.token_urlsafe(16)
    if method.startswith("$2"):
        import bcrypt

        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(int(method[4:6]))).decode()
    try:
        return generate_password_hash(password, method=method)
    except (ValueError, TypeError):  # a method werkzeug cannot make: its default
        return generate_password_hash(password)


class Authenticator:
    def __init__(self, auth: AuthSection, work_dir: str):
        self.mode: str = auth.mode
        if self.mode not in MODES:
            raise ValueError(f"auth.mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        self.admins = set(auth.admins)
        self.users: dict[str, str] = dict(auth.users)
        if auth.htpasswd_file:
            self.users.update(self._read_htpasswd(Path(auth.htpasswd_file)))
        self.tokens: dict[str, str] = dict(auth.tokens)
        self.oidc = auth.oidc
        self._jwks_client: Any = None  # a jwt.PyJWKClient once used (jwt loads lazily)
        self._jwks_keys: list | None = None
        if self.mode != "none" and not (self.users or self.tokens or self._oidc_enabled):
            raise ValueError("auth is on but no users, tokens or OIDC keys are configured")
        self.worker_key = worker_tokens.load_key(work_dir) if self.enabled else b""
        self.throttle = LoginThrottle.from_config(auth)
        self._dummy = _dummy_hash(self.users.values()) if "basic" in self.mode else ""
        self._verified_key = secrets.token_bytes(32)
        self._verified: dict[bytes, float] = {}  # HMAC(user, password) -> expiry
        self._verified_lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    @property
    def _oidc_enabled(self) -> bool:
        return bool(self.oidc.jwks_file or self.oidc.jwks_url)

    @staticmethod
    def _read_htpasswd(path: Path) -> dict[str, str]:
        users = {}
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"auth.htpasswd_file: cannot read {path}: {exc.strerror}") from exc
        for number, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, hashed = line.partition(":")
            if not sep or not name or not hashed:
                raise ValueError(f"auth.htpasswd_file: line {number} is not NAME:HASH")
            users[name] = hashed
        return users

    def www_authenticate(self) -> str:
        return 'Basic realm="funnel-hpc"' if "basic" in self.mode else 'Bearer realm="funnel-hpc"'

    # ---- checks ----

    def principal_for(self, user: str, claims: dict | None = None) -> Principal:
        admin = user in self.admins
        claim = self.oidc.admin_claim
        if claims and claim:
            value = claims.get(claim)
            values = value if isinstance(value, list) else [value]
            admin = admin or any(v in self.oidc.admin_values for v in values)
        return Principal(user, admin)

    def check_password(self, user: str, password: str,
                       client: str | None = None) -> Principal | None:
        """The user if the password is right, else None. With a client address, a hash
        check draws on the throttle's bucket (Throttled when it is empty)."""
        stored = self.users.get(user)
        memo = hmac.new(self._verified_key, f"{user}\0{password}".encode(),
                        hashlib.sha256).digest()
        now = time.monotonic()
        with self._verified_lock:
            if stored is not None and self._verified.get(memo, 0.0) > now:
                return self.principal_for(user)
        if client is not None:
            wait = self.throttle.take_check(client)
            if wait > 0:
                raise Throttled(wait)
        if stored is None:
            _check_hash(self._dummy, password)  # same work for unknown users
            return None
        if not _check_hash(stored, password):
            return None
        with self._verified_lock:
            if len(self._verified) >= VERIFIED_MAX:
                self._verified = {k: v for k, v in self._verified.items() if v > now}
            if len(self._verified) < VERIFIED_MAX:
                self._verified[memo] = now + VERIFIED_TTL
        return self.principal_for(user)

    def login(self, user: str, password: str, client: str) -> Principal | None:
        """The dashboard's form: check_password behind the client's throttle."""
        self._refuse_if_locked(client)
        principal = self.check_password(user, password, client)
        if principal is None:
            self.throttle.failed(client)
        return principal

    def _refuse_if_locked(self, client: str | None) -> None:
        wait = self.throttle.locked(client) if client is not None else 0.0
        if wait > 0:
            raise Throttled(wait)

    def authenticate(self, authorization: str | None, allow_worker: bool = False,
                     client: str | None = None) -> Principal:
        """The caller named by an Authorization header value; AuthError if none/wrong,
        Throttled if `client` (the caller's address) is locked out or over its rate.

        allow_worker: accept a task's worker token (whatever auth.mode); the caller
        must then hold the request to that task (Principal.task)."""
        if not self.enabled:
            return ANONYMOUS_ADMIN
        if not authorization:
            raise AuthError("authentication required")
        self._refuse_if_locked(client)
        try:
            return self._check_credentials(authorization, allow_worker, client)
        except AuthError:
            if client is not None:
                self.throttle.failed(client)
            raise

    def _check_credentials(self, authorization: str, allow_worker: bool,
                           client: str | None) -> Principal:
        scheme, _, credentials = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and worker_tokens.is_worker_token(credentials.strip()):
            if not allow_worker:
                raise AuthError("a worker token is only for its task's worker endpoints")
            task_id = worker_tokens.task_of(self.worker_key, credentials.strip())
            if task_id is None:
                raise AuthError("invalid worker token")
            return Principal(f"worker:{task_id}", False, task_id)
        if scheme == "basic" and "basic" in self.mode:
            try:
                user, _, password = base64.b64decode(credentials.strip(), validate=True) \
                    .decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise AuthError("malformed Basic credentials") from None
            principal = self.check_password(user, password, client)
            if principal is None:
                raise AuthError("wrong user name or password")
            return principal
        if scheme == "bearer" and "bearer" in self.mode:
            return self._check_bearer(credentials.strip())
        raise AuthError(f"unsupported authorization scheme {scheme!r}")

    def _check_bearer(self, token: str) -> Principal:
        for known, user in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return self.principal_for(user)
        if self._oidc_enabled and token.count(".") == 2:
            return self._check_jwt(token)
        raise AuthError("invalid bearer token")

    def _check_jwt(self, token: str) -> Principal:
        import jwt

        try:
            key = self._signing_key(token)
            claims = jwt.decode(token, key=key, algorithms=self.oidc.algorithms,
                                audience=self.oidc.audience or None,
                                issuer=self.oidc.issuer or None,
                                options={"require": ["exp"],
                                         "verify_aud": bool(self.oidc.audience)})
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        user = claims.get(self.oidc.user_claim)
        if not isinstance(user, str) or not user:
            raise AuthError(f"token has no {self.oidc.user_claim!r} claim")
        return self.principal_for(user, claims)

    def _signing_key(self, token: str) -> Any:
        import jwt

        if self.oidc.jwks_url:
            if self._jwks_client is None:
                self._jwks_client = jwt.PyJWKClient(self.oidc.jwks_url, cache_keys=True)
            return self._jwks_client.get_signing_key_from_jwt(token).key
        if self._jwks_keys is None:
            data = json.loads(Path(self.oidc.jwks_file).read_text())
            self._jwks_keys = [jwt.PyJWK(k) for k in data.get("keys", [])]
        kid = jwt.get_unverified_header(token).get("kid")
        for key in self._jwks_keys:
            if kid is None or key.key_id == kid:
                return key.key
        raise jwt.InvalidKeyError(f"no key with kid {kid!r} in the JWKS file")

