"""Where the Slurm sinks benchmark sends events: a webhook receiver and Redis streams."""

from __future__ import annotations

import os
import time
from typing import Any

from sqlalchemy import func, select

from funnel_hpc.gateway.store import db, outbox
from tests.events_helpers import ReceiverProcess

SINK_SECRET = "bench-secret"
REDIS_URL = "redis://127.0.0.1:6379/0"


class SinkEndpoints:
    """A webhook receiver in its own process (tests/events_helpers.py: it checks the HMAC
    of every event) and, when Redis answers on 127.0.0.1:6379 (scripts/setup/60-broker.sh),
    streams under a prefix of this run."""

    def __init__(self) -> None:
        self.prefix = f"funnel-bench-{os.getpid()}-{int(time.time())}:"
        self.redis = _redis_client()
        self.receiver = ReceiverProcess(SINK_SECRET)
        self.url = self.receiver.url

    def events_config(self) -> dict:
        config: dict = {"webhooks": [{"name": "bench", "url": self.url, "secret": SINK_SECRET}]}
        if self.redis is not None:
            config["redis"] = {"url": REDIS_URL, "stream_prefix": self.prefix, "maxlen": 0}
        return config

    def redis_events(self) -> int | None:
        if self.redis is None:
            return None
        return sum(int(self.redis.xlen(key)) for key in self.redis.scan_iter(self.prefix + "*"))

    def wait_delivered(self, engine: Any, timeout: float = 300) -> dict:
        """Wait until every sink has as many events as the outbox holds (or timeout); what
        each got, and whether every task's events all reached the webhook."""
        with db.reading(engine) as conn:
            recorded = dict(conn.execute(select(outbox.event_outbox.c.task_id, func.count())
                                         .group_by(outbox.event_outbox.c.task_id)).all())
        total, start = sum(recorded.values()), time.perf_counter()
        while True:
            tally = self.receiver.tally()
            at_redis = self.redis_events()
            if (tally["events"] >= total and (at_redis is None or at_redis >= total)) \
                    or time.perf_counter() - start > timeout:
                break
            time.sleep(0.5)
        per_task = tally["per_task"]
        return {"recorded": total, "webhook": tally["events"], "redis": at_redis,
                "bad_signatures": tally["bad_signatures"],
                "every_task_complete_at_webhook": all(per_task.get(task_id, 0) >= count
                                                      for task_id, count in recorded.items()),
                "drain_seconds": time.perf_counter() - start}

    def close(self) -> None:
        if self.redis is not None:
            for key in list(self.redis.scan_iter(self.prefix + "*")):
                self.redis.delete(key)
        self.receiver.close()


def _redis_client() -> Any:
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        client.ping()
    except Exception:  # noqa: BLE001 - no broker here: the webhook alone is measured
        return None
    return client
