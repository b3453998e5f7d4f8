"""A task cannot reach the gateway's slurmrestd (backend.slurm.mode: rest) from inside its
sandbox, whatever the driver: attacked for real by a root worker's executor that looks for
scripts/setup/35-slurmrestd.sh's socket and tries to connect to it. Were it reachable, the
task could submit and cancel jobs as the gateway's account."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.slurm_rest_helpers import SOCKET
from tests.worker.conftest import need, need_registry

pytestmark = [pytest.mark.registry,
              pytest.mark.skipif(os.geteuid() != 0, reason="runs the worker as root")]

TESTIMAGE = "127.0.0.1:5055/funnel/testimage:1"  # busybox-like (scripts/setup/45-registry.sh)
ENGINES = {"bwrap": "bwrap", "proot": "proot", "charliecloud": "ch-run"}
# the executor looks for the socket and its directory (the image's busybox cannot connect
# to a unix socket: finding it is the test; rest_auth/local would then refuse any uid but
# slurmrestd's, tests/backends/test_slurm_rest.py)
PROBE = f"""
ls -la {Path(SOCKET).parent}/ 2>&1; echo "ls=$?"
if [ -e {SOCKET} ]; then echo SOCKET-VISIBLE; fi
"""


@pytest.mark.parametrize("driver", sorted(ENGINES))
def test_an_executor_cannot_reach_slurmrestds_socket(harness, driver):
    need(ENGINES[driver])
    need_registry()
    assert Path(SOCKET).is_socket(), "scripts/setup/35-slurmrestd.sh starts slurmrestd"
    run = harness.run(harness.task(executors=[{"image": TESTIMAGE,
                                               "command": ["sh", "-c", PROBE]}]),
                      harness.config(container_driver=driver), timeout=300)
    logs = run.fold.task_log["logs"]
    assert run.state == "COMPLETE", (run.system_logs, run.stderr, logs)
    out = logs[0]["stdout"]
    # (bwrap's uid 0 is its user namespace's: the host sees the sandbox user)
    assert "No such file or directory" in out and "ls=1" in out, out
    assert "SOCKET-VISIBLE" not in out, out
