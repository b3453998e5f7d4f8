"""Live logs through the real server on the local backend (issue 18.1): a running task's
stdout shows in the FULL view and the dashboard while the executor still runs, and
`funnel task logs --follow` prints every line once and ends with the task.

Each task prints, then waits for a file the test writes into its volume, so nothing here
depends on how fast the machine is: the test waits for conditions, with generous limits.
"""

from __future__ import annotations

import subprocess

import pytest
import requests

from tests.live_logs_helpers import (
    TERMINAL,
    WAIT_FOR_GO,
    create,
    follow_five_lines,
    grpc_stdout,
    live_logs_server,
    release,
    running_stdout,
)
from tests.server_helpers import clean_env, funnel_argv
from tests.waiting import wait_for, wait_for_state


@pytest.fixture(scope="module")
def server(databases, tmp_path_factory):
    srv = live_logs_server(tmp_path_factory.mktemp("live-logs"), databases.new("sqlite"),
                           {"name": "local", "local": {"max_concurrent": 2}}, 0.5)
    yield srv
    srv.stop()


def test_a_running_task_shows_its_line_before_it_ends(server):
    task_id = create(server, f"echo first line; {WAIT_FOR_GO}; echo done")
    try:
        # log_update_seconds + the reconciler's tick + a busy machine: generous, and
        # the task cannot end before the test releases it
        wait_for(lambda: running_stdout(server, task_id) == "first line\n", 60,
                 "the first line in the FULL view", detail=lambda: server.log()[-2000:])
        task = requests.get(f"{server.api}/tasks/{task_id}", params={"view": "FULL"},
                            timeout=10).json()
        assert task["state"] == "RUNNING"
        # the fragment the dashboard's task page swaps in every 2 s
        page = requests.get(f"{server.url}/tasks/{task_id}", params={"fragment": 1},
                            timeout=10)
        assert page.status_code == 200
        assert "first line" in page.text and 'class="running"' in page.text, page.text
        assert grpc_stdout(server, task_id) == "first line\n"  # the same fold, over gRPC
    finally:
        release(server, task_id)
    done = wait_for_state(server.api, task_id, TERMINAL, 90)
    assert done["state"] == "COMPLETE"
    assert done["logs"][0]["logs"][0]["stdout"] == "first line\ndone\n"


def test_task_logs_follow_prints_each_line_once_and_ends_with_the_task(server):
    task_id = follow_five_lines(server, 60, 120)
    stderr = subprocess.run(funnel_argv("task", "logs", task_id, "--stderr", "--server",
                                        server.url), env=clean_env(), capture_output=True,
                            text=True, timeout=60)
    assert stderr.returncode == 0 and stderr.stdout == "oops\n", stderr.stderr


def test_follower_prints_only_what_each_tail_adds(capsys):
    from funnel_hpc.gateway.cli.task import LogFollower

    follower = LogFollower("stdout")
    for tail in ["a\n", "a\nb\n", "a\nb\n", "b\nc\n", "c\nc\n"]:  # a window sliding on
        follower.show({"logs": [{"logs": [{"stdout": tail}]}]})
    # a second attempt runs its executors again: printed, not taken for old text
    follower.show({"logs": [{}, {"logs": [{"stdout": "a\n"}]}]})
    assert capsys.readouterr().out == "a\nb\nc\nc\na\n"
