"""One reconciler per backend instance, in one process.

Each configured instance (config.instances()) gets its own Reconciler, thread, lease
(named after the instance), backend object, poll, health row and metrics label; with
several, each sees only its instance's tasks (ReconcilerQueries.for_instance) and wakes
on its own event: the store's one `changed` event is relayed to all of them by a small
fan-out thread, so no reconciler clears a wake-up meant for another. A backend that
learns of a job's end by itself, and a lease just taken, wake only their own reconciler.
Threads share nothing else: a scheduler that hangs (a submit waiting out its
command_timeout) or fails stalls its own instance only.

Cost: one thread per instance, plus the relay (one Event.wait) when there are several.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from funnel_hpc.backends.registry import load_backend
from funnel_hpc.core.config import Config
from funnel_hpc.gateway.reconcile.reconciler import Reconciler
from funnel_hpc.gateway.store import leases
from funnel_hpc.gateway.store.tasks import TaskService


class WakeFanout:
    """Relays one event (the store's `changed`) to one event per reconciler."""

    def __init__(self, source: threading.Event):
        self.source = source
        self.targets: list[threading.Event] = []
        self._stopping = False

    def event(self) -> threading.Event:
        """A new event, set whenever the source is."""
        target = threading.Event()
        self.targets.append(target)
        return target

    def start(self) -> None:
        threading.Thread(target=self._relay, name="reconciler-wakeups", daemon=True).start()

    def stop(self) -> None:
        self._stopping = True
        self.source.set()

    def _relay(self) -> None:
        # cleared before the targets are set: a set() after the clear wakes the next wait,
        # so no wake-up is lost between the two
        while not self._stopping:
            self.source.wait()
            self.source.clear()
            for target in self.targets:
                target.set()


class Reconcilers:
    """Every configured backend instance's reconciler in this process (or only one,
    `only`: `funnel reconcile --backend NAME`)."""

    def __init__(self, config: Config, service: TaskService, only: str | None = None):
        names = [config.instance(only).name] if only else list(config.backends)
        several = len(config.backends) > 1
        self.fanout = WakeFanout(service.changed) if several else None
        self.reconcilers: list[Reconciler] = []
        for name in names:
            wakeup = self.fanout.event() if self.fanout is not None else service.changed
            # one active reconciler per instance across replicas (gateway/store/leases.py)
            lease = leases.make_lease(config, service.engine, wakeup.set, name)
            backend = load_backend(config.instance(name), config.work_dir, on_change=wakeup.set)
            queries = service.reconciler_queries.for_instance(name) if several else None
            self.reconcilers.append(Reconciler(service, backend, config, lease=lease,
                                               queries=queries, wakeup=wakeup))

    def __iter__(self) -> Iterator[Reconciler]:
        return iter(self.reconcilers)

    def start(self) -> None:
        """The leases' heartbeats, the relay and one thread per reconciler."""
        for reconciler in self.reconcilers:
            reconciler.lease.start()
        if self.fanout is not None:
            self.fanout.start()
        for reconciler in self.reconcilers:
            reconciler.start_thread()

    def run_forever(self) -> None:
        """start(), then wait (for `funnel reconcile`: SIGTERM ends it via SystemExit)."""
        self.start()
        forever = threading.Event()
        while not forever.wait(1.0):
            pass

    def release(self) -> None:
        """Stop every reconciler and give its lease up at once (a clean stop)."""
        for reconciler in self.reconcilers:
            reconciler.stop()
            reconciler.lease.release()
        if self.fanout is not None:
            self.fanout.stop()
