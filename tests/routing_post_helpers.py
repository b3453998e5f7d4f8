"""Helpers of the routing-at-POST tests (tests/test_routing_post.py): a server of several
local-kind backend instances with routing rules, its users, and reading what POST stored."""

from __future__ import annotations

import base64
from typing import Any

import requests
from sqlalchemy import create_engine, func, select

from funnel_hpc.gateway.store import db

PASSWORD = "pw"
ROUTE_TAG = "funnel-hpc.backend"
TASK: dict[str, Any] = {"executors": [{"image": "busybox", "command": ["true"]}]}


def routing_overrides(alice: str, group: str, users: dict[str, str]) -> dict[str, Any]:
    """Four local-kind instances and tag rules; `solo` is alice's, `third` the group's.
    (No rule matches every task: an untagged task is unroutable.)"""
    return {
        "auth": {"mode": "basic", "users": users},
        "backends": {
            "here": {"kind": "local"},
            "other": {"kind": "local", "max_concurrent": 1,
                      "backend_parameters": {"queue": "queue"}},
            "third": {"kind": "local"},
            "solo": {"kind": "local"},
        },
        "routing": [
            {"when": {"tags": {"site": "other"}}, "backend": "other"},
            {"when": {"tags": {"site": "here"}}, "backend": "here"},
            {"when": {"tags": {"lane": "gpu"}, "group": group}, "backend": "third"},
            {"when": {"tags": {"lane": "solo"}, "owner": [alice]}, "backend": "solo"},
        ],
    }


def post(server, user: str, task: dict) -> requests.Response:
    return requests.post(f"{server.api}/tasks", json=task, auth=(user, PASSWORD), timeout=30)


def created(server, user: str, task: dict) -> str:
    resp = post(server, user, task)
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def full(server, user: str, task_id: str) -> dict:
    resp = requests.get(f"{server.api}/tasks/{task_id}", params={"view": "FULL"},
                        auth=(user, PASSWORD), timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def stored(server, task_id: str) -> Any:
    """The task's row as POST stored it (the backend column holds its instance)."""
    engine = create_engine(server.db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(db.tasks).where(db.tasks.c.id == task_id)).one()
    finally:
        engine.dispose()


def row_count(server) -> int:
    engine = create_engine(server.db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(db.tasks)).scalar_one()
    finally:
        engine.dispose()


def basic_metadata(user: str) -> tuple[tuple[str, str], ...]:
    token = base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()
    return (("authorization", f"Basic {token}"),)
