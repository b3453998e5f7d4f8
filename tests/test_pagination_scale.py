"""Listing 100,000 stored tasks page by page visits each exactly once."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from sqlalchemy import insert

from funnel_hpc.gateway.store import db
from funnel_hpc.gateway.store.tasks import new_task_id, now_rfc3339
from tests.server_helpers import ServerProcess

N = 100_000
SPEC = {"name": "bulk", "executors": [{"image": "busybox", "command": ["true"]}]}


def bulk_insert(url: str, n: int) -> set[str]:
    engine = db.make_engine(url)
    db.upgrade(engine)
    ids = [new_task_id() for _ in range(n)]
    now = now_rfc3339()
    rows: list[dict[str, Any]] = [
        {"id": i, "state": "QUEUED", "name": "bulk", "owner": None, "creation_time": now,
         "spec": SPEC, "logs": [], "backend": "local", "job_id": None, "attempt": 0,
         "event_seq": 0, "updated_at": now} for i in ids]
    with db.writing(engine) as conn:
        for start in range(0, n, 10_000):
            conn.execute(insert(db.tasks), rows[start:start + 10_000])
    engine.dispose()
    return set(ids)


@pytest.mark.slow
@pytest.mark.parametrize("view,page_size", [("MINIMAL", 2047), ("BASIC", 1000)])
def test_every_task_listed_exactly_once(db_kind, databases, tmp_path, view, page_size):
    url = databases.new(db_kind)
    expected = bulk_insert(url, N)
    server = ServerProcess(tmp_path / "server", url).start()
    try:
        seen: list[str] = []
        token, pages = None, 0
        while True:
            params = {"view": view, "page_size": page_size}
            if token:
                params["page_token"] = token
            resp = requests.get(server.api + "/tasks", params=params, timeout=60)
            assert resp.status_code == 200, resp.text
            page = resp.json()
            pages += 1
            seen += [t["id"] for t in page["tasks"]]
            token = page.get("next_page_token")
            if not token:
                break
        assert len(seen) == N
        assert set(seen) == expected
        assert pages == -(-N // page_size)
        if view == "BASIC":
            assert json.loads(json.dumps(page["tasks"][0]))["executors"] == SPEC["executors"]
    finally:
        server.stop()
