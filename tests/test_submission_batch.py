"""The reconciler's batched submission: claims and records a thousand tasks a transaction,
backend.submit on several threads where the backend allows it, and every outcome of a
batch kept apart (a refusal fails its task only, an unreachable scheduler gives the
claim back)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from funnel_hpc.backends.base import Backend, BackendError, JobState, JobStatus, SubmitRequest
from funnel_hpc.core import config as config_mod
from funnel_hpc.gateway.reconcile.reconciler import Reconciler
from funnel_hpc.gateway.web.app import make_service
from tests.backend_helpers import NO_WORK_DIR, double_options

TRIVIAL = {"executors": [{"image": "busybox", "command": ["true"]}]}


class RecordingBackend(Backend):
    """A scheduler double that records each submission and the threads it ran on."""

    name = "recording"
    parallel_submit = True

    def __init__(self, refuse: set[str], unreachable: set[str]):
        super().__init__(double_options(), NO_WORK_DIR)
        self.refuse, self.unreachable = refuse, unreachable
        self.threads: set[str] = set()
        self.submitted: dict[str, str] = {}
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0

    def submit(self, request: SubmitRequest) -> str:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.threads.add(threading.current_thread().name)
        try:
            time.sleep(0.02)  # like an sbatch round trip
            assert (request.task_dir / "task.json").exists()
            if request.task["name"] in self.refuse:
                raise BackendError("sbatch: error: invalid partition")
            if request.task["name"] in self.unreachable:
                raise BackendError("Unable to contact slurm controller", transient=True)
            with self.lock:
                job_id = str(1000 + len(self.submitted))
                self.submitted[request.task_id] = job_id
            return job_id
        finally:
            with self.lock:
                self.in_flight -= 1

    def cancel(self, job_id: str) -> None:
        pass

    def poll(self, job_ids: list[str]) -> dict[str, JobStatus]:
        return {job_id: JobStatus(JobState.PENDING) for job_id in job_ids}


def make(tmp_path: Path, backend: Backend, threads: int = 4):
    config = config_mod.load(environ={}, overrides={
        "work_dir": str(tmp_path), "reconciler": {"submit_threads": threads}})
    service = make_service(config)
    return service, Reconciler(service, backend, config)


def test_batch_outcomes_are_kept_apart(tmp_path):
    backend = RecordingBackend(refuse={"bad"}, unreachable={"later"})
    service, reconciler = make(tmp_path, backend)
    ids = {f"ok{i}": service.create({**TRIVIAL, "name": f"ok{i}"}) for i in range(20)}
    bad = service.create({**TRIVIAL, "name": "bad"})
    later = service.create({**TRIVIAL, "name": "later"})

    stats = reconciler.tick()

    assert stats.submitted == 20
    assert len(backend.threads) > 1 and backend.most_in_flight > 1  # in parallel
    rows = {row.id: row for row in service.reconciler_queries.active_rows()}
    for task_id in ids.values():
        task = service.get(task_id, "FULL")
        assert task["state"] == "QUEUED"
        assert rows[task_id].job_id == backend.submitted[task_id]
        assert task["logs"][0]["metadata"]["job_id"] == backend.submitted[task_id]
        assert rows[task_id].attempt == 1
    assert len(set(backend.submitted.values())) == 20  # one job each, none twice
    refused = service.get(bad, "FULL")
    assert refused["state"] == "SYSTEM_ERROR"
    assert any("invalid partition" in line for line in refused["logs"][0]["system_logs"])
    # unreachable: the claim is given back, attempt unchanged, tried again next tick
    assert rows[later].job_id is None and rows[later].attempt == 0
    backend.unreachable.clear()
    assert reconciler.tick().submitted == 1
    assert service.get_row(later).job_id == backend.submitted[later]


def test_one_thread_when_the_backend_is_not_parallel(tmp_path):
    backend = RecordingBackend(set(), set())
    backend.parallel_submit = False
    service, reconciler = make(tmp_path, backend)
    for i in range(5):
        service.create({**TRIVIAL, "name": f"t{i}"})
    assert reconciler.tick().submitted == 5
    assert backend.most_in_flight == 1
    assert backend.threads == {threading.current_thread().name}


def test_cancel_during_submission_keeps_the_job_for_the_cancel(tmp_path, monkeypatch):
    backend = RecordingBackend(set(), set())
    service, reconciler = make(tmp_path, backend)
    task_id = service.create({**TRIVIAL, "name": "x"})
    original = backend.submit

    def submit_then_cancel(request):
        job_id = original(request)
        service.cancel(task_id)  # lands between the claim and the record
        return job_id

    monkeypatch.setattr(backend, "submit", submit_then_cancel)
    reconciler.tick()
    row = service.get_row(task_id)
    assert row.state == "CANCELING"
    assert row.job_id == backend.submitted[task_id]  # so the next tick cancels that job


def claimed_but_not_submitted(tmp_path: Path, backend: Backend):
    """A task as a gateway killed between the claim and the scheduler call leaves it."""
    service, reconciler = make(tmp_path, backend)
    task_id = service.create({**TRIVIAL, "name": "x"})
    assert service.reconciler_queries.claim_with_tasks([(task_id, 1)]).keys() == {task_id}
    # a new gateway process: a new reconciler on the same database and work dir
    return service, Reconciler(service, backend, reconciler.config), task_id


def test_claim_without_a_job_is_submitted_again_without_using_an_attempt(tmp_path):
    backend = RecordingBackend(set(), set())
    service, reconciler, task_id = claimed_but_not_submitted(tmp_path, backend)
    reconciler.tick()  # finds no job for the claim: gives it back
    reconciler.tick()
    row = service.get_row(task_id)
    assert row.state == "QUEUED" and row.attempt == 1
    assert row.job_id == backend.submitted[task_id]
    assert list(backend.submitted) == [task_id]  # once
    task = service.get(task_id, "FULL")
    assert len(task["logs"]) == 1 and not task["logs"][0].get("system_logs")


def test_claim_whose_job_exists_is_recovered_not_resubmitted(tmp_path, monkeypatch):
    backend = RecordingBackend(set(), set())
    monkeypatch.setattr(backend, "recover", lambda task_id, task_dir, owner=None: "4242")
    service, reconciler, task_id = claimed_but_not_submitted(tmp_path, backend)
    reconciler.tick()
    row = service.get_row(task_id)
    assert row.job_id == "4242" and row.attempt == 1
    assert not backend.submitted


def test_claim_whose_worker_ran_but_job_is_gone_is_a_system_error(tmp_path):
    backend = RecordingBackend(set(), set())
    service, reconciler, task_id = claimed_but_not_submitted(tmp_path, backend)
    events = tmp_path / task_id / "events.jsonl"
    events.parent.mkdir(parents=True, exist_ok=True)
    events.write_text(json.dumps({"seq": 1, "time": "2026-01-01T00:00:00Z", "task_id": task_id,
                                  "type": "state", "state": "INITIALIZING"}) + "\n")
    reconciler.tick()
    task = service.get(task_id, "FULL")
    assert task["state"] == "SYSTEM_ERROR"  # it ran once: never run it a second time
    assert not backend.submitted
    assert any("has no job for it" in line for line in task["logs"][-1]["system_logs"])


def test_a_failing_recover_holds_back_no_other_task(tmp_path, monkeypatch):
    """Measured before: an AWS Batch recover raising AccessDenied made every tick raise,
    and a second QUEUED task was never submitted. Now the failure stays with its task:
    the claim is kept (no job is made twice) and asked about again next tick."""
    backend = RecordingBackend(set(), set())
    asked = []

    def recover(task_id, task_dir, owner=None):
        asked.append(task_id)
        raise BackendError("list_jobs failed: An error occurred (AccessDeniedException) "
                           "when calling the ListJobs operation")

    monkeypatch.setattr(backend, "recover", recover)
    service, reconciler, claimed = claimed_but_not_submitted(tmp_path, backend)
    queued = service.create({**TRIVIAL, "name": "second"})
    for _ in range(3):
        reconciler.tick()  # does not raise
    assert asked == [claimed] * 3
    assert service.get_row(queued).job_id == backend.submitted[queued]
    row = service.get_row(claimed)
    assert row.job_id == "" and row.attempt == 1 and row.state == "QUEUED"  # still claimed
    assert claimed not in backend.submitted
    # the permissions are mended
    monkeypatch.setattr(backend, "recover", lambda task_id, task_dir, owner=None: "4242")
    reconciler.tick()
    assert service.get_row(claimed).job_id == "4242"


def test_recover_that_cannot_ask_keeps_the_claim_until_it_can(tmp_path, monkeypatch):
    """A scheduler outage during a restart: recover raises (transient), nothing is
    submitted again; once the scheduler answers, the job it had is adopted."""
    backend = RecordingBackend(set(), set())

    def cannot_ask(task_id, task_dir, owner=None):
        raise BackendError("squeue failed (1): Unable to contact slurm controller",
                           transient=True)

    monkeypatch.setattr(backend, "recover", cannot_ask)
    service, reconciler, claimed = claimed_but_not_submitted(tmp_path, backend)
    for _ in range(3):
        reconciler.tick()
    assert service.get_row(claimed).job_id == "" and not backend.submitted
    monkeypatch.setattr(backend, "recover", lambda task_id, task_dir, owner=None: "77")
    reconciler.tick()
    row = service.get_row(claimed)
    assert row.job_id == "77" and row.attempt == 1 and not backend.submitted


def test_a_poll_or_step_that_raises_is_isolated_per_task(tmp_path, monkeypatch):
    """poll must not raise (base.py); one that does leaves the jobs UNKNOWN for this tick,
    and submission still happens."""
    backend = RecordingBackend(set(), set())
    service, reconciler = make(tmp_path, backend)
    first = service.create({**TRIVIAL, "name": "first"})
    reconciler.tick()

    def broken_poll(job_ids):
        raise RuntimeError("a backend bug")

    monkeypatch.setattr(backend, "poll", broken_poll)
    second = service.create({**TRIVIAL, "name": "second"})
    reconciler.tick()
    assert service.get_row(second).job_id == backend.submitted[second]
    assert service.get_row(first).state == "QUEUED"


def test_claim_sets_each_tasks_own_attempt_in_few_statements(tmp_path, monkeypatch):
    """Claims are grouped by their new attempt number and cut into chunks of ids; each
    task gets its own attempt, and a claim made from an old read claims nothing."""
    from funnel_hpc.gateway.store import reconciler_queries

    monkeypatch.setattr(reconciler_queries, "CLAIM_CHUNK", 2)
    service, _ = make(tmp_path, RecordingBackend(set(), set()))
    queries = service.reconciler_queries
    first = [service.create({**TRIVIAL, "name": f"t{i}"}) for i in range(5)]
    retried = service.create({**TRIVIAL, "name": "retried"})
    assert queries.claim_with_tasks([(retried, 1)]).keys() == {retried}
    queries.release_claims([(retried, 1, 0)])  # as after attempt 1: attempt stays 1
    stale = service.create({**TRIVIAL, "name": "stale"})
    claims = [(task_id, 1) for task_id in first] + [(retried, 2), (stale, 3)]
    assert queries.claim_with_tasks(claims).keys() == {*first, retried}
    for task_id in first:
        row = service.get_row(task_id)
        assert (row.job_id, row.attempt) == ("", 1)
    assert service.get_row(retried).attempt == 2
    stale_row = service.get_row(stale)
    assert (stale_row.job_id, stale_row.attempt) == (None, 0)


def test_a_tick_claims_and_records_in_batches(tmp_path, monkeypatch):
    """A tick bigger than CLAIM_BATCH and RECORD_BATCH: claimed and recorded in several
    transactions, every task submitted once with its job recorded, refusals and the
    unreachable ones apart as in one batch."""
    from funnel_hpc.gateway.reconcile import submission
    from funnel_hpc.gateway.store.reconciler_queries import ReconcilerQueries

    monkeypatch.setattr(submission, "CLAIM_BATCH", 7)
    monkeypatch.setattr(submission, "RECORD_BATCH", 5)
    calls = {"claim_with_tasks": 0, "record_submissions": 0}
    for name in calls:
        real = getattr(ReconcilerQueries, name)

        def counted(self, *args, _real=real, _name=name):
            calls[_name] += 1
            return _real(self, *args)

        monkeypatch.setattr(ReconcilerQueries, name, counted)
    backend = RecordingBackend(refuse={"bad"}, unreachable={"later"})
    service, reconciler = make(tmp_path, backend)
    names = [f"ok{i}" for i in range(30)]
    names[11], names[23] = "bad", "later"
    ids = [service.create({**TRIVIAL, "name": name}) for name in names]
    assert reconciler.tick().submitted == 28
    assert calls["claim_with_tasks"] == 5  # 30 in sevens
    assert 6 <= calls["record_submissions"] <= 28  # fives as units settle, then the rest
    assert set(backend.submitted) == set(ids) - {ids[11], ids[23]}
    for task_id in backend.submitted:
        assert service.get_row(task_id).job_id == backend.submitted[task_id]
    assert service.get(ids[11])["state"] == "SYSTEM_ERROR"
    assert service.get_row(ids[23]).job_id is None  # given back
