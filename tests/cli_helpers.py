"""The real `funnel` CLI as a subprocess, for the CLI tests."""

from __future__ import annotations

import json
import subprocess

from tests.server_helpers import clean_env, funnel_argv

TASK = {"name": "ops", "executors": [{"image": "busybox", "command": ["echo", "hi"]}]}


def funnel(server, *args, stdin=None, cwd=None, timeout=60):
    env = clean_env(FUNNEL_SERVER=server.url) if server else clean_env()
    return subprocess.run(funnel_argv(*args), input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=cwd)


def create(server, **fields) -> str:
    done = funnel(server, "task", "create", "-", stdin=json.dumps({**TASK, **fields}))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
