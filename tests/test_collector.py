"""The cyclic garbage collector paused for a reconciler tick (gateway/reconcile/collector.py):
off inside, on again after the last of nested pauses, and left off when it was off."""

from __future__ import annotations

import gc
import threading

import pytest

from funnel_hpc.gateway.reconcile import collector


@pytest.fixture(autouse=True)
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_off_inside_on_after_even_when_the_block_raises():
    with collector.paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector.paused():
        raise RuntimeError("a tick failed")
    assert gc.isenabled()


def test_nested_pauses_of_two_reconciler_threads_end_with_the_last():
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with collector.paused():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with collector.paused():
            second_in.set()
            first_out.wait(10)
            seen["after the first ended"] = gc.isenabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"after the first ended": False}
    assert gc.isenabled()


def test_left_off_when_it_was_off():
    gc.disable()
    with collector.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_a_reconciler_tick_runs_with_the_collector_paused(tmp_path):
    from tests.test_submission_batch import TRIVIAL, RecordingBackend, make

    backend = RecordingBackend(set(), set())
    seen: list[bool] = []
    poll = backend.poll

    def poll_noting(job_ids):
        seen.append(gc.isenabled())
        return poll(job_ids)

    backend.poll = poll_noting  # type: ignore[method-assign]
    service, reconciler = make(tmp_path, backend, threads=1)
    service.create({**TRIVIAL, "name": "t"})
    reconciler.tick()  # submits
    reconciler.tick()  # polls the job
    assert seen == [False] and gc.isenabled()
    reconciler.stop()
