"""The tes backend against a hostile remote: answers no real TES server gives (huge logs,
bad JSON, another task's id, states outside TES, endless pages, redirects) come from a
small HTTP server in this process (tests/tes_helpers.py FakeTes). The backend must never
raise from poll, never write outside the task dir it submitted, and keep what it writes
within the event log's limits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from funnel_hpc.backends.base import BackendError, JobState
from funnel_hpc.backends.tes import MAX_PAGES, TesBackend
from funnel_hpc.backends.tes_client import MAX_ANSWER_BYTES
from funnel_hpc.backends.tes_events import LOG_TAIL_CHARS, RemoteEventLog
from funnel_hpc.core.events import read_event_log
from tests.tes_helpers import FakeTes, request_for, tes_options, token_file


@pytest.fixture
def fake():
    server = FakeTes()
    yield server
    server.close()


def files_under(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_size
            for path in root.rglob("*") if path.is_file()}


def submitted(fake: FakeTes, work: Path, count: int = 2) -> tuple[TesBackend, list[str]]:
    """A backend whose tasks task0.. were submitted to the fake as r0.. (one executor)."""
    backend = TesBackend(tes_options(fake.url), work)
    jobs = []
    for n in range(count):
        fake.json("POST", "/tasks", {"id": f"r{n}"})
        jobs.append(backend.submit(request_for(work, f"task{n}", {
            "executors": [{"image": "busybox", "command": ["true"]}]})))
    return backend, jobs


def remote_task(job: str, task_id: str, backend: TesBackend, state: str = "COMPLETE",
                **attempt: object) -> dict:
    return {"id": job, "state": state,
            "tags": {backend.tag[0]: backend.tag[1], "funnel-hpc-task-id": task_id},
            "logs": [{"start_time": "2026-01-01T00:00:00Z", "end_time": "2026-01-01T00:00:01Z",
                      "logs": [{"start_time": "2026-01-01T00:00:00Z",
                                "end_time": "2026-01-01T00:00:01Z", "exit_code": 0,
                                "stdout": "ok\n", "stderr": ""}], **attempt}]}


def test_bad_json_and_non_objects_are_unknown(fake: FakeTes, tmp_path: Path):
    backend, jobs = submitted(fake, tmp_path)
    for body in (b"{not json", b"[1, 2]", b'"text"', b"[" * 100_000, b""):
        fake.raw("GET", "/tasks", body)
        statuses = backend.poll(jobs)
        assert {s.state for s in statuses.values()} == {JobState.UNKNOWN}, body[:20]
        assert all("not JSON" in s.reason or "not a JSON object" in s.reason
                   for s in statuses.values())


def test_states_outside_tes_are_unknown(fake: FakeTes, tmp_path: Path):
    backend, jobs = submitted(fake, tmp_path)
    fake.json("GET", "/tasks", {"tasks": [
        {"id": jobs[0], "state": "EXPLODED"}, {"id": jobs[1], "state": ["COMPLETE"]}]})
    statuses = backend.poll(jobs)
    assert statuses[jobs[0]].state == JobState.UNKNOWN
    assert "'EXPLODED' is not a TES state" in statuses[jobs[0]].reason
    assert statuses[jobs[1]].state == JobState.UNKNOWN
    for n in range(2):
        fold = read_event_log(tmp_path / f"task{n}" / "events.jsonl")
        assert fold.state is None  # nothing but the backend's own metadata


def test_huge_logs_are_cut_and_an_oversized_answer_still_ends_the_task(fake: FakeTes,
                                                                      tmp_path: Path):
    backend, jobs = submitted(fake, tmp_path)
    big = remote_task(jobs[0], "task0", backend)
    big["logs"][0]["logs"][0]["stdout"] = "x" * (4 << 20) + "END"
    big["logs"][0]["system_logs"] = ["y" * 100_000] * 50
    fake.json("GET", f"/tasks/{jobs[0]}", big)
    huge = remote_task(jobs[1], "task1", backend)
    fake.raw("GET", f"/tasks/{jobs[1]}",
             json.dumps(huge).encode()[:-1] + b', "pad": "' + b"z" * MAX_ANSWER_BYTES + b'"}')
    fake.json("GET", "/tasks", {"tasks": [
        remote_task(job, f"task{n}", backend)
        for n, job in enumerate(jobs)]})
    statuses = backend.poll(jobs)
    assert statuses[jobs[0]].state == JobState.COMPLETED
    fold = read_event_log(tmp_path / "task0" / "events.jsonl")
    assert fold.state == "COMPLETE"
    stdout = fold.task_log["logs"][0]["stdout"]
    assert len(stdout) == LOG_TAIL_CHARS and stdout.endswith("END")
    assert all(len(line) <= 8192 + 8 for line in fold.task_log["system_logs"])
    # the oversized FULL answer: the BASIC view ends the task, with a note why
    assert statuses[jobs[1]].state == JobState.COMPLETED
    fold = read_event_log(tmp_path / "task1" / "events.jsonl")
    assert fold.state == "COMPLETE"
    assert any("longer than" in line for line in fold.task_log["system_logs"])
    assert (tmp_path / "task1" / "events.jsonl").stat().st_size < 64 << 10


def test_a_remote_claiming_another_tasks_id_writes_nowhere_else(fake: FakeTes, tmp_path: Path):
    """After a restart (nothing in memory) the remote says r0 is task1's, and names paths
    and tasks of its own: nothing is written but r0's own task's log, and only from its
    own FULL answer."""
    backend, jobs = submitted(fake, tmp_path, 3)
    backend.close()
    before = files_under(tmp_path)
    restarted = TesBackend(tes_options(fake.url), tmp_path)
    tag = {restarted.tag[0]: restarted.tag[1]}
    fake.json("GET", "/tasks", {"tasks": [
        {"id": jobs[0], "state": "COMPLETE", "tags": {**tag, "funnel-hpc-task-id": "task1"}},
        {"id": jobs[1], "state": "COMPLETE",
         "tags": {**tag, "funnel-hpc-task-id": "../../etc"}},
        {"id": jobs[2], "state": "COMPLETE", "tags": {**tag, "funnel-hpc-task-id": "task2"}},
        {"id": "../../x", "state": "COMPLETE", "tags": tag}]})
    # r2's FULL view is another task's document
    fake.json("GET", f"/tasks/{jobs[2]}", remote_task(jobs[0], "task2", restarted))
    statuses = restarted.poll(jobs)
    assert statuses[jobs[0]].state == JobState.UNKNOWN
    assert statuses[jobs[1]].state == JobState.UNKNOWN
    assert "not one this gateway submitted" in statuses[jobs[0]].reason
    after = files_under(tmp_path)
    changed = {name for name in after if before.get(name) != after[name]}
    assert changed == {"task2/events.jsonl"}, changed
    fold = read_event_log(tmp_path / "task2" / "events.jsonl")
    assert fold.state == "COMPLETE"  # from its BASIC view, noted
    assert any("answered another task" in line for line in fold.task_log["system_logs"])
    assert fold.task_log["logs"] == []  # nothing of the other task's document
    assert not (tmp_path.parent / "etc").exists() and not (tmp_path / "x").exists()


def test_hostile_field_types_are_left_out(fake: FakeTes, tmp_path: Path):
    backend, jobs = submitted(fake, tmp_path, 1)
    odd = remote_task(jobs[0], "task0", backend, state="EXECUTOR_ERROR",
                      outputs=[{"url": 5, "path": None, "size_bytes": "-1"},
                               {"url": "s3://b/k", "path": "/out", "size_bytes": 12}],
                      system_logs=[None, {"a": 1}, "fine"])
    odd["logs"][0]["logs"] = [{"start_time": 1, "end_time": "t", "exit_code": "3",
                               "stdout": ["no"]}, {"start_time": "t", "end_time": "t",
                                                   "exit_code": 2}]  # one executor only
    odd["logs"][0]["start_time"] = "t" * 10_000
    fake.json("GET", f"/tasks/{jobs[0]}", odd)
    fake.json("GET", "/tasks", {"tasks": [odd]})
    assert backend.poll(jobs)[jobs[0]].state == JobState.FAILED
    fold = read_event_log(tmp_path / "task0" / "events.jsonl", executors=1)
    assert fold.state == "EXECUTOR_ERROR" and fold.skipped == 0
    assert fold.task_log["outputs"] == [{"url": "s3://b/k", "path": "/out", "size_bytes": "12"}]
    assert fold.task_log["logs"] == [{"end_time": "t"}]
    assert fold.task_log["system_logs"][-1] == "remote: fine"


def test_endless_pages_and_redirects(fake: FakeTes, tmp_path: Path):
    backend, jobs = submitted(fake, tmp_path, 1)
    fake.json("GET", "/tasks", {"tasks": [{"id": "unrelated", "state": "COMPLETE"}],
                                "next_page_token": "same"})
    fake.json("GET", f"/tasks/{jobs[0]}", {"message": "gone"}, status=404)
    calls = len(fake.seen)
    status = backend.poll(jobs)[jobs[0]]
    assert status.state == JobState.LOST and "404" in status.reason
    assert len(fake.seen) - calls == 3  # two pages (the token repeats), one GET
    fake.json("GET", "/tasks", {"message": "moved"}, status=302)
    status = backend.poll(jobs)[jobs[0]]
    assert status.state == JobState.UNKNOWN and "HTTP 302" in status.reason
    assert not any(path == "/elsewhere" for _, path, _ in fake.seen)


def test_submit_answers(fake: FakeTes, tmp_path: Path):
    backend = TesBackend(tes_options(fake.url), tmp_path)
    cases = [((500, b'{"message": "busy"}'), True, "HTTP 500: busy"),
             ((429, b"slow down"), True, "HTTP 429: slow down"),
             ((400, b'{"message": "executors.0.image: bad"}'), False,
              "HTTP 400: executors.0.image: bad"),
             ((401, b"no"), False, "HTTP 401"),
             ((200, b'{"id": "../../admin"}'), False, "no usable task id"),
             ((200, b'{"id": 7}'), False, "no usable task id")]
    for n, ((status, body), transient, words) in enumerate(cases):
        fake.raw("POST", "/tasks", body, status=status)
        with pytest.raises(BackendError) as failed:
            backend.submit(request_for(tmp_path, f"t{n}", {"executors": [
                {"image": "busybox", "command": ["true"]}]}))
        assert failed.value.transient is transient, failed.value
        assert words in str(failed.value)


def test_secret_files_are_checked(tmp_path: Path):
    token = token_file(tmp_path / "secrets", mode=0o604)
    with pytest.raises(ValueError, match="may be read by others"):
        TesBackend(tes_options("http://127.0.0.1:9", token_file=str(token)), tmp_path)
    link = tmp_path / "link"
    os.symlink(token, link)
    with pytest.raises(ValueError, match="cannot open"):
        TesBackend(tes_options("http://127.0.0.1:9", token_file=str(link)), tmp_path)
    with pytest.raises(ValueError, match="not both"):
        TesBackend(tes_options("http://127.0.0.1:9", token_file=str(token), username="u",
                               password_file=str(token)), tmp_path)
    with pytest.raises(ValueError, match="not an http"):
        TesBackend(tes_options("file:///etc"), tmp_path)


def test_a_lost_submit_answer_never_makes_a_second_remote_task(fake: FakeTes, tmp_path: Path):
    """The POST reached the remote but its answer did not come back (503 here): the next
    try finds the task by the submission's tags instead of POSTing again, and while the
    remote made none, tries add no line to the task's log."""
    backend = TesBackend(tes_options(fake.url), tmp_path)
    request = request_for(tmp_path, "task0", {"executors": [
        {"image": "busybox", "command": ["true"]}]})
    fake.raw("POST", "/tasks", b"unavailable", status=503)
    fake.json("GET", "/tasks", {"tasks": []})
    for _ in range(3):
        with pytest.raises(BackendError) as failed:
            backend.submit(request)
        assert failed.value.transient
    log_file = tmp_path / "task0" / "events.jsonl"
    assert len(log_file.read_bytes().splitlines()) == 1  # the nonce, once
    posts = [query for method, path, query in fake.seen if method == "POST"]
    assert len(posts) == 3
    nonce = read_event_log(log_file).task_log["metadata"]["tes_submission"]
    fake.json("GET", "/tasks", {"tasks": [{"id": "made-by-the-lost-post", "tags": {
        backend.tag[0]: backend.tag[1], "funnel-hpc-task-id": "task0",
        "funnel-hpc-submission": nonce}}]})
    assert backend.submit(request) == "made-by-the-lost-post"
    assert len([1 for method, _, _ in fake.seen if method == "POST"]) == 3
    lookup = [query for method, path, query in fake.seen if method == "GET"][-1]
    assert lookup["tag_value"] == [backend.tag[1], "task0", nonce]
    assert read_event_log(log_file).task_log["metadata"]["remote_id"] == \
        "made-by-the-lost-post"


def test_config_show_masks_the_credential_files(tmp_path: Path):
    import subprocess

    import yaml

    from tests.server_helpers import clean_env, funnel_argv

    token = token_file(tmp_path / "secrets")
    config = tmp_path / "funnel.yaml"
    config.write_text(yaml.safe_dump({"work_dir": str(tmp_path / "work"), "backend": {
        "name": "tes", "tes": {"url": "https://tes.example.org", "token_file": str(token)}}}))
    shown = subprocess.run([*funnel_argv("config", "show", "--config", str(config))],
                           capture_output=True, text=True, env=clean_env(), timeout=60)
    assert shown.returncode == 0, shown.stderr
    tes = yaml.safe_load(shown.stdout)["backend"]["tes"]
    assert tes["token_file"] == "********" and tes["url"] == "https://tes.example.org"
    assert "remote-token" not in shown.stdout


def test_a_remote_giving_one_id_twice_is_refused(fake: FakeTes, tmp_path: Path):
    backend = TesBackend(tes_options(fake.url), tmp_path)
    fake.json("POST", "/tasks", {"id": "same"})
    task = {"executors": [{"image": "busybox", "command": ["true"]}]}
    assert backend.submit(request_for(tmp_path, "first", task)) == "same"
    with pytest.raises(BackendError, match="the id same of task first's remote task"):
        backend.submit(request_for(tmp_path, "second", task))


def test_a_walk_of_endless_pages_stops(fake: FakeTes, tmp_path: Path):
    backend, jobs = submitted(fake, tmp_path, 1)
    pages = iter(range(10**9))

    def endless(_query: dict) -> tuple[int, bytes]:
        return 200, json.dumps({"tasks": [{"id": "unrelated", "state": "QUEUED"}],
                                "next_page_token": f"t{next(pages)}"}).encode()

    fake.answers[("GET", "/ga4gh/tes/v1/tasks")] = endless
    fake.json("GET", f"/tasks/{jobs[0]}", {"message": "gone"}, status=404)
    status = backend.poll(jobs)[jobs[0]]
    assert status.state == JobState.LOST
    assert next(pages) == MAX_PAGES


def test_the_gateway_id_is_made_once(tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    from funnel_hpc.backends.tes import GATEWAY_ID_FILE, gateway_id

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _n: gateway_id(tmp_path / "work"), range(32)))
    assert len(ids) == 1
    path = tmp_path / "work" / GATEWAY_ID_FILE
    assert path.read_text().strip() in ids and (path.stat().st_mode & 0o777) == 0o600
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == [GATEWAY_ID_FILE]
    path.write_text("garbage\n")
    with pytest.raises(ValueError, match="not a gateway id"):
        gateway_id(tmp_path / "work")


@pytest.mark.parametrize(("task", "field"), [
    ({"inputs": [{"url": "FILE:///etc/passwd", "path": "/in"}]}, "inputs.0.url"),
    ({"inputs": [{"url": " file:///etc/passwd", "path": "/in"}]}, "inputs.0.url"),
    ({"inputs": [{"url": "s3://b/k", "path": "/a"}, {"url": "/etc/passwd", "path": "/b"}]},
     "inputs.1.url"),
    ({"outputs": [{"url": "relative/path", "path": "/out"}]}, "outputs.0.url"),
    ({"outputs": [{"url": "file:/tmp/x", "path": "/out"}]}, "outputs.0.url"),
])
def test_check_task_refuses_what_names_this_hosts_files(task: dict, field: str):
    reason = TesBackend.check_task({"executors": [], **task})
    assert reason is not None and reason.startswith(f"{field}: file:// URLs cannot reach")


def test_check_task_takes_reachable_urls_and_contents():
    assert TesBackend.check_task({"inputs": [
        {"url": "s3://b/k", "path": "/a"}, {"url": "https://h/x", "path": "/b"},
        {"content": "inline", "path": "/c"}, {"url": "file:///x", "content": "x", "path": "/d"}],
        "outputs": [{"url": "gs://b/o", "path": "/o"}], "executors": []}) is None


def test_recover_ignores_tasks_a_server_lists_without_filtering(fake: FakeTes, tmp_path: Path):
    """A server that ignores tag filters lists other tasks: none is taken for this
    submission's; the one whose tags match is."""
    backend = TesBackend(tes_options(fake.url), tmp_path)
    request_for(tmp_path, "task0", {"executors": [{"image": "busybox", "command": ["true"]}]})
    RemoteEventLog(tmp_path, "task0", 1).note({"tes_submission": "0123456789abcdef"})
    tag = {backend.tag[0]: backend.tag[1], "funnel-hpc-task-id": "task0"}
    unfiltered = [{"id": "someone-else", "state": "QUEUED", "tags": {}},
                  {"id": "other-try", "state": "QUEUED",
                   "tags": {**tag, "funnel-hpc-submission": "fedcba9876543210"}}]
    fake.json("GET", "/tasks", {"tasks": unfiltered})
    assert backend.recover("task0", tmp_path / "task0") is None
    mine = {"id": "mine", "state": "QUEUED",
            "tags": {**tag, "funnel-hpc-submission": "0123456789abcdef"}}
    fake.json("GET", "/tasks", {"tasks": [*unfiltered, mine]})
    assert backend.recover("task0", tmp_path / "task0") == "mine"
