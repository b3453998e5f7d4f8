"""Tokens slurmctld mints for the owners of jobs: REST mode with submit_as_owner.

With ``rest_auth/jwt`` slurmrestd acts for whoever a request's token names. A gateway
that submits each task as its owner asks slurmctld for a short-lived token of that owner
(``scontrol token username=OWNER lifespan=SECONDS``, which only root and SlurmUser may
ask for), keeps it in memory (never on disk) and asks again once half its life is gone.
The gateway's own requests (the jobs list, cancel, withdraw) keep the token of
``rest.token_file``.

    tokens = OwnerTokens(runner)
    tokens.token("alice")   # one scontrol the first time, then from memory
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

from funnel_hpc.backends.base import BackendError
from funnel_hpc.backends.commands import Runner
from funnel_hpc.backends.owners import UNIX_USER
from funnel_hpc.backends.slurm_rest_http import TOKEN_LINE

LIFESPAN = 1800  # seconds a minted token is valid; renewed after half of it
TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")  # a compact JWS


class OwnerTokens:
    """Each owner's token, minted by ``scontrol token`` and kept for half its life."""

    def __init__(self, runner: Runner, lifespan: int = LIFESPAN,
                 clock: Callable[[], float] = time.monotonic):
        self.runner = runner
        self.lifespan = lifespan
        self.clock = clock
        self._tokens: dict[str, tuple[float, str]] = {}  # user: (renew after, token)
        self._lock = threading.Lock()

    def token(self, user: str) -> str:
        """The user's token. BackendError when slurmctld gives none: transient (the
        gateway's rights or slurmctld, never the task's fault: its submission waits)."""
        if not UNIX_USER.fullmatch(user):
            raise BackendError(f"not a user name for a Slurm token: {user[:40]!r}")
        with self._lock:
            kept = self._tokens.get(user)
            if kept is not None and self.clock() < kept[0]:
                return kept[1]
            token = self._mint(user)
            self._tokens[user] = (self.clock() + self.lifespan / 2, token)
            return token

    def forget(self, user: str) -> None:
        """Drop the user's token (slurmrestd refused it): the next call mints another."""
        with self._lock:
            self._tokens.pop(user, None)

    def _mint(self, user: str) -> str:
        result = self.runner.run(["scontrol", "token", f"username={user}",
                                  f"lifespan={self.lifespan}"])
        token = result.stdout.strip().removeprefix(TOKEN_LINE)
        if result.returncode != 0 or not TOKEN.fullmatch(token):
            said = ("it printed no token" if result.returncode == 0 else
                    (result.stderr or result.stdout).strip()[:300] or f"exit {result.returncode}")
            raise BackendError(f"scontrol token for {user!r} failed: {said} (submit_as_owner "
                               "in REST mode: the gateway runs as root or SlurmUser, and "
                               "slurmctld has AuthAltTypes=auth/jwt)", transient=True)
        return token
