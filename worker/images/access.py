"""Who may use which registry credentials, and so which cached images.

A registry's settings in `worker.registries` may name `users` and `groups`: its username and
password are then used only for tasks whose owner is one of those users or belongs (in this
node's password and group databases) to one of those groups; without either key every owner
uses them (None, auth off, included). Everything the cache holds was fetched under a scope:
PUBLIC when no credentials were sent, else "<registry>|<username>" of the credentials sent.
An owner may take from the cache only what was fetched under PUBLIC or a scope whose
credentials it may use (cache.py); anything else is fetched again from the registry the
task names, with the owner's rights, which proves that the owner may have it.
Cost: nothing for settings without users/groups; else one getpwnam and getgrouplist.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not typing's: importing typing costs every worker start
if TYPE_CHECKING:
    from collections.abc import Mapping

    from . import Json

PUBLIC = "public"
CREDENTIALS = ("username", "password")


class Access:
    """What one owner gets: the registries' settings as it may use them, and its scopes."""

    __slots__ = ("owner", "registries", "scopes")

    def __init__(self, owner: str | None, registries: dict[str, Json],
                 scopes: frozenset[str]) -> None:
        self.owner = owner
        self.registries = registries  # without the credentials the owner may not use
        self.scopes = scopes          # PUBLIC and the scopes of the credentials it may use


def for_owner(registries: Mapping[str, object], owner: str | None) -> Access:
    """The registries' settings as `owner` may use them (ValueError: bad users/groups)."""
    usable: dict[str, Json] = {}
    scopes = {PUBLIC}
    for host, settings in registries.items():
        if not isinstance(settings, dict):
            raise ValueError(f"worker.registries[{host!r}] must be a mapping")
        if may_use(host, settings, owner):
            usable[host] = settings
            if settings.get("username") is not None:
                scopes.add(scope_of(host, settings))
        else:
            usable[host] = {key: value for key, value in settings.items()
                            if key not in CREDENTIALS}
    return Access(owner, usable, frozenset(scopes))


def scope_of(host: str, settings: Json) -> str:
    """The scope of what was fetched with this registry entry's credentials."""
    return f"{host}|{settings.get('username')}"


def restricted(settings: Json) -> bool:
    """Do this registry's settings name who may use its credentials?"""
    return "users" in settings or "groups" in settings


def may_use(host: str, settings: Json, owner: str | None) -> bool:
    """May `owner`'s tasks use this registry entry's credentials?"""
    if not restricted(settings):
        return True
    users, groups = (_names(host, settings, key) for key in ("users", "groups"))
    if not owner:
        return False
    return owner in users or bool(groups & _groups_of(owner))


def _names(host: str, settings: Json, key: str) -> frozenset[str]:
    names = settings.get(key)
    if names is None:
        return frozenset()
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"worker.registries[{host!r}].{key} must be a list of names")
    return frozenset(names)


_GROUPS: dict[str, frozenset[str]] = {}  # owner -> group names, once per process


def _groups_of(owner: str) -> frozenset[str]:
    """The names of the groups of `owner`'s local account (none without an account)."""
    if owner not in _GROUPS:
        import grp
        import pwd
        try:
            account = pwd.getpwnam(owner)
            gids = os.getgrouplist(account.pw_name, account.pw_gid)
        except (KeyError, ValueError, OSError):  # no such account, or a NUL in the name
            gids = []
        names = set()
        for gid in gids:
            try:
                names.add(grp.getgrgid(gid).gr_name)
            except KeyError:
                pass  # a gid without a name
        _GROUPS[owner] = frozenset(names)
    return _GROUPS[owner]
