"""Several backend instances in one gateway (issue #28): real Slurm (two partitions as two
instances), real Grid Engine and the local backend driven at once by one real server with
auth on, each task on the instance its tag routes it to; an instance whose login node
hangs stalls nobody else, and shows in its health row, its metrics and /readyz."""

from __future__ import annotations

import pytest
import requests

from tests.components import (
    BWRAP,
    BWRAP_REASON,
    GRIDENGINE,
    GRIDENGINE_REASON,
    SLURM,
    SLURM_REASON,
    bwrap_ready,
    gridengine_ready,
    need,
    slurm_answers,
)
from tests.instances_helpers import (
    USER,
    SilentListener,
    gateway,
    get_task,
    metric,
    rule,
    slurm_partition,
    submit,
    wait_done,
    wait_until,
    worker_starts,
)

pytestmark = [pytest.mark.slurm, pytest.mark.gridengine]

BACKENDS = {"cpu": {"kind": "slurm", "partition": "debug"},
            "bench": {"kind": "slurm", "partition": "bench"},
            "ge": {"kind": "gridengine", "mode": "cli"},
            "here": {"kind": "local", "max_concurrent": 2}}
ROUTING = [rule("cpu", "cpu"), rule("bench", "bench"), rule("ge", "ge"), {"backend": "here"}]


@pytest.fixture
def components() -> None:
    need(BWRAP, bwrap_ready(), BWRAP_REASON)
    need(SLURM, slurm_answers(), SLURM_REASON)
    need(GRIDENGINE, gridengine_ready(), GRIDENGINE_REASON)


def test_slurm_two_partitions_gridengine_and_local_in_one_gateway(components, databases,
                                                                    tmp_path):
    server = gateway(tmp_path / "srv", databases.new("sqlite"), BACKENDS, ROUTING).start()
    names = list(BACKENDS)
    try:
        tasks = {site: submit(server, site, f"echo ran-on-{site}", names, site)
                 for site in ("cpu", "bench", "ge", "here")}
        for site, task_id in tasks.items():
            task = wait_done(server, task_id)
            assert task["state"] == "COMPLETE", (site, task)
            assert task["logs"][-1]["logs"][0]["stdout"] == f"ran-on-{site}\n"
            metadata = task["logs"][-1]["metadata"]
            assert metadata["backend"] == site
            assert worker_starts(server.work_dir, task_id) == 1
        # each Slurm job went to its instance's partition
        assert slurm_partition(get_task(server, tasks["cpu"])["logs"][-1]["metadata"]
                               ["job_id"]) == "debug"
        assert slurm_partition(get_task(server, tasks["bench"])["logs"][-1]["metadata"]
                               ["job_id"]) == "bench"
        # every instance has its own lease holder, tick and poll: /readyz is ready, the
        # health metrics are labelled by instance
        for name in names:
            wait_until(lambda name=name: metric(server, "funnel_backend_last_poll_age_seconds",
                                                backend=name) not in (None, -1),
                       60, f"a poll of {name} in /metrics", server)
        ready = requests.get(server.url + "/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        assert "reconciler started: backend=ge" in server.log()
    finally:
        server.stop()


def test_a_hanging_instance_stalls_no_other(components, databases, tmp_path):
    """`stuck` is a Slurm instance whose login node accepts SSH connections and never
    answers: each of its commands waits out the SSH banner timeout. Tasks on the other
    instances complete meanwhile; `stuck` shows failing in its health row, its metrics
    and /readyz."""
    listener = SilentListener()
    backends = {**BACKENDS, "stuck": {"kind": "slurm", "command_timeout": 5,
                                      "ssh": {"host": "127.0.0.1", "port": listener.port}}}
    routing = [rule("stuck", "stuck"), *ROUTING]
    server = gateway(tmp_path / "srv", databases.new("sqlite"), backends, routing).start()
    names = list(backends)
    try:
        stuck = submit(server, "stuck", "echo never", names, "stuck")
        # the stuck instance is hanging in its submission now
        wait_until(lambda: "submission of task" in server.log(), 120,
                   "the stuck instance's first deferred submission", server)
        others = {site: submit(server, site, f"echo {site}", names, site)
                  for site in ("cpu", "ge", "here")}
        for site, task_id in others.items():
            assert wait_done(server, task_id)["state"] == "COMPLETE", site
        assert get_task(server, stuck)["state"] == "QUEUED"
        # its health row, its metrics, /readyz name it
        wait_until(lambda: (metric(server, "funnel_backend_failing_seconds", backend="stuck")
                            or 0) > 0, 120, "stuck failing in its health row", server)
        assert metric(server, "funnel_backend_failing_seconds", backend="cpu") == 0
        errors = metric(server, "funnel_scheduler_errors_total", backend="stuck",
                        command="submit")
        assert errors is not None and errors >= 1
        ready = requests.get(server.url + "/readyz", timeout=10).json()
        assert ready["checks"]["backend"] == "failing", ready
        panel = requests.get(server.url + "/metrics", auth=USER, timeout=10).text
        assert 'funnel_backend_poll_errors_total{backend="stuck"}' in panel \
            or 'funnel_backend_poll_errors{backend="stuck"}' in panel
    finally:
        server.stop()
        listener.close()
