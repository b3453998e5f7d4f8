"""API benchmark: create rate, list-page latency at 100k tasks, server RSS.

Run: .venv/bin/python benchmarks/api_bench.py [--db sqlite|postgres] [--creates 4000]
     [--stored 100000] [--create-only] [--repeat N]

Everything is measured in this one run, each figure beside its reference:
- create throughput with 8 concurrent client processes, vs a bare Flask
  endpoint on the same stack (waitress, same threads) doing one insert of the
  same JSON body into the same kind of database;
- list-page latency p50/p99 over every page of 100,000 stored tasks
  (MINIMAL and BASIC, default page size 256);
- server RSS after that.
Results go to benchmarks/results/api-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.server_helpers import DatabaseFactory, ServerProcess, free_port  # noqa: E402
from tests.test_pagination_scale import bulk_insert  # noqa: E402

TASK = {"name": "bench", "executors": [{"image": "busybox", "command": ["echo", "hi"]}],
        "tags": {"bench": "yes"}}
CLIENTS = 8

BARE_APP = r'''
import json, sys
from flask import Flask, request
from sqlalchemy import JSON, Column, Integer, MetaData, String, Table, insert
import waitress
sys.path.insert(0, sys.argv[3])
from funnel_hpc.gateway.store import db
md = MetaData()
t = Table("bare", md, Column("seq", Integer, primary_key=True), Column("id", String(64)),
          Column("doc", JSON))
engine = db.make_engine(sys.argv[1])
md.create_all(engine)
app = Flask("bare")
n = [0]
@app.post("/insert")
def ins():
    doc = json.loads(request.get_data())
    n[0] += 1
    with db.writing(engine) as conn:
        conn.execute(insert(t).values(id=str(n[0]), doc=doc))
    return {"id": str(n[0])}
@app.get("/ping")
def ping():
    return "ok"
waitress.serve(app, host="127.0.0.1", port=int(sys.argv[2]), threads=16, _quiet=True)
'''


def _client(args: tuple[str, int]) -> int:
    url, count = args
    session = requests.Session()
    for _ in range(count):
        resp = session.post(url, json=TASK, timeout=30)
        resp.raise_for_status()
    return count


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_creates(url: str, total: int, pid: int) -> tuple[float, float]:
    """Creates per second with CLIENTS processes, and the server's CPU ms per create (the
    figure other load on the machine disturbs least)."""
    per = total // CLIENTS
    with multiprocessing.Pool(CLIENTS) as pool:
        pool.map(_client, [(url, 5)] * CLIENTS)  # warm-up: connections, first inserts
        cpu, start = cpu_seconds(pid), time.perf_counter()
        done = sum(pool.map(_client, [(url, per)] * CLIENTS))
        elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    return done / elapsed, cpu * 1000 / done


def bare_reference(db_url: str, total: int) -> tuple[float, float]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE_APP, db_url, str(port), str(REPO)])
    try:
        for _ in range(100):
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.1)
        return measure_creates(f"http://127.0.0.1:{port}/insert", total, proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def list_latencies(server: ServerProcess, view: str) -> list[float]:
    session = requests.Session()
    token, latencies = None, []
    while True:
        params = {"view": view}
        if token:
            params["page_token"] = token
        start = time.perf_counter()
        resp = session.get(server.api + "/tasks", params=params, timeout=60)
        latencies.append(time.perf_counter() - start)
        resp.raise_for_status()
        token = resp.json().get("next_page_token")
        if not token:
            return latencies


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(db: str, creates: int = 4000, stored: int = 100_000) -> dict:
    """Every figure of this benchmark on one kind of database."""
    tmp = Path(tempfile.mkdtemp(prefix="funnel-bench-"))
    dbs = DatabaseFactory(tmp)
    results: dict = {}
    try:
        bare, bare_cpu = bare_reference(dbs.new(db), creates)
        server = ServerProcess(tmp / "create", dbs.new(db)).start()
        try:
            rate, cpu = measure_creates(server.api + "/tasks", creates, server.proc.pid)
            results["create_rss_mb"] = rss_mb(server.proc.pid)
        finally:
            server.stop()
        results.update(create_tasks_per_s=rate, bare_insert_per_s=bare, create_ratio=rate / bare,
                       create_server_cpu_ms=cpu, bare_server_cpu_ms=bare_cpu)
        if stored:
            results.update(list_figures(dbs.new(db), tmp, stored))
    finally:
        dbs.drop_all()
    results.update(db=db, creates=creates, stored=stored, clients=CLIENTS)
    return results


def list_figures(url: str, tmp: Path, stored: int) -> dict:
    """List-page latencies and server RSS with ``stored`` tasks in the database."""
    results: dict = {}
    bulk_insert(url, stored)
    server = ServerProcess(tmp / "list", url).start()
    try:
        for view in ("MINIMAL", "BASIC"):
            lat = list_latencies(server, view)
            results[f"list_{view.lower()}_pages"] = len(lat)
            results[f"list_{view.lower()}_p50_ms"] = percentile(lat, 0.5) * 1000
            results[f"list_{view.lower()}_p99_ms"] = percentile(lat, 0.99) * 1000
            results[f"list_{view.lower()}_mean_ms"] = statistics.mean(lat) * 1000
        results["server_rss_mb_at_stored"] = rss_mb(server.proc.pid)
    finally:
        server.stop()
    return results


CREATE_FIGURES = ("create_tasks_per_s", "bare_insert_per_s", "create_ratio",
                  "create_server_cpu_ms", "bare_server_cpu_ms")


def median_of(runs: list[dict]) -> dict:
    """The median of each create figure over repeated runs, and every run's values."""
    out: dict = {}
    for key in CREATE_FIGURES:
        values = [run[key] for run in runs]
        out[key] = statistics.median(values)
        out[key + "_runs"] = values
    return out


def summary_lines(r: dict) -> list[str]:
    lines = [(f"create ({r['db']}, {CLIENTS} client processes): "
              f"{r['create_tasks_per_s']:.0f} tasks/s, bare Flask insert "
              f"{r['bare_insert_per_s']:.0f}/s, ratio {r['create_ratio']:.2f}"),
             (f"server CPU per create: {r['create_server_cpu_ms']:.2f} ms, bare Flask insert "
              f"{r['bare_server_cpu_ms']:.2f} ms")]
    if len(r.get("create_tasks_per_s_runs", ())) > 1:
        lines += [f"  median of {len(r[key + '_runs'])} runs; {key}: "
                  + ", ".join(f"{value:.2f}" for value in r[key + "_runs"])
                  for key in CREATE_FIGURES]
    if not r["stored"]:
        return lines
    for view in ("minimal", "basic"):
        lines.append(f"list {view.upper()} at {r['stored']} tasks ({r['db']}): "
                     f"p50 {r[f'list_{view}_p50_ms']:.1f} ms, p99 {r[f'list_{view}_p99_ms']:.1f} ms"
                     f" ({r[f'list_{view}_pages']} pages of 256)")
    lines.append(f"server RSS ({r['db']}): {r['create_rss_mb']:.0f} MB after creates, "
                 f"{r['server_rss_mb_at_stored']:.0f} MB after listing {r['stored']} tasks")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--creates", type=int, default=4000)
    parser.add_argument("--stored", type=int, default=100_000)
    parser.add_argument("--create-only", action="store_true",
                        help="only the create figures (no listing at --stored tasks)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the create figures this many times; medians and spread")
    args = parser.parse_args()
    stored = 0 if args.create_only else args.stored
    runs = [measure(args.db, args.creates, stored if i == 0 else 0)
            for i in range(max(1, args.repeat))]
    results = {**runs[0], **median_of(runs)}
    machine = {"python": platform.python_version(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "date": datetime.now(UTC).isoformat()}
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"api-{args.db}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    print(f"API benchmark ({os.cpu_count()} CPUs)")
    for line in summary_lines(results):
        print("  " + line)
    print(f"  written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
