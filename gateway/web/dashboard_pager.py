"""The dashboard task list's pager: where a page sits among the tasks matching the
filters, and its previous/next links, with nothing kept on the server.

The API's page tokens only go forward (tasks older than a sequence number), so a link
forward carries the tokens of the pages behind it in a "back" parameter, oldest first,
joined by "."; the previous link pops one. Deeper than MAX_TRAIL pages, the oldest are
dropped and "previous" ends on the first page early. Cost: the state counts the list
already reads give the total unless a name or tag filter is on (then one COUNT); a page
after the first costs one COUNT more, for its position.
"""

from __future__ import annotations

import re
from typing import Any

from flask import url_for

from funnel_hpc.gateway.store.tasks import BadRequest, ListQuery, TaskService, decode_page_token

MAX_TRAIL = 100
# tokens are unpadded URL-safe base64 (service.encode_page_token)
_TRAIL = re.compile(r"[A-Za-z0-9_-]{1,64}(?:\.[A-Za-z0-9_-]{1,64})*")


def parse_trail(text: str) -> list[str]:
    """The "back" parameter's page tokens, each one this server issued (else BadRequest,
    a 400 naming the field)."""
    if not text:
        return []
    if not _TRAIL.fullmatch(text):
        raise BadRequest("back: expected page tokens joined by '.'")
    tokens = text.split(".")[-MAX_TRAIL:]
    for token in tokens:
        decode_page_token(token)
    return tokens


def pager(service: TaskService, query: ListQuery, counts: dict[str, int], trail: list[str],
          shown: int, next_token: str | None, filters: dict[str, str]) -> dict[str, Any]:
    """{"total": tasks matching the filters, "first"/"last": this page's positions among
    them, "previous"/"next"/"first_page": links, None where there is none}."""
    if query.name_prefix is None and not query.tags:
        total = counts.get(query.state, 0) if query.state else sum(counts.values())
    else:
        total = service.count_matching(ListQuery(
            name_prefix=query.name_prefix, state=query.state, tags=query.tags,
            owner=query.owner))
    from_here = service.count_matching(query) if query.page_token else total
    first = max(1, total - from_here + 1)

    def link(token: str | None, back: list[str]) -> str:
        params: dict[str, Any] = {key: value for key, value in filters.items() if value}
        params.update(page_token=token, back=".".join(back[-MAX_TRAIL:]) or None)
        return url_for("dashboard.task_list", **params)

    previous = None
    if query.page_token:
        previous = link(trail[-1], trail[:-1]) if trail else link(None, [])
    after = [*trail, query.page_token] if query.page_token else []
    return {"total": total, "first": first if shown else 0, "last": first + shown - 1,
            "previous": previous, "next": link(next_token, after) if next_token else None,
            "first_page": link(None, []) if query.page_token else None}
