"""The dashboard in a real browser: headless Debian chromium driven by selenium."""

from __future__ import annotations

import re
import shutil
import time

import pytest
import requests

from funnel_hpc.core import config
from funnel_hpc.core.states import State
from funnel_hpc.gateway import db
from funnel_hpc.gateway.service import TaskService
from tests.components import need
from tests.server_helpers import ServerProcess
from tests.waiting import wait_for

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

TASK = {"executors": [{"image": "busybox", "command": ["echo", "hi"]}]}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    need("chromium and chromedriver", bool(CHROMIUM and CHROMEDRIVER),
         "not installed (scripts/setup/70-browser.sh)")
    assert CHROMIUM is not None and CHROMEDRIVER is not None  # need() returned
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-quic", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP reports land here
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(databases, tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("dash"), databases.new("sqlite")).start()
    yield srv
    srv.stop()


def create(server, **fields) -> str:
    resp = requests.post(server.api + "/tasks", json={**TASK, **fields}, timeout=10)
    resp.raise_for_status()
    return resp.json()["id"]


def text_of(browser, element_id: str) -> str:
    """Text of an element that the page's auto-refresh may swap at any moment."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            return browser.find_element(By.ID, element_id).text
        except (StaleElementReferenceException, NoSuchElementException):
            time.sleep(0.05)
    raise AssertionError(f"#{element_id} kept changing")


def wait_for_page_state(browser, state: str, timeout: float = 15.0) -> None:
    """Wait until the task page (refreshing itself) shows state."""
    wait_for(lambda: text_of(browser, "task-state") == state, timeout,
             f"the task page to show {state}")


def listed_task_ids(browser) -> set[str]:
    """The task ids of the rows the list page shows."""
    from selenium.webdriver.common.by import By

    return {row.get_attribute("data-task-id")
            for row in browser.find_elements(By.CSS_SELECTOR, "tr[data-task-id]")}


def shot(browser, tmp_path, name):
    path = tmp_path / f"{name}.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 1000


@pytest.mark.browser
def test_empty_state(browser, databases, tmp_path):
    from selenium.webdriver.common.by import By

    empty = ServerProcess(tmp_path / "empty", databases.new("sqlite")).start()
    try:
        browser.get(empty.url + "/")
        assert "No tasks yet" in browser.find_element(By.ID, "empty").text
        shot(browser, tmp_path, "empty")
    finally:
        empty.stop()


@pytest.mark.browser
def test_list_renders_and_filters(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    alpha = create(server, name="alpha-1", tags={"project": "alpha"})
    beta = create(server, name="beta-1", tags={"project": "beta"})
    requests.post(f"{server.api}/tasks/{beta}:cancel", timeout=10)

    browser.get(server.url + "/")
    rows = listed_task_ids(browser)
    assert {alpha, beta} <= rows
    counts = browser.find_element(By.ID, "counts").text
    assert "QUEUED" in counts and "CANCELED" in counts
    shot(browser, tmp_path, "list")

    Select(browser.find_element(By.ID, "filter-state")).select_by_value("CANCELED")
    browser.find_element(By.ID, "filter-apply").click()
    wait_for(lambda: "state=CANCELED" in browser.current_url, 15, "the state filter's URL")
    rows = listed_task_ids(browser)
    assert beta in rows and alpha not in rows

    browser.get(server.url + "/")
    browser.find_element(By.ID, "filter-name").send_keys("alpha")
    browser.find_element(By.ID, "filter-apply").click()
    wait_for(lambda: "name_prefix=alpha" in browser.current_url, 15, "the name filter's URL")
    rows = listed_task_ids(browser)
    assert alpha in rows and beta not in rows

    browser.get(server.url + "/?tag=project%3Dbeta")
    rows = listed_task_ids(browser)
    assert rows == {beta}
    shot(browser, tmp_path, "filtered")


@pytest.mark.browser
def test_task_page_updates_without_reload(browser, server, tmp_path):
    """The page polls a fragment: a state change shows up while the page stays loaded."""
    from selenium.webdriver.common.by import By

    task_id = create(server, name="live")
    browser.get(f"{server.url}/tasks/{task_id}")
    assert text_of(browser, "task-state") == "QUEUED"
    browser.execute_script("window.__loaded_once = true;")

    # another process (here: the test, as the reconciler would) moves the task on
    service = TaskService(db.make_engine(server.db_url), config.load(server.config_path))
    assert service.transition(task_id, State.QUEUED, State.RUNNING)
    wait_for_page_state(browser, "RUNNING")
    assert service.transition(task_id, State.RUNNING, State.COMPLETE)
    wait_for_page_state(browser, "COMPLETE")
    assert browser.execute_script("return window.__loaded_once === true;")  # no reload
    assert not browser.find_elements(By.ID, "cancel")  # ended tasks offer no cancel
    shot(browser, tmp_path, "task-complete")


@pytest.mark.browser
def test_cancel_from_the_page(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    task_id = create(server, name="to-cancel")
    browser.get(f"{server.url}/tasks/{task_id}")
    shot(browser, tmp_path, "task-queued")
    browser.find_element(By.ID, "cancel").click()
    wait_for_page_state(browser, "CANCELED")
    state = requests.get(f"{server.api}/tasks/{task_id}", timeout=10).json()["state"]
    assert state == "CANCELED"


def test_cancel_without_csrf_token_is_refused(server):
    task_id = create(server, name="csrf")
    resp = requests.post(f"{server.url}/tasks/{task_id}/cancel", data={}, timeout=10)
    assert resp.status_code == 403
    forged = requests.post(f"{server.url}/tasks/{task_id}/cancel", timeout=10,
                           data={"csrf_token": "x"}, cookies={"funnel_csrf": "y"})
    assert forged.status_code == 403
    assert requests.get(f"{server.api}/tasks/{task_id}", timeout=10).json()["state"] == "QUEUED"


@pytest.mark.browser
def test_unknown_task_page_and_service_page(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(f"{server.url}/tasks/nosuchtask")
    assert "There is no task" in browser.find_element(By.ID, "not-found").text
    browser.get(f"{server.url}/service")
    assert "funnel-hpc" in browser.find_element(By.ID, "service-info").text
    shot(browser, tmp_path, "service")


@pytest.mark.browser
def test_really_running_task_page_turns_complete_without_reload(browser, databases, tmp_path):
    """Server + reconciler + local backend + worker: the open page follows the real run."""
    from selenium.webdriver.common.by import By

    live = ServerProcess(tmp_path / "live", databases.new("sqlite"), reconcile=True, overrides={
        "reconciler": {"interval_seconds": 0.3}, "worker": {"container_driver": "bwrap"}}).start()
    try:
        task_id = create(live, name="real-run", executors=[
            {"image": "busybox", "command": ["sh", "-c", "sleep 3; echo finished"]}])
        browser.get(f"{live.url}/tasks/{task_id}")
        browser.execute_script("window.__loaded_once = true;")
        wait_for_page_state(browser, "RUNNING", 30)
        wait_for_page_state(browser, "COMPLETE", 30)
        assert browser.execute_script("return window.__loaded_once === true;")
        stdout = browser.find_element(By.CSS_SELECTOR, "pre.stdout").text
        assert stdout.strip() == "finished"
        assert task_id in browser.find_element(By.ID, "job-id").text  # local job id = task id
        shot(browser, tmp_path, "real-run-complete")
    finally:
        live.stop()


def csp_violations(browser) -> list[str]:
    """Console messages about the Content-Security-Policy since the last call."""
    return [entry["message"] for entry in browser.get_log("browser")
            if "Content Security Policy" in entry["message"]]


@pytest.mark.browser
def test_pages_run_under_the_content_security_policy(browser, server, tmp_path):
    """Every style and script of the dashboard carries the response's nonce: nothing is
    refused, the auto-refresh still runs, and the API page renders openapi.json offline
    (no CDN: the browser has no network beyond the server)."""
    from selenium.webdriver.common.by import By

    task_id = create(server, name="csp")
    csp_violations(browser)
    browser.get(f"{server.url}/tasks/{task_id}")
    browser.execute_script("window.__loaded_once = true;")
    requests.post(f"{server.api}/tasks/{task_id}:cancel", timeout=10)
    wait_for_page_state(browser, "CANCELED")  # the refresh script ran
    assert browser.execute_script("return window.__loaded_once === true;")
    browser.get(server.url + "/ga4gh/tes/v1/docs")
    wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "tr.operation")) >= 8, 15,
             "the API page to list the operations")
    paths = {row.find_elements(By.TAG_NAME, "td")[1].text
             for row in browser.find_elements(By.CSS_SELECTOR, "tr.operation")}
    assert "/ga4gh/tes/v1/tasks" in paths
    shot(browser, tmp_path, "docs")
    assert csp_violations(browser) == []


STEP_ONE_WAIT_STEP_TWO = ("echo step one; while [ ! -e /data/go ]; do sleep 0.1; done; "
                         "echo step two")


@pytest.mark.browser
def test_live_log_tail_shows_on_the_open_page_while_running(browser, databases, tmp_path):
    """Live logs (worker.log_update_seconds): the open task page shows a running executor's
    stdout as it grows, without a reload; the task ends only when the test lets it."""
    from pathlib import Path

    live = ServerProcess(tmp_path / "live-logs", databases.new("sqlite"), reconcile=True,
                         overrides={"reconciler": {"interval_seconds": 0.3},
                                    "worker": {"container_driver": "bwrap",
                                               "log_update_seconds": 1}}).start()
    try:
        task_id = create(live, name="live-logs", volumes=["/data"], executors=[
            {"image": "busybox", "command": ["sh", "-c", STEP_ONE_WAIT_STEP_TWO]}])
        browser.get(f"{live.url}/tasks/{task_id}")
        browser.execute_script("window.__loaded_once = true;")
        wait_for(lambda: "step one" in text_of_selector(browser, "pre.stdout"), 60,
                 "the running executor's first line on the page")
        assert text_of(browser, "task-state") == "RUNNING"
        assert "running" in text_of_selector(browser, ".executor-log")
        shot(browser, tmp_path, "live-log-running")
        (Path(live.work_dir) / task_id / "files" / "data" / "go").write_text("")
        wait_for_page_state(browser, "COMPLETE", 60)
        assert text_of_selector(browser, "pre.stdout") == "step one\nstep two"
        for element_id in ("queue-wait", "run-time"):  # issue 18.5: per-task timings
            assert re.fullmatch(r"\d+:\d\d", text_of(browser, element_id)), element_id
        assert browser.execute_script("return window.__loaded_once === true;")
    finally:
        live.stop()


def text_of_selector(browser, selector: str) -> str:
    """Text of the first element matching a CSS selector ("" if none), tolerating swaps."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            found = browser.find_elements(By.CSS_SELECTOR, selector)
            return found[0].text if found else ""
        except StaleElementReferenceException:
            time.sleep(0.05)
    raise AssertionError(f"{selector} kept changing")


def test_timing_of_queued_running_and_ended_tasks():
    from funnel_hpc.gateway.dashboard import timing

    created = "2026-01-01T00:00:00.000000Z"
    ended = {"state": "COMPLETE", "creation_time": created,
             "logs": [{"start_time": "2026-01-01T00:00:05Z"},
                      {"start_time": "2026-01-01T00:10:00Z",
                       "end_time": "2026-01-01T01:10:01Z"}]}
    assert timing(ended) == {"queue_wait": "0:05", "run_time": "1:00:01"}
    assert timing({"state": "QUEUED", "creation_time": created}) == \
        {"queue_wait": "-", "run_time": "-"}
    running = {"state": "RUNNING", "creation_time": created,
               "logs": [{"start_time": "2026-01-01T00:01:00Z"}]}
    assert timing(running)["queue_wait"] == "1:00" and timing(running)["run_time"] != "-"
    assert timing({"state": "SYSTEM_ERROR", "creation_time": "garbage",
                   "logs": [{"start_time": "x"}]}) == {"queue_wait": "-", "run_time": "-"}


def test_activity_chart_counts_ended_tasks_by_state(databases, tmp_path):
    """Issue 18.5: the chart's buckets count tasks that ended in the window, by state."""
    from funnel_hpc.gateway import dashboard_chart

    server_config = config.load(None)
    engine = db.make_engine(databases.new("sqlite"))
    db.upgrade(engine)
    service = TaskService(engine, server_config)
    ids = [service.create(TASK) for _ in range(4)]
    service.transition(ids[0], State.QUEUED, State.CANCELED)
    for task_id, final in ((ids[1], State.COMPLETE), (ids[2], State.EXECUTOR_ERROR)):
        service.transition(task_id, State.QUEUED, State.RUNNING,
                           logs=[{"start_time": "2026-01-01T00:00:00Z"}])
        service.transition(task_id, State.RUNNING, final)
    chart = dashboard_chart.finished(engine, None)
    totals: dict[str, int] = {}
    for bucket in chart["buckets"]:
        for state, count in bucket["counts"].items():
            totals[state] = totals.get(state, 0) + count
    assert totals["COMPLETE"] == totals["EXECUTOR_ERROR"] == totals["CANCELED"] == 1
    assert sum(totals.values()) == 3  # the QUEUED one has not ended
    assert sum(bar["n"] for bar in chart["bars"]) == 3
    assert all(0 <= bar["y"] and bar["y"] + bar["h"] <= chart["height"] + 0.5
               for bar in chart["bars"])
    assert dashboard_chart.finished(engine, "someone-else")["bars"] == []


@pytest.mark.browser
def test_list_page_shows_the_activity_chart(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    task_id = create(server, name="chart")
    requests.post(f"{server.api}/tasks/{task_id}:cancel", timeout=10)
    browser.get(server.url + "/")
    csp_violations(browser)  # clears what earlier pages logged
    bars = browser.find_elements(By.CSS_SELECTOR, "#activity-chart rect.bar")
    assert "CANCELED" in {bar.get_attribute("data-state") for bar in bars}
    assert browser.find_element(By.ID, "queue-waits").is_displayed()
    shot(browser, tmp_path, "activity-chart")
    browser.get(server.url + "/")
    assert csp_violations(browser) == []


LOCAL_HEALTH = 'tr[data-backend="local"]'
UNREACHABLE = "squeue failed (1): slurm_load_jobs error: Unable to contact slurm controller"


@pytest.mark.browser
def test_backend_health_shows_a_poll_error_then_the_recovery(browser, server, tmp_path):
    """Issue 18.5: the panel reads the database, whichever process polled: an error that
    another process records shows on the open page without a reload, then the recovery."""
    from funnel_hpc.gateway import backend_health

    engine = db.make_engine(server.db_url)
    browser.get(server.url + "/")
    csp_violations(browser)  # clears what earlier pages logged
    assert "not held" in text_of_selector(browser, f"{LOCAL_HEALTH} .lease")  # --no-reconciler
    assert text_of_selector(browser, f"{LOCAL_HEALTH} .last-poll") == "never"
    browser.execute_script("window.__loaded_once = true;")
    backend_health._written.clear()
    backend_health.record_poll(engine, "local", UNREACHABLE)
    wait_for(lambda: UNREACHABLE in text_of_selector(browser, f"{LOCAL_HEALTH} .last-error"),
             30, "the poll error on the open page")
    assert text_of_selector(browser, f"{LOCAL_HEALTH} .poll-status") == "failing"
    shot(browser, tmp_path, "backend-health-error")
    backend_health.record_poll(engine, "local", None)
    wait_for(lambda: text_of_selector(browser, f"{LOCAL_HEALTH} .poll-status") == "ok", 30,
             "the recovery on the open page")
    assert UNREACHABLE in text_of_selector(browser, f"{LOCAL_HEALTH} .last-error")  # kept
    assert browser.execute_script("return window.__loaded_once === true;")
    browser.get(server.url + "/backends")
    assert UNREACHABLE in text_of_selector(browser, f"{LOCAL_HEALTH} .last-error")
    assert csp_violations(browser) == []
    engine.dispose()


@pytest.mark.browser
def test_backend_health_follows_the_servers_reconciler(browser, databases, tmp_path):
    """Server + reconciler + local backend: the panel names the reconciler holding the
    lease (SQLite: this server's pid) and shows a fresh successful poll while a job runs."""
    live = ServerProcess(tmp_path / "health", databases.new("sqlite"), reconcile=True,
                         overrides={"reconciler": {"interval_seconds": 0.3},
                                    "worker": {"container_driver": "bwrap"}}).start()
    try:
        assert live.proc is not None
        browser.get(live.url + "/backends")
        lease = text_of_selector(browser, f"{LOCAL_HEALTH} .lease")
        assert lease.startswith("held by") and f":{live.proc.pid} since" in lease, lease
        create(live, name="health", executors=[
            {"image": "busybox", "command": ["sh", "-c", "sleep 5"]}])
        wait_for(lambda: text_of_selector(browser, f"{LOCAL_HEALTH} .poll-status") == "ok",
                 60, "a successful poll on the open page", detail=live.log)
        assert re.fullmatch(r"\d+:\d\d ago \(.*Z\)",
                            text_of_selector(browser, f"{LOCAL_HEALTH} .last-poll")
                            .rsplit(" ", 1)[0])
        shot(browser, tmp_path, "backend-health-live")
    finally:
        live.stop()
