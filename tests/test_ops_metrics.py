"""The admin guide's alerts, scraped from real processes in both layouts the guide
installs: one `funnel server run`, and `server run --no-reconciler` + `funnel reconcile`
(reconciler.listen). A scheduler that refuses every submission (an sbatch on PATH that
says slurmctld is unreachable) must make `funnel_scheduler_errors_total` move where
Prometheus scrapes it, and every replica's /metrics must say who holds the lease."""

from __future__ import annotations

import requests

from tests.ops_helpers import ReconcileProcess, failing_sbatch, scrape
from tests.server_helpers import ServerProcess, free_port
from tests.waiting import wait_for

TASK = {"name": "ops-metrics", "executors": [{"image": "busybox", "command": ["true"]}]}
SUBMIT_ERRORS = ("funnel_scheduler_errors_total", (("backend", "slurm"), ("command", "submit")))
LEASE_HELD = ("funnel_reconciler_lease_held", (("backend", "slurm"),))


def errors_moving(url: str, detail) -> None:
    """funnel_scheduler_errors_total{command="submit"} is there and grows."""
    first = wait_for(lambda: scrape(url).get(SUBMIT_ERRORS), 60,
                     "a submit error in " + url, detail=detail)
    wait_for(lambda: scrape(url).get(SUBMIT_ERRORS, 0) > first, 60,
             "the submit error count to grow", detail=detail)


def test_split_layout_reconciler_serves_its_metrics(databases, tmp_path, monkeypatch):
    listen = free_port()
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite"), overrides={
        "backend": {"name": "slurm"},
        "reconciler": {"interval_seconds": 1, "listen": f"127.0.0.1:{listen}"}}).start()
    reconcile = ReconcileProcess(server, path=failing_sbatch(tmp_path / "bin"), port=listen)
    try:
        # no reconciler yet: the server says so, and is not ready
        assert scrape(server.url)[LEASE_HELD] == 0
        down = requests.get(server.url + "/readyz", timeout=10)
        assert down.status_code == 503 and down.headers["Retry-After"] == "5"
        assert down.json()["checks"]["reconciler"] == "none"

        reconcile.start()
        assert requests.post(server.api + "/tasks", json=TASK, timeout=10).status_code == 200
        errors_moving(reconcile.url, reconcile.log)
        # the server's own scrape: the lease (read from the database), not the counters
        metrics = scrape(server.url)
        assert metrics[LEASE_HELD] == 1
        assert SUBMIT_ERRORS not in metrics
        wait_for(lambda: requests.get(server.url + "/readyz", timeout=10).status_code == 200,
                 30, "the server's /readyz 200")
        # the reconciler's /readyz: its scheduler fails
        failing = requests.get(reconcile.url + "/readyz", timeout=10)
        assert failing.status_code == 503 and failing.json()["checks"]["backend"] == "failing"
        assert failing.json()["checks"]["reconciler"] == "ok"
        assert failing.headers["Retry-After"] == "5"

        reconcile.stop()
        wait_for(lambda: scrape(server.url)[LEASE_HELD] == 0, 30, "the lease to be free")
        wait_for(lambda: requests.get(server.url + "/readyz", timeout=10).status_code == 503,
                 30, "the server's /readyz 503")
    finally:
        reconcile.stop()
        server.stop()


def test_one_process_layout_serves_every_metric(databases, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", failing_sbatch(tmp_path / "bin"))
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite"), reconcile=True,
                           overrides={"backend": {"name": "slurm"},
                                      "reconciler": {"interval_seconds": 1}}).start()
    try:
        assert requests.post(server.api + "/tasks", json=TASK, timeout=10).status_code == 200
        errors_moving(server.url, server.log)
        metrics = scrape(server.url)
        assert metrics[LEASE_HELD] == 1
        assert metrics[("funnel_reconciler_tick_seconds_count", ())] > 0
    finally:
        server.stop()
