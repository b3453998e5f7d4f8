"""/metrics, /healthz, /readyz and the logging section, through real servers; the
recording API (the reconciler's hooks) in this process."""

from __future__ import annotations

import json
import logging

import pytest
import requests
from prometheus_client import generate_latest

from funnel_hpc.core import config as config_mod
from funnel_hpc.gateway.ops import logs
from funnel_hpc.gateway.ops import metrics as ops_metrics
from tests.components import (
    BWRAP,
    BWRAP_REASON,
    POSTGRES,
    POSTGRES_BINARIES_REASON,
    SLURM,
    SLURM_REASON,
    bwrap_ready,
    needs,
    slurm_ready,
)
from tests.e2e_helpers import make_server, sh
from tests.events_helpers import WebhookReceiver
from tests.metrics_helpers import samples
from tests.postgres_helpers import PrivatePostgres, available
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for, wait_for_state

TASK = {"name": "metrics-task", "executors": [{"image": "busybox", "command": ["true"]}]}


def scrape(server) -> dict[tuple[str, tuple], float]:
    resp = requests.get(server.url + "/metrics", timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    return samples(resp.text)


def tasks_in(metrics: dict, state: str) -> float:
    return metrics[("funnel_tasks", (("state", state),))]


def test_task_gauges_match_the_database(databases, tmp_path):
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite")).start()
    try:
        ids = [requests.post(server.api + "/tasks", json=TASK, timeout=10).json()["id"]
               for _ in range(5)]
        for task_id in ids[:2]:
            assert requests.post(f"{server.api}/tasks/{task_id}:cancel", timeout=10).ok
        metrics = scrape(server)
        assert tasks_in(metrics, "QUEUED") == 3 and tasks_in(metrics, "CANCELED") == 2
        assert tasks_in(metrics, "RUNNING") == 0  # every state is there, zeros too
        assert metrics[("funnel_submissions_waiting", ())] == 3
        assert metrics[("funnel_oldest_queued_task_age_seconds", ())] >= 0
        assert metrics[("funnel_database_up", ())] == 1
    finally:
        server.stop()


def sink_figures(metrics: dict, sink: str) -> dict[str, float]:
    """A sink's lag figures in a scrape (KeyError: the sink is not shown)."""
    label = (("sink", sink),)
    return {"pending": metrics[("funnel_event_sink_pending", label)],
            "age": metrics[("funnel_event_sink_oldest_pending_age_seconds", label)],
            "delivered": metrics[("funnel_event_sink_delivered_total", label)],
            "failures": metrics[("funnel_event_sink_failures_total", label)],
            "latencies": metrics[("funnel_event_delivery_seconds_count", label)],
            "latency_sum": metrics[("funnel_event_delivery_seconds_sum", label)]}


def test_sink_lag_while_the_webhook_is_down_then_caught_up(databases, tmp_path):
    secret, tasks = "lag-secret", 4
    receiver = WebhookReceiver(secret).start()
    receiver.stop()  # its port is known; connections are refused until start()
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite"), overrides={
        "events": {"poll_seconds": 0.05, "retry_min_seconds": 0.05, "retry_max_seconds": 0.2,
                   "webhooks": [{"name": "hook", "url": receiver.url, "secret": secret}]}})
    server.start()
    try:
        for _ in range(tasks):  # one event each (QUEUED): no reconciler runs
            assert requests.post(server.api + "/tasks", json=TASK, timeout=10).ok

        def stuck() -> dict | None:
            lag = sink_figures(scrape(server), "webhook:hook")
            return lag if lag["pending"] == tasks and lag["failures"] >= 2 else None

        lag = wait_for(stuck, 30, "the events held while the hook refuses connections")
        assert lag["age"] > 0 and lag["delivered"] == 0 and lag["latencies"] == 0
        receiver.start()

        def caught_up() -> dict | None:
            lag = sink_figures(scrape(server), "webhook:hook")
            return lag if lag["pending"] == 0 and lag["delivered"] == tasks else None

        lag = wait_for(caught_up, 30, "the hook to get every event", detail=server.log)
        assert lag["age"] == 0
        # every delivery measured, each at least as long as the outage it waited through
        assert lag["latencies"] == tasks and lag["latency_sum"] > 0
        assert len(receiver.received()) == tasks
    finally:
        server.stop()
        if receiver.server is not None:
            receiver.stop()


@needs(BWRAP, bwrap_ready(), BWRAP_REASON)
@pytest.mark.parametrize("backend", ["local", pytest.param("slurm", marks=[
    pytest.mark.slurm, needs(SLURM, slurm_ready(), SLURM_REASON)])])
def test_metrics_after_a_known_workload(backend, databases, tmp_path):
    server = make_server(backend, tmp_path / "srv", databases.new("sqlite")).start()
    try:
        workload = [[sh("true")], [sh("true")], [sh("exit 3")]]
        ids = [requests.post(server.api + "/tasks", json={"executors": executors},
                             timeout=10).json()["id"] for executors in workload]
        for task_id in ids:
            wait_for_state(server.api, task_id, {"COMPLETE", "EXECUTOR_ERROR"}, timeout=120,
                           detail=server.log)
        metrics = scrape(server)
        assert tasks_in(metrics, "COMPLETE") == 2 and tasks_in(metrics, "EXECUTOR_ERROR") == 1
        assert tasks_in(metrics, "QUEUED") == 0 and tasks_in(metrics, "RUNNING") == 0
        assert metrics[("funnel_submissions_waiting", ())] == 0
        assert metrics[("funnel_oldest_queued_task_age_seconds", ())] == 0
        # recorded by the reconciler in the server process
        finished = {state: metrics.get(("funnel_tasks_finished_total", (("state", state),)), 0)
                    for state in ("COMPLETE", "EXECUTOR_ERROR", "SYSTEM_ERROR")}
        assert finished == {"COMPLETE": 2, "EXECUTOR_ERROR": 1, "SYSTEM_ERROR": 0}
        assert metrics[("funnel_task_run_seconds_count", ())] == 3
        assert metrics[("funnel_reconciler_tick_seconds_count", ())] > 0
        calls = (("backend", backend), ("command", "submit"))
        # one call per scheduler job: Slurm sends the tasks of one tick as one array
        jobs = {requests.get(f"{server.api}/tasks/{task_id}", params={"view": "FULL"},
                             timeout=10).json()["logs"][-1]["metadata"]["job_id"].split("_")[0]
                for task_id in ids}
        assert metrics[("funnel_scheduler_calls_total", calls)] == len(jobs)
        assert len(jobs) == 3 if backend == "local" else 1 <= len(jobs) <= 3
        assert metrics.get(("funnel_scheduler_errors_total", calls), 0) == 0
    finally:
        server.stop()


def test_health_endpoints_need_no_credentials_and_name_nobody(databases, tmp_path):
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite"), overrides={
        "auth": {"mode": "bearer", "tokens": {"tok-alice-123": "alice"}},
        "server": {"readyz_needs_reconciler": False}}).start()  # no reconciler here
    try:
        headers = {"Authorization": "Bearer tok-alice-123"}
        created = requests.post(server.api + "/tasks", json={**TASK, "name": "private-name"},
                                headers=headers, timeout=10)
        task_id = created.json()["id"]
        assert requests.get(server.api + "/tasks", timeout=10).status_code == 401
        for path, status in (("/healthz", 200), ("/readyz", 200), ("/metrics", 200)):
            resp = requests.get(server.url + path, timeout=10)
            assert resp.status_code == status, (path, resp.text)
            for private in ("alice", "private-name", task_id, "tok-alice"):
                assert private not in resp.text, (path, private)
        assert requests.get(server.url + "/healthz", timeout=10).json() == {"status": "alive"}
        assert tasks_in(scrape(server), "QUEUED") == 1
    finally:
        server.stop()


@pytest.mark.postgres
@needs(POSTGRES, available(), POSTGRES_BINARIES_REASON)
def test_readyz_is_503_while_postgres_is_stopped_and_200_after(tmp_path):
    postgres = PrivatePostgres.create()
    try:
        server = ServerProcess(tmp_path / "srv", postgres.url, reconcile=True).start()
        try:
            ready = requests.get(server.url + "/readyz", timeout=10)
            assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
            postgres.stop()
            found: list[requests.Response] = wait_for(  # a list: a 503 Response is falsy
                lambda: [resp] if (resp := requests.get(server.url + "/readyz", timeout=30))
                .status_code == 503 else None, 30, "/readyz 503", detail=server.log)
            down = found[0]
            assert down.json() == {"status": "not ready", "checks": {
                "database": "unavailable", "backend": "ok", "reconciler": "unknown"}}
            assert down.headers["Retry-After"] == "5"
            assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
            metrics = scrape(server)  # still answers, saying the database did not
            assert metrics[("funnel_database_up", ())] == 0
            postgres.start()
            wait_for(lambda: requests.get(server.url + "/readyz", timeout=30).status_code
                     == 200, 60, "/readyz to answer 200 again", detail=server.log)
            assert scrape(server)[("funnel_database_up", ())] == 1
        finally:
            server.stop()
    finally:
        postgres.destroy()


# ---- the recording API, as the reconciler calls it ----

def recorded() -> dict[tuple[str, tuple], float]:
    return samples(generate_latest(ops_metrics.REGISTRY).decode())


def test_recording_api_feeds_counters_and_histograms():
    before = recorded()

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return recorded().get(key, 0) - before.get(key, 0)

    ops_metrics.observe_task_finished("COMPLETE", "2026-01-01T00:00:00.000000Z",
                                        "2026-01-01T00:00:10.000000Z",
                                        "2026-01-01T00:01:10.000000Z")
    ops_metrics.observe_task_finished("SYSTEM_ERROR", "2026-01-01T00:00:00.000000Z")
    ops_metrics.observe_tick(0.02)
    ops_metrics.count_scheduler_call("slurm", "poll", ok=True)
    ops_metrics.count_scheduler_call("slurm", "submit", ok=False)
    assert delta("funnel_tasks_finished_total", state="COMPLETE") == 1
    assert delta("funnel_tasks_finished_total", state="SYSTEM_ERROR") == 1
    assert delta("funnel_task_queue_wait_seconds_count") == 1
    assert delta("funnel_task_queue_wait_seconds_sum") == pytest.approx(10)
    assert delta("funnel_task_queue_wait_seconds_bucket", le="15.0") == 1
    assert delta("funnel_task_queue_wait_seconds_bucket", le="5.0") == 0
    assert delta("funnel_task_run_seconds_sum") == pytest.approx(60)
    assert delta("funnel_reconciler_tick_seconds_count") == 1
    assert delta("funnel_scheduler_calls_total", backend="slurm", command="submit") == 1
    assert delta("funnel_scheduler_errors_total", backend="slurm", command="submit") == 1
    assert delta("funnel_scheduler_errors_total", backend="slurm", command="poll") == 0
    assert ops_metrics.backend_failing() == ["slurm"]  # its last command failed
    ops_metrics.count_scheduler_call("slurm", "poll", ok=True)
    assert ops_metrics.backend_failing() == []
    with pytest.raises(ValueError):
        ops_metrics.observe_task_finished("NOT_A_STATE")


def test_readyz_follows_the_last_scheduler_outcome(tmp_path):
    from funnel_hpc.gateway.web.app import create_app

    config = config_mod.load(overrides={"work_dir": str(tmp_path), "server": {
        "grpc_port": 0, "readyz_needs_reconciler": False}})
    client = create_app(config).test_client()
    try:
        ops_metrics.count_scheduler_call("slurm", "poll", ok=False)
        failing = client.get("/readyz")
        assert failing.status_code == 503
        assert (failing.json or {})["checks"]["backend"] == "failing"
        ops_metrics.count_scheduler_call("slurm", "poll", ok=True)
        assert client.get("/readyz").status_code == 200
        metrics = samples(client.get("/metrics").get_data(as_text=True))
        assert ("funnel_scheduler_calls_total", (("backend", "slurm"), ("command", "poll"))) \
            in metrics and tasks_in(metrics, "QUEUED") == 0
    finally:
        ops_metrics.count_scheduler_call("slurm", "poll", ok=True)


# ---- logging ----

def logging_section(**values: str) -> config_mod.LoggingSection:
    section = config_mod.replace(config_mod.load(environ={}).logging, "logging", **values)
    assert isinstance(section, config_mod.LoggingSection)
    return section


def test_task_lines_carry_the_task_id_in_json_and_text(tmp_path):
    log_file = tmp_path / "funnel.log"
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure_logging(logging_section(level="info", format="json",
                                               file=str(log_file)))
        logger = logging.getLogger("funnel_hpc.gateway.reconcile.reconciler")
        logger.warning("task %s: %s failed, trying again next tick: %s", "abc123", "poll", "x")
        logger.warning("cancel of job %s (task %s) failed: %s", "77", "def456", "boom")
        logs.task_log(logger, "ghi789").info("worker started")
        logger.debug("hidden below INFO")
        logger.info("no task here")
        lines = [json.loads(line) for line in log_file.read_text().splitlines()]
        assert [line.get("task_id") for line in lines] == ["abc123", "def456", "ghi789", None]
        assert lines[0]["message"] == "task abc123: poll failed, trying again next tick: x"
        assert lines[0]["level"] == "WARNING" and lines[0]["logger"].endswith("reconciler")

        text_file = tmp_path / "text.log"
        logs.configure_logging(logging_section(level="WARNING", format="text",
                                               file=str(text_file)))
        logger.warning("task %s: gone", "abc123")
        logger.info("not at WARNING")
        (line,) = text_file.read_text().splitlines()
        assert line.endswith("WARNING funnel_hpc.gateway.reconcile.reconciler [task abc123]: "
                             "task abc123: gone")
        for bad in ({"level": "LOUD", "format": "text", "file": ""},
                    {"level": "INFO", "format": "xml", "file": ""}):
            with pytest.raises(ValueError, match="logging"):
                logs.configure_logging(logging_section(**bad))
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def test_server_logs_as_configured(databases, tmp_path):
    log_file = tmp_path / "server.jsonl"
    server = ServerProcess(tmp_path / "srv", databases.new("sqlite"), overrides={
        "logging": {"format": "json", "file": str(log_file)}}).start()
    try:
        lines = wait_for(lambda: log_file.exists() and log_file.read_text().splitlines(), 30,
                         "the server's log file")
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        assert any("TES API on" in e["message"] for e in entries)
    finally:
        server.stop()
