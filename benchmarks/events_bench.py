"""Event sinks benchmark: delivery latency (recorded -> at the sink) and what the sinks
cost the writer that records events.

Run: .venv/bin/python benchmarks/events_bench.py [--events 2000] [--rate 200]

Measured in this one run, on a SQLite outbox (PostgreSQL: --db-url):
- recording cost: events recorded one transaction each as fast as possible, with no sink
  running and then with a webhook sink and (when reachable) the Redis sink of
  scripts/setup/60-broker.sh draining at the same time; the ratio is the share of the
  writer's rate the sinks leave (the issue's >= 0.95 target applies to whole task runs);
- latency p50/p99 at --rate events/s: recorded (after commit) -> received by a webhook
  receiver on 127.0.0.1 / by a Redis consumer blocked in XREAD on the stream.
Results go to benchmarks/results/events-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from funnel_hpc.gateway.sinks.publisher import Publisher  # noqa: E402
from funnel_hpc.gateway.sinks.targets import RedisStreamSink, Sink, WebhookSink  # noqa: E402
from funnel_hpc.gateway.store import db, outbox  # noqa: E402
from tests.events_helpers import WebhookReceiver, events_settings, outbox_engine  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/0"


def record_many(engine, count: int, rate: float | None = None) -> dict[int, float]:
    """Record count events (rate per second, or as fast as possible); id -> commit time."""
    committed = {}
    start = time.monotonic()
    for n in range(count):
        if rate:
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        with db.writing(engine) as conn:
            event_id = outbox.record(conn, f"task{n % 200}", "bench", "state", {"n": n})
        committed[event_id] = time.time()
    return committed


def redis_sink(prefix: str) -> RedisStreamSink | None:
    try:
        import redis

        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except Exception:  # noqa: BLE001 - no broker here: the figure is left out
        return None
    return RedisStreamSink("redis", REDIS_URL, prefix, maxlen=0)


def recording_rate(where: str, count: int, sinks: list[Sink]) -> float:
    engine = outbox_engine(where)
    publisher = Publisher(engine, events_settings(poll_seconds=0.25), sinks=sinks).start()
    try:
        start = time.monotonic()
        record_many(engine, count)
        return count / (time.monotonic() - start)
    finally:
        publisher.stop()


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 1),
            "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 1)}


def latency(where: str, count: int, rate: float, receiver: WebhookReceiver,
            arrivals: dict[int, float]) -> dict:
    """Record at a steady rate; delivery latency at the webhook and at a Redis reader."""
    prefix = f"bench-{os.getpid()}:"
    engine = outbox_engine(where)
    sinks: list[Sink] = [WebhookSink("webhook:bench", receiver.url, secret=receiver.secret)]
    broker = redis_sink(prefix)
    read_at: dict[int, float] = {}
    if broker:
        sinks.append(broker)
        threading.Thread(target=read_stream, args=(prefix + "state", count, read_at),
                         daemon=True).start()
    publisher = Publisher(engine, events_settings(poll_seconds=0.25), sinks=sinks).start()
    try:
        committed = record_many(engine, count, rate)
        deadline = time.monotonic() + 120
        while (len(arrivals) < count or (broker and len(read_at) < count)) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        result = {"webhook": percentiles([arrivals[i] - t for i, t in committed.items()])}
        if broker:
            result["redis"] = percentiles([read_at[i] - t for i, t in committed.items()])
            broker.client.delete(prefix + "state")
        return result
    finally:
        publisher.stop()


def read_stream(stream: str, count: int, read_at: dict[int, float]) -> None:
    """A Redis consumer: XREAD BLOCK from the start, noting when each entry arrives."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    last = "0"
    while len(read_at) < count:
        for _, entries in client.xread({stream: last}, block=1000) or []:
            now = time.time()
            for entry_id, _fields in entries:
                read_at[int(entry_id.split(b"-")[0])] = now
                last = entry_id


def measure(events: int, rate: float, db_url: str = "") -> dict:
    """Recording rate without and with sinks, then delivery latency (module docstring)."""
    arrivals: dict[int, float] = {}
    receiver = WebhookReceiver("bench-secret", on_event=lambda event: arrivals.setdefault(
        event["id"], time.time())).start()
    with tempfile.TemporaryDirectory() as tmp:
        def where(name: str) -> str:
            return db_url or f"sqlite:///{tmp}/{name}.db"

        bare = recording_rate(where("bare"), events, [])
        sinks: list[Sink] = [WebhookSink("webhook:bench", receiver.url, secret="bench-secret")]
        broker = redis_sink(f"bench-rate-{os.getpid()}:")
        if broker:
            sinks.append(broker)
        with_sinks = recording_rate(where("sinks"), events, sinks)
        if broker:
            broker.client.delete(broker.stream("state"))
        arrivals.clear()
        lat = latency(where("latency"), events, rate, receiver, arrivals)
    return {"time": datetime.now(UTC).isoformat(), "cpus": os.cpu_count(),
            "events": events, "record_per_s_no_sinks": round(bare),
            "record_per_s_with_sinks": round(with_sinks),
            "ratio": round(with_sinks / bare, 3), "redis": broker is not None,
            "latency_rate_per_s": rate, "latency": lat}


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's `events` rows (SQLite outbox) and the raw figures."""
    r = measure(300 if quick else 2000, 200)
    sinks = "webhook + Redis" if r["redis"] else "webhook (no Redis here)"
    rows = [{"figure": f"event recording, {r['events']:,} events, {sinks} draining",
             "measured": f"{r['record_per_s_with_sinks']:,} events/s",
             "reference": f"no sink running {r['record_per_s_no_sinks']:,} events/s",
             "ratio": r["ratio"], "target": "context (>= 0.95 is for whole task runs)"}]
    for sink, figures in r["latency"].items():
        rows.append({"figure": f"event delivery latency, commit -> {sink} "
                               f"({r['latency_rate_per_s']:.0f} events/s)",
                     "measured": f"p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms",
                     "target": "context (publisher poll 0.25 s)"})
    return rows, r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--db-url", default="")
    args = parser.parse_args()
    results = measure(args.events, args.rate, args.db_url)
    out = REPO / "benchmarks" / "results" / f"events-{int(time.time())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"  written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
