"""The dashboard in a real browser: headless Debian chromium driven by selenium."""

from __future__ import annotations

import re
import shutil
import time
from functools import partial

import pytest
import requests

from funnel_hpc.core import config
from funnel_hpc.core.states import State
from funnel_hpc.gateway.store import db
from funnel_hpc.gateway.store.tasks import TaskService
from tests.components import need
from tests.dashboard_helpers import (
    box_past,
    box_scrolled_up,
    full_page_shot,
    log_box,
    newest_line,
    screenshot_dir,
)
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


# what chromedriver 156 says instead of a stale element when the node it found was
# swapped out before its text was read
LEFT_THE_DOCUMENT = "does not belong to the document"


def swapped(error: Exception) -> bool:
    """Did the page's auto-refresh swap the element between its finding and its read?"""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        WebDriverException,
    )

    return isinstance(error, (StaleElementReferenceException, NoSuchElementException)) or (
        isinstance(error, WebDriverException) and LEFT_THE_DOCUMENT in (error.msg or ""))


def text_of(browser, element_id: str) -> str:
    """Text of an element that the page's auto-refresh may swap at any moment."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            return browser.find_element(By.ID, element_id).text
        except WebDriverException as error:
            if not swapped(error):
                raise
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
    assert service.reconciler_queries.transition(task_id, State.QUEUED, State.RUNNING)
    wait_for_page_state(browser, "RUNNING")
    assert service.reconciler_queries.transition(task_id, State.RUNNING, State.COMPLETE)
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
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            found = browser.find_elements(By.CSS_SELECTOR, selector)
            return found[0].text if found else ""
        except WebDriverException as error:
            if not swapped(error):
                raise
        time.sleep(0.05)
    raise AssertionError(f"{selector} kept changing")


def test_timing_of_queued_running_and_ended_tasks():
    from funnel_hpc.gateway.web.dashboard import timing

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
    from funnel_hpc.gateway.web import dashboard_chart

    server_config = config.load(None)
    engine = db.make_engine(databases.new("sqlite"))
    db.upgrade(engine)
    service = TaskService(engine, server_config)
    ids = [service.create(TASK) for _ in range(4)]
    service.reconciler_queries.transition(ids[0], State.QUEUED, State.CANCELED)
    for task_id, final in ((ids[1], State.COMPLETE), (ids[2], State.EXECUTOR_ERROR)):
        service.reconciler_queries.transition(task_id, State.QUEUED, State.RUNNING,
                                              logs=[{"start_time": "2026-01-01T00:00:00Z"}])
        service.reconciler_queries.transition(task_id, State.RUNNING, final)
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
    from funnel_hpc.gateway.store import backend_health

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


# ---- issue 27.5: a dashboard worth keeping open ----

@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    """Where the full-page screenshots go ($DASHBOARD_SCREENSHOTS or a tmp dir)."""
    directory = screenshot_dir(tmp_path_factory.mktemp("screenshots"))
    yield directory
    print(f"\ndashboard screenshots in {directory}")


PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw"}


@pytest.fixture(scope="module")
def auth_server(databases, tmp_path_factory):
    """A server with sign-in on (basic: alice, bob), no throttle in the way of the tests."""
    from werkzeug.security import generate_password_hash

    srv = ServerProcess(tmp_path_factory.mktemp("dash-auth"), databases.new("sqlite"),
                        overrides={"auth": {
                            "mode": "basic",
                            "users": {user: generate_password_hash(password)
                                      for user, password in PASSWORDS.items()},
                            "login_free_failures": 1000, "login_rate_per_second": 0}}).start()
    yield srv
    srv.stop()


def nav_links(browser) -> list[str]:
    from selenium.webdriver.common.by import By

    return [link.text for link in browser.find_elements(By.CSS_SELECTOR, "header a")
            if "brand" not in (link.get_attribute("class") or "")]


def sign_in(browser, server, user: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/login")
    browser.find_element(By.ID, "username").clear()
    browser.find_element(By.ID, "username").send_keys(user)
    browser.find_element(By.ID, "password").send_keys(password)
    browser.find_element(By.ID, "login").click()


@pytest.mark.browser
def test_sign_in_page_hides_the_nav_and_keeps_the_user_name(browser, auth_server,
                                                            screenshots):
    """Signed out: no links to pages that would only bounce back here; a failed sign-in
    keeps the user name typed (not the password); signed in: the links are back."""
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(auth_server.url + "/")
    wait_for(lambda: "/login" in browser.current_url, 15, "the redirect to the sign-in page")
    assert nav_links(browser) == []
    full_page_shot(browser, screenshots, "login")

    sign_in(browser, auth_server, "alice", "wrong")
    wait_for(lambda: browser.find_elements(By.ID, "login-error"), 15, "the sign-in error")
    assert browser.find_element(By.ID, "username").get_attribute("value") == "alice"
    assert browser.find_element(By.ID, "password").get_attribute("value") == ""
    assert nav_links(browser) == []
    full_page_shot(browser, screenshots, "login-failed")

    sign_in(browser, auth_server, "alice", PASSWORDS["alice"])
    wait_for(lambda: browser.find_elements(By.ID, "signed-in-user"), 15, "signed in")
    assert nav_links(browser) == ["Tasks", "Backends", "Service info", "API"]
    browser.find_element(By.ID, "logout").click()
    wait_for(lambda: "/login" in browser.current_url, 15, "signed out")
    assert nav_links(browser) == []
    assert browser.find_element(By.ID, "username").get_attribute("value") == ""


def test_failed_sign_in_echoes_the_user_name_as_text(auth_server):
    """The kept user name is an attribute value, escaped: a hostile one stays text."""
    from html import unescape

    hostile = '"><script>alert(1)</script><input value="'
    session = requests.Session()
    page = session.get(auth_server.url + "/login", timeout=10).text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf
    failed = session.post(auth_server.url + "/login", timeout=10, data={
        "csrf_token": csrf.group(1), "username": hostile, "password": "secret-typed"})
    assert failed.status_code == 401
    assert "<script>alert" not in failed.text and "secret-typed" not in failed.text
    kept = re.search(r'id="username" autocomplete="username" value="([^"]*)"', failed.text)
    assert kept and unescape(kept.group(1)) == hostile


@pytest.mark.browser
def test_favicon_is_served_to_anyone_under_the_csp(browser, auth_server):
    """/favicon.ico answers 200 with an SVG even signed out (no 404, no sign-in bounce);
    pages link it and the browser loads it without a CSP complaint."""
    from selenium.webdriver.common.by import By

    resp = requests.get(auth_server.url + "/favicon.ico", timeout=10, allow_redirects=False)
    assert resp.status_code == 200, resp.status_code
    assert resp.headers["Content-Type"].startswith("image/svg+xml")
    assert resp.text.startswith("<svg") and "<script" not in resp.text
    assert "unsafe-inline" not in resp.headers["Content-Security-Policy"]
    browser.delete_all_cookies()
    csp_violations(browser)
    browser.get(auth_server.url + "/login")
    icon = browser.find_element(By.CSS_SELECTOR, "link[rel=icon]")
    assert icon.get_attribute("href") == auth_server.url + "/favicon.ico"
    loaded = browser.execute_async_script(
        "var done = arguments[0], img = new Image();"
        "img.onload = function () { done(img.naturalWidth > 0); };"
        "img.onerror = function () { done(false); }; img.src = '/favicon.ico';")
    assert loaded
    assert csp_violations(browser) == []


@pytest.mark.browser
def test_backends_page_names_the_replica_that_answered(browser, server, screenshots):
    import socket

    assert server.proc is not None
    browser.get(server.url + "/backends")
    assert text_of(browser, "answered-by") == f"{socket.gethostname()}:{server.proc.pid}"
    full_page_shot(browser, screenshots, "backends")


TIME_TEXT = re.compile(r"just now|\d+ s ago|\d+ min ago|\d+ h( \d+ min)? ago|\d+ days? ago")


@pytest.mark.browser
def test_times_are_relative_with_the_absolute_on_hover(browser, server):
    from selenium.webdriver.common.by import By

    task_id = create(server, name="relative-time")
    for page in ("/", f"/tasks/{task_id}"):
        browser.get(server.url + page)
        cell = (browser.find_element(By.CSS_SELECTOR, f'tr[data-task-id="{task_id}"] .created')
                if page == "/" else browser.find_element(By.ID, "created"))
        stamp = cell.find_element(By.TAG_NAME, "time")
        assert TIME_TEXT.fullmatch(stamp.text), stamp.text
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", stamp.get_attribute("datetime"))
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", stamp.get_attribute("title"))


def test_times_no_clock_can_show_do_not_break_the_pages(server):
    """Start and end times come from workers: a year 0 or 10000 shows as "-", the task
    page and the list still answer 200."""
    service = TaskService(db.make_engine(server.db_url), config.load(server.config_path))
    task_id = create(server, name="odd-times")
    odd = {"start_time": "0001-01-01T00:00:00+14:00", "end_time": "9999-12-31T23:59:59-12:00"}
    assert service.reconciler_queries.transition(
        task_id, State.QUEUED, State.RUNNING,
        logs=[{**odd, "logs": [{**odd, "stdout": "x", "exit_code": 0}]}])
    for path in (f"/tasks/{task_id}", f"/tasks/{task_id}?fragment=1", "/"):
        page = requests.get(server.url + path, timeout=10)
        assert page.status_code == 200, (path, page.text[:300])
    assert service.reconciler_queries.transition(task_id, State.RUNNING, State.COMPLETE)
    assert requests.get(server.url + "/", timeout=10).status_code == 200  # the chart too


def test_relative_time_words():
    from funnel_hpc.gateway.web.dashboard import relative, when

    assert [relative(s) for s in (-3, 2, 42, 180, 3600, 7500, 90000, 200000)] == [
        "just now", "just now", "42 s ago", "3 min ago", "1 h ago", "2 h 5 min ago",
        "1 day ago", "2 days ago"]
    assert when(None) == when("garbage") == "-"
    for hostile in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00", 1e300,
                    float("nan")):  # start/end times come from workers
        assert when(hostile) == "-", hostile
    assert str(when(0.0, now=60.0)) == ('<time datetime="1970-01-01T00:00:00Z" '
                                        'title="1970-01-01 00:00:00 UTC">1 min ago</time>')


def create_as(server, user: str, **fields) -> str:
    resp = requests.post(server.api + "/tasks", json={**TASK, **fields}, timeout=10,
                         auth=(user, PASSWORDS[user]))
    resp.raise_for_status()
    return resp.json()["id"]


@pytest.mark.browser
def test_list_pages_back_and_forth_with_a_total(browser, auth_server, server, screenshots):
    """Signed in as alice, 120 of her tasks match (bob's 30 do not exist for her), 50 a
    page: positions and total on each page, previous and next links (plain links: no
    script needed) both ways, with a name filter and with a tag filter."""
    from selenium.webdriver.common.by import By

    ids = [create_as(auth_server, "alice", name=f"pager-{index:03d}",
                     tags={"half": "yes" if index % 2 else "no"}) for index in range(120)]
    for index in range(30):
        create_as(auth_server, "bob", name=f"pager-bob-{index}", tags={"half": "yes"})
    sign_in(browser, auth_server, "alice", PASSWORDS["alice"])
    wait_for(lambda: browser.find_elements(By.ID, "signed-in-user"), 15, "signed in")
    browser.get(auth_server.url + "/?name_prefix=pager-")

    def position() -> str:
        return text_of(browser, "page-position")

    def go(link_id: str, expected: str) -> None:
        browser.find_element(By.ID, link_id).click()
        wait_for(lambda: position() == expected, 15, f"the page {expected}")

    assert position() == "tasks 1–50 of 120"
    assert not browser.find_elements(By.ID, "previous-page")
    first = listed_task_ids(browser)
    assert first == set(ids[-50:])  # newest first
    go("next-page", "tasks 51–100 of 120")
    assert listed_task_ids(browser) == set(ids[20:70])
    go("next-page", "tasks 101–120 of 120")
    assert listed_task_ids(browser) == set(ids[:20])
    assert not browser.find_elements(By.ID, "next-page")
    assert "name_prefix=pager-" in browser.current_url
    go("previous-page", "tasks 51–100 of 120")
    go("previous-page", "tasks 1–50 of 120")
    assert listed_task_ids(browser) == first
    assert not browser.find_elements(By.ID, "previous-page")

    browser.get(auth_server.url + "/?tag=half%3Dyes")
    assert position() == "tasks 1–50 of 60"
    go("next-page", "tasks 51–60 of 60")
    assert listed_task_ids(browser) == set(ids[1:20:2])
    go("first-page", "tasks 1–50 of 60")

    browser.get(auth_server.url + "/")
    every = int(browser.find_element(By.CSS_SELECTOR, "#counts b").text)
    assert position() == f"tasks 1–50 of {every}" and every == 120
    full_page_shot(browser, screenshots, "list")
    browser.find_element(By.ID, "logout").click()
    wait_for(lambda: "/login" in browser.current_url, 15, "signed out")
    bad = requests.get(server.url + "/?back=not%20a%20token", timeout=10)
    assert bad.status_code == 400 and "back:" in bad.text
    forged = requests.get(server.url + "/?page_token=x&back=QUJD", timeout=10)
    assert forged.status_code == 400


@pytest.mark.browser
def test_chart_says_so_when_nothing_finished(browser, databases, tmp_path, screenshots):
    from selenium.webdriver.common.by import By

    empty = ServerProcess(tmp_path / "chart-empty", databases.new("sqlite")).start()
    try:
        create(empty, name="still-queued")
        browser.get(empty.url + "/")
        assert browser.find_element(By.ID, "chart-empty").text == \
            "No task finished in the last 6 hours."
        assert not browser.find_elements(By.ID, "activity-chart")
        assert "tallest" not in browser.find_element(By.ID, "activity").text
        full_page_shot(browser, screenshots, "chart-empty")
    finally:
        empty.stop()


# (final state, queue wait s, ended hours ago) of the chart's finished tasks
CHART_TASKS = [(State.COMPLETE, 30, 1)] * 3 + [(State.COMPLETE, 150, 0)] * 2 + \
    [(State.EXECUTOR_ERROR, 600, 4)] * 2 + [(State.SYSTEM_ERROR, 150, 0)]


@pytest.mark.browser
def test_chart_fills_the_width_and_lines_up_with_its_numbers(browser, databases, tmp_path,
                                                             screenshots):
    """Finished tasks per 30 min by state with their median queue wait: the chart is as
    wide as the task table, and each interval's bar sits above its own count and wait."""
    from selenium.webdriver.common.by import By
    from sqlalchemy import update

    chart = ServerProcess(tmp_path / "chart", databases.new("sqlite")).start()
    engine = db.make_engine(chart.db_url)
    try:
        service = TaskService(engine, config.load(chart.config_path))
        now = time.time()
        for index, (final, wait, hours_ago) in enumerate(CHART_TASKS):
            task_id = create(chart, name=f"done-{index}")
            assert service.reconciler_queries.transition(
                task_id, State.QUEUED, State.RUNNING,
                logs=[{"start_time": _later(service, task_id, wait)}])
            assert service.reconciler_queries.transition(task_id, State.RUNNING, final)
            if hours_ago:  # as if it had ended then
                with engine.begin() as conn:
                    conn.execute(update(db.tasks).where(db.tasks.c.id == task_id)
                                 .values(updated_at=_rfc3339(now - hours_ago * 3600)))
        for index in range(2):
            requests.post(f"{chart.api}/tasks/{create(chart, name=f'c-{index}')}:cancel",
                          timeout=10)
        browser.get(chart.url + "/")
        legend = browser.find_element(By.ID, "chart-legend").text
        assert legend.startswith("10 tasks finished"), legend
        assert "COMPLETE 5" in legend and "EXECUTOR_ERROR 2" in legend and "CANCELED 2" in legend
        table = browser.find_element(By.ID, "activity-chart")
        tasks = browser.find_element(By.ID, "tasks")
        assert abs(table.rect["width"] - tasks.rect["width"]) <= 2, (table.rect, tasks.rect)
        rows = table.find_elements(By.TAG_NAME, "tr")
        bar_cells, count_cells, wait_cells, from_cells = (
            row.find_elements(By.TAG_NAME, "td") for row in rows)
        assert len(bar_cells) == len(count_cells) == len(wait_cells) == len(from_cells) == 12
        # the interval of a time, found by its label: right even if the page was drawn
        # just after an interval's end
        labels = [cell.text for cell in from_cells]
        expected = {labels.index(_interval_label(now - hours * 3600)): (shown, median)
                    for hours, shown, median in ((0, "5", "2:30"), (1, "3", "0:30"),
                                                 (4, "2", "10:00"))}
        filled = {i for i, cell in enumerate(bar_cells)
                  if cell.find_elements(By.CSS_SELECTOR, "rect.bar")}
        assert filled == set(expected), (filled, expected, labels)
        for index, cells in expected.items():
            assert (count_cells[index].text, wait_cells[index].text) == cells
            column = bar_cells[index].rect
            for cell in (count_cells[index], wait_cells[index], from_cells[index]):
                assert abs(cell.rect["x"] - column["x"]) <= 1
                assert abs(cell.rect["width"] - column["width"]) <= 1
            for bar in bar_cells[index].find_elements(By.CSS_SELECTOR, "rect.bar"):
                assert column["x"] <= bar.rect["x"] and \
                    bar.rect["x"] + bar.rect["width"] <= column["x"] + column["width"]
        full_page_shot(browser, screenshots, "chart-data")
    finally:
        chart.stop()
        engine.dispose()


def _rfc3339(seconds: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _interval_label(seconds: float) -> str:
    """HH:MM (UTC) of the start of the 30-minute interval holding a time."""
    return _rfc3339(seconds // 1800 * 1800)[11:16]


def _later(service: TaskService, task_id: str, seconds: float) -> str:
    """The task's creation time plus seconds, as RFC 3339."""
    from datetime import UTC, datetime, timedelta

    created = service.get(task_id, "BASIC")["creation_time"]
    start = datetime.fromisoformat(created.replace("Z", "+00:00")) + timedelta(seconds=seconds)
    return start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


COUNT_UNTIL_GO = ("i=0; while [ ! -e /data/go ] && [ $i -lt 3000 ]; do i=$((i+1)); "
                  "echo line $i; sleep 0.2; done; echo done")


@pytest.mark.browser
def test_live_log_follows_like_tail_f(browser, databases, tmp_path, screenshots):
    """A task prints a line every 0.2 s: the open page's log box shows the newest line and
    stays at the bottom across refreshes; scrolled up by the user (a real wheel scroll),
    it stays where the user put it while lines keep coming; scrolled back down, it
    follows again."""
    from pathlib import Path

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By

    live = ServerProcess(tmp_path / "follow", databases.new("sqlite"), reconcile=True,
                         overrides={"reconciler": {"interval_seconds": 0.3},
                                    "worker": {"container_driver": "bwrap",
                                               "log_update_seconds": 1}}).start()
    try:
        task_id = create(live, name="follow", volumes=["/data"], executors=[
            {"image": "busybox", "command": ["sh", "-c", COUNT_UNTIL_GO]}])
        browser.get(f"{live.url}/tasks/{task_id}")

        state = wait_for(lambda: box_past(browser, 40), 90, "40 lines in the log box",
                         detail=live.log)
        for _ in range(3):  # three refreshes with new lines: still at the bottom
            assert state["bottom"] and state["top"] > 0, state
            newest = newest_line(browser)
            state = wait_for(partial(box_past, browser, newest), 30, "newer lines")
        assert state["bottom"], state
        full_page_shot(browser, screenshots, "task-live-log")

        box = browser.find_element(By.CSS_SELECTOR, "pre.stdout")
        ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(box), 0, -150)\
            .perform()
        scrolled = wait_for(lambda: box_scrolled_up(browser), 15,
                            "the wheel scroll to move the box up")
        for _ in range(3):  # new lines keep arriving; the box stays where the user left it
            newest = newest_line(browser)
            state = wait_for(partial(box_past, browser, newest), 30, "newer lines")
            assert not state["bottom"] and abs(state["top"] - scrolled["top"]) <= 1, \
                (state, scrolled)

        box = browser.find_element(By.CSS_SELECTOR, "pre.stdout")
        ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(box), 0, 100000)\
            .perform()
        newest = newest_line(browser)
        state = wait_for(lambda: box_past(browser, newest + 5), 30,
                         "newer lines after scrolling down")
        assert state["bottom"], state

        (Path(live.work_dir) / task_id / "files" / "data" / "go").write_text("")
        wait_for_page_state(browser, "COMPLETE", 60)
        final = log_box(browser)
        assert final and final["last"] == "done" and final["bottom"], final
        full_page_shot(browser, screenshots, "task-complete")
    finally:
        live.stop()
