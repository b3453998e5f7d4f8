"""Per-task worker credentials, for when auth is on.

A worker started with ``--server`` reads its task, sends its events and asks whether
its task was canceled over HTTP. With auth on it presents a bearer token that names
its task and nothing else: ``fw1.<task id>.<HMAC-SHA256 of the id>``, keyed by
``<work_dir>/worker-token.key`` (32 random bytes, mode 600, made on first use and
shared by the server and a separate ``funnel reconcile`` on the same work dir).

The reconciler writes the token to ``<task dir>/worker.token`` (mode 600; with
``submit_as_owner`` it goes to the owner with the rest of the task dir). A worker
reads it from there, or from the environment variable FUNNEL_WORKER_TOKEN where
the task dir is not shared (AWS Batch). The server accepts such a token on the
task's own GET and event intake only (gateway/web/app.py), never on gRPC.
"""

from __future__ import annotations

import os
from pathlib import Path

# hashlib, hmac and secrets are imported where used: the worker imports this module to
# read its token, and these imports would cost every worker start.

PREFIX = "fw1"
KEY_FILE = "worker-token.key"
TOKEN_FILE = "worker.token"
ENV_VAR = "FUNNEL_WORKER_TOKEN"


def load_key(work_dir: str | Path) -> bytes:
    """The work dir's signing key, made (atomically, mode 600) if there is none."""
    import secrets

    path = Path(work_dir) / KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    try:
        os.link(tmp, path)  # the first writer wins; everyone reads its key
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()


def _mac(key: bytes, task_id: str) -> str:
    import hashlib
    import hmac

    return hmac.new(key, f"funnel-worker:{task_id}".encode(), hashlib.sha256).hexdigest()


def token_for(key: bytes, task_id: str) -> str:
    return f"{PREFIX}.{task_id}.{_mac(key, task_id)}"


def is_worker_token(token: str) -> bool:
    return token.startswith(PREFIX + ".")


def task_of(key: bytes, token: str) -> str | None:
    """The task a token was made for, or None if it was not made with this key."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1]:
        return None
    import hmac

    return parts[1] if hmac.compare_digest(parts[2], _mac(key, parts[1])) else None


def write_token(key: bytes, task_dir: Path, task_id: str) -> None:
    path = task_dir / TOKEN_FILE
    tmp = path.with_name(TOKEN_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token_for(key, task_id))
    os.replace(tmp, path)


def stored_token(task_dir: Path) -> str | None:
    """The token file in task_dir (written by the reconciler when auth is on): its text,
    or None if there is none."""
    try:
        return (Path(task_dir) / TOKEN_FILE).read_text().strip()
    except OSError:
        return None


def read_token(task_dir: Path | None) -> str | None:
    """A worker's token: its task dir's file, else FUNNEL_WORKER_TOKEN, else None."""
    if task_dir is not None:
        token = stored_token(task_dir)
        if token is not None:
            return token or None
    return os.environ.get(ENV_VAR) or None
