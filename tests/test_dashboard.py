"""The dashboard in a real browser: headless Debian chromium driven by selenium."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import requests

from funnel_hpc.gateway import db
from funnel_hpc.gateway.service import TaskService
from funnel_hpc.core.states import State
from tests.conftest import ServerProcess

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"),
    reason="chromium/chromedriver not installed (scripts/setup/70-browser.sh)")

TASK = {"executors": [{"image": "busybox", "command": ["echo", "hi"]}]}


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-quic", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
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


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


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


def shot(browser, tmp_path, name):
    path = tmp_path / f"{name}.png"
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 1000


def test_empty_state(browser, databases, tmp_path):
    from selenium.webdriver.common.by import By

    empty = ServerProcess(tmp_path / "empty", databases.new("sqlite")).start()
    try:
        browser.get(empty.url + "/")
        assert "No tasks yet" in browser.find_element(By.ID, "empty").text
        shot(browser, tmp_path, "empty")
    finally:
        empty.stop()


def test_list_renders_and_filters(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    alpha = create(server, name="alpha-1", tags={"project": "alpha"})
    beta = create(server, name="beta-1", tags={"project": "beta"})
    requests.post(f"{server.api}/tasks/{beta}:cancel", timeout=10)

    browser.get(server.url + "/")
    rows = {r.get_attribute("data-task-id") for r in browser.find_elements(By.CSS_SELECTOR, "tr[data-task-id]")}
    assert {alpha, beta} <= rows
    counts = browser.find_element(By.ID, "counts").text
    assert "QUEUED" in counts and "CANCELED" in counts
    shot(browser, tmp_path, "list")

    Select(browser.find_element(By.ID, "filter-state")).select_by_value("CANCELED")
    browser.find_element(By.ID, "filter-apply").click()
    wait_for(lambda: "state=CANCELED" in browser.current_url)
    rows = {r.get_attribute("data-task-id") for r in browser.find_elements(By.CSS_SELECTOR, "tr[data-task-id]")}
    assert beta in rows and alpha not in rows

    browser.get(server.url + "/")
    browser.find_element(By.ID, "filter-name").send_keys("alpha")
    browser.find_element(By.ID, "filter-apply").click()
    wait_for(lambda: "name_prefix=alpha" in browser.current_url)
    rows = {r.get_attribute("data-task-id") for r in browser.find_elements(By.CSS_SELECTOR, "tr[data-task-id]")}
    assert alpha in rows and beta not in rows

    browser.get(server.url + "/?tag=project%3Dbeta")
    rows = {r.get_attribute("data-task-id") for r in browser.find_elements(By.CSS_SELECTOR, "tr[data-task-id]")}
    assert rows == {beta}
    shot(browser, tmp_path, "filtered")


def test_task_page_updates_without_reload(browser, server, tmp_path):
    """The page polls a fragment: a state change shows up while the page stays loaded."""
    from selenium.webdriver.common.by import By

    task_id = create(server, name="live")
    browser.get(f"{server.url}/tasks/{task_id}")
    assert text_of(browser, "task-state") == "QUEUED"
    browser.execute_script("window.__loaded_once = true;")

    # another process (here: the test, as the reconciler would) moves the task on
    service = TaskService(db.make_engine(server.db_url), {"backend": {"name": "local"}})
    assert service.transition(task_id, State.QUEUED, State.RUNNING)
    wait_for(lambda: text_of(browser, "task-state") == "RUNNING")
    assert service.transition(task_id, State.RUNNING, State.COMPLETE)
    wait_for(lambda: text_of(browser, "task-state") == "COMPLETE")
    assert browser.execute_script("return window.__loaded_once === true;")  # no reload
    assert not browser.find_elements(By.ID, "cancel")  # ended tasks offer no cancel
    shot(browser, tmp_path, "task-complete")


def test_cancel_from_the_page(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    task_id = create(server, name="to-cancel")
    browser.get(f"{server.url}/tasks/{task_id}")
    shot(browser, tmp_path, "task-queued")
    browser.find_element(By.ID, "cancel").click()
    wait_for(lambda: text_of(browser, "task-state") == "CANCELED")
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


def test_unknown_task_page_and_service_page(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(f"{server.url}/tasks/nosuchtask")
    assert "There is no task" in browser.find_element(By.ID, "not-found").text
    browser.get(f"{server.url}/service")
    assert "funnel-hpc" in browser.find_element(By.ID, "service-info").text
    shot(browser, tmp_path, "service")


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
        wait_for(lambda: text_of(browser, "task-state") == "RUNNING", 30)
        wait_for(lambda: text_of(browser, "task-state") == "COMPLETE", 30)
        assert browser.execute_script("return window.__loaded_once === true;")
        stdout = browser.find_element(By.CSS_SELECTOR, "pre.stdout").text
        assert stdout.strip() == "finished"
        assert task_id in browser.find_element(By.ID, "job-id").text  # local job id = task id
        shot(browser, tmp_path, "real-run-complete")
    finally:
        live.stop()
