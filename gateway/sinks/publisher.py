"""The publisher: one thread per sink drains the outbox (gateway/store/outbox.py) into it.

Each sink has a cursor in ``event_cursors``; its thread reads the settled events after
it (at most ``events.batch_size``), drops those the sink's filter refuses, publishes
the rest in id order and only then moves the cursor (at least once, in order per task).
A failing sink keeps its cursor and is retried with doubling pauses from
``retry_min_seconds`` to ``retry_max_seconds``: its events wait in the database, the
on-disk queue, and the other sinks and the reconciler go on (the reconciler only
inserts rows). A new sink starts at the current end of the outbox. Events every sink
has taken and older than ``retention_hours`` are pruned. Deliveries, their latency and
failed attempts go to /metrics (gateway/ops/metrics.py). Cost per batch: two indexed
reads (three for a sink filtering by tags), one cursor update; idle, one read per
``poll_seconds`` per sink.

Several gateway replicas on one database each run publishers: sinks then see events
more than once (still in order); run the publisher on one replica (``events.publish``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Engine

from funnel_hpc.core.config import EventsSection
from funnel_hpc.gateway.ops import metrics
from funnel_hpc.gateway.sinks.targets import Sink, make_sinks
from funnel_hpc.gateway.store import db, outbox

log = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 600
LINGER_SECONDS = 0.05


class SinkWorker:
    """Drains the outbox into one sink, on its own thread."""

    def __init__(self, engine: Engine, sink: Sink, settings: EventsSection,
                 stop: threading.Event):
        self.engine = engine
        self.sink = sink
        self.batch_size = settings.batch_size
        self.poll = settings.poll_seconds
        self.retry_min = settings.retry_min_seconds
        self.retry_max = settings.retry_max_seconds
        self.gaps = outbox.GapGuard(settings.gap_grace_seconds)
        self.stop = stop
        metrics.start_sink(sink.name)
        self.failures = 0   # consecutive failed attempts (exported for tests and logs)
        self.delivered = 0
        self.looks = 0      # reads of the outbox
        with db.writing(engine) as conn:
            self.cursor = outbox.load_cursor(conn, sink.name, outbox.last_id(conn))

    def run(self) -> None:
        pause = self.retry_min
        while not self.stop.is_set():
            try:
                moved = self.step()
            except Exception as exc:  # noqa: BLE001 - loop boundary: a sink must not die
                self.failures += 1
                metrics.count_sink_failure(self.sink.name)
                log.warning("event sink %s: %s; retrying in %.1f s (events wait in the "
                            "outbox from id %d)", self.sink.name, exc, pause, self.cursor + 1)
                self.stop.wait(pause)
                pause = min(pause * 2, self.retry_max)
                continue
            self.failures, pause = 0, self.retry_min
            if moved == 0:
                self.stop.wait(self.poll)
            elif moved < self.batch_size:
                # caught up: let a few more events come so that a busy outbox is read in
                # batches, not one transaction pair per event (Kafka's linger.ms)
                self.stop.wait(min(self.poll, LINGER_SECONDS))

    def step(self) -> int:
        """Publish one batch; how many events the cursor moved over."""
        self.looks += 1
        with db.reading(self.engine) as conn:
            upto = self.gaps.settled(conn, self.cursor, self.batch_size)
            if upto == self.cursor:
                return 0
            events = outbox.read(conn, self.cursor, upto, limit=self.batch_size)
            tags = (outbox.tags_of(conn, [event.task_id for event in events])
                    if self.sink.wants_tags else {})
        wanted = [event for event in events if self.sink.accepts(event, tags.get(event.task_id,
                                                                                 {}))]
        if wanted:
            self.sink.publish(wanted)
            metrics.observe_delivered(self.sink.name, [event.time for event in wanted])
        with db.writing(self.engine) as conn:
            outbox.save_cursor(conn, self.sink.name, upto)
        self.cursor = upto
        self.delivered += len(wanted)
        return len(events)


class Publisher:
    """Starts and stops the sink threads of an ``events:`` configuration."""

    def __init__(self, engine: Engine, events_config: EventsSection,
                 sinks: Sequence[Sink] | None = None):
        self.engine = engine
        self.config = events_config
        self.stop_event = threading.Event()
        chosen = make_sinks(events_config) if sinks is None else sinks
        self.workers = [SinkWorker(engine, sink, events_config, self.stop_event)
                        for sink in chosen]
        self.threads: list[threading.Thread] = []

    def start(self) -> Publisher:
        for worker in self.workers:
            self._spawn(worker.run, f"events-{worker.sink.name}")
        self._spawn(self._prune_loop, "events-prune")
        return self

    def _spawn(self, target: Any, name: str) -> None:
        nice = self.config.nice

        def run() -> None:
            lower_priority(nice)
            target()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def stop(self, timeout: float = 5) -> None:
        """Stop the threads (a batch in flight finishes or times out first)."""
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout)

    def _prune_loop(self) -> None:
        while not self.stop_event.wait(PRUNE_EVERY_SECONDS):
            try:
                self.prune()
            except Exception as exc:  # noqa: BLE001 - loop boundary: pruning is best effort
                log.warning("event outbox pruning failed: %s", exc)

    def prune(self) -> int:
        """Delete events older than ``retention_hours`` that every sink has taken."""
        from datetime import UTC, datetime, timedelta

        hours = self.config.retention_hours
        if hours <= 0:
            return 0
        below = min((worker.cursor for worker in self.workers), default=None)
        cutoff = (datetime.now(UTC) - timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%S")
        with db.writing(self.engine) as conn:
            return outbox.prune(conn, None if below is None else below + 1, cutoff)


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by `nice` (Linux schedules threads one by
    one): on a busy login node the API and the reconciler go first, and events wait in
    the outbox, which keeps them. Best effort: elsewhere the thread keeps its priority."""
    if nice <= 0:
        return
    try:
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + nice))
    except (AttributeError, OSError) as exc:
        log.info("event sink threads keep the server's CPU priority: %s", exc)


def start_publisher(engine: Engine, events_config: EventsSection) -> Publisher | None:
    """Start the configured sinks' threads and the outbox pruning (None when
    ``events.publish`` is off on this replica)."""
    if not events_config.publish:
        return None
    publisher = Publisher(engine, events_config)
    if publisher.workers:
        log.info("publishing task events to %s",
                 ", ".join(worker.sink.name for worker in publisher.workers))
    return publisher.start()
