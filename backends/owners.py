"""Who a job may run as with ``backend.slurm.submit_as_owner``: the owner policy.

An owner is an authenticated user name taken as a local account. The policy refuses a
name that is not a plain Unix user name, one with no account (``getpwnam``), uid 0, a
uid outside ``owner_min_uid``..``owner_max_uid`` (defaults: ``UID_MIN`` and ``UID_MAX``
of /etc/login.defs, else 1000 and 60000, the range useradd gives people: system accounts
stay out, ``postgres`` and ``_apt`` below it, Debian's fixed ``slurm`` (64030) and
``nobody`` (65534) above it) and, when ``owner_group`` is set, an account outside that
group (primary or supplementary).
The gateway asks at POST (HTTP 403, gRPC PERMISSION_DENIED: gateway/store/admission.py) and
the Slurm backend again before each ``sudo`` (the account may have changed meanwhile).
Cost: one or two password/group database lookups.
"""

from __future__ import annotations

import grp
import pwd
import re
from dataclasses import dataclass
from pathlib import Path

from funnel_hpc.core.config import SlurmOptions

UNIX_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
LOGIN_DEFS = Path("/etc/login.defs")
FALLBACK_UIDS = {"UID_MIN": 1000, "UID_MAX": 60000}  # Debian's, RHEL's and SUSE's
_LOGIN_DEFS_LINE = re.compile(r"\s*(UID_MIN|UID_MAX)\s+([0-9]+)\s*(#.*)?")
MIN_UID_KEY = "backend.slurm.owner_min_uid"
MAX_UID_KEY = "backend.slurm.owner_max_uid"
GROUP_KEY = "backend.slurm.owner_group"


class OwnerRefused(ValueError):
    """A task owner jobs may not run as; the message names the rule."""


def login_defs_uids(path: Path = LOGIN_DEFS) -> dict[str, int]:
    """UID_MIN and UID_MAX of login.defs (the uids useradd gives people), each else
    1000 and 60000."""
    found = dict(FALLBACK_UIDS)
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return found
    for line in text.splitlines():
        match = _LOGIN_DEFS_LINE.fullmatch(line)
        if match:
            found[match.group(1)] = int(match.group(2))
    return found


def _uid_option(raw: int | None, key: str, default: int) -> int:
    if raw is None:
        return default
    if raw >= 1:
        return raw
    raise ValueError(f"{key}: must be a uid of 1 or more (or null: from {LOGIN_DEFS}), "
                     f"got {raw!r}")


@dataclass(frozen=True)
class OwnerPolicy:
    """The accounts jobs may run as: min_uid <= uid <= max_uid (never 0), in group when set."""

    min_uid: int
    max_uid: int
    group: str = ""

    @classmethod
    def from_options(cls, options: SlurmOptions) -> OwnerPolicy:
        """The policy of a backend's options (`owner_min_uid`, `owner_max_uid`,
        `owner_group`); ValueError naming the key when one is wrong."""
        defaults = login_defs_uids()
        min_uid = _uid_option(options.owner_min_uid, MIN_UID_KEY, defaults["UID_MIN"])
        max_uid = _uid_option(options.owner_max_uid, MAX_UID_KEY, defaults["UID_MAX"])
        if max_uid < min_uid:
            raise ValueError(f"{MAX_UID_KEY} ({max_uid}) is below {MIN_UID_KEY} ({min_uid})")
        group = options.owner_group
        if group:
            try:
                grp.getgrnam(group)
            except KeyError:
                raise ValueError(f"{GROUP_KEY}: no such group {group!r}") from None
        return cls(min_uid, max_uid, group)

    def account(self, owner: str | None) -> pwd.struct_passwd:
        """The owner's password entry, or OwnerRefused naming the rule it breaks."""
        if owner is None:
            raise OwnerRefused("backend.slurm.submit_as_owner needs an authenticated user "
                               "(auth.mode is none, or the task has no owner)")
        if not UNIX_USER.fullmatch(owner):
            raise OwnerRefused(f"owner {owner!r}: not a Unix user name "
                               f"({UNIX_USER.pattern}; backend.slurm.submit_as_owner)")
        try:
            account = pwd.getpwnam(owner)
        except KeyError:
            raise OwnerRefused(f"owner {owner}: no local account of that name "
                               "(backend.slurm.submit_as_owner)") from None
        if account.pw_uid == 0 or account.pw_uid < self.min_uid:
            raise OwnerRefused(f"owner {owner}: uid {account.pw_uid} is below "
                               f"{MIN_UID_KEY} ({self.min_uid})")
        if account.pw_uid > self.max_uid:
            raise OwnerRefused(f"owner {owner}: uid {account.pw_uid} is above "
                               f"{MAX_UID_KEY} ({self.max_uid})")
        if self.group and not self._in_group(account):
            raise OwnerRefused(f"owner {owner}: not in group {self.group} ({GROUP_KEY})")
        return account

    def _in_group(self, account: pwd.struct_passwd) -> bool:
        try:
            group = grp.getgrnam(self.group)
        except KeyError:  # removed since start: nobody is in it
            return False
        return account.pw_gid == group.gr_gid or account.pw_name in group.gr_mem
