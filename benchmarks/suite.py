"""Every benchmark figure in one run, each beside its reference: `benchmarks/run`.

    benchmarks/run [--quick] [--update-docs] [--skip SECTION ...]

Sections (each measured with its physical reference in this same run):
  api        create throughput (8 clients) vs bare Flask insert; list p50/p99 at 100k
             tasks (MINIMAL, BASIC); server RSS at 100k: on SQLite and on PostgreSQL
  routing    Router.route() with 50 rules, per rule, vs the create path's validation of
             the same task (schema + admission), in process (benchmarks/routing_bench.py)
  latency    a trivial task end to end on the local backend vs the worker run directly,
             and on Slurm vs raw `sbatch` (its event log watched)
  throughput 1,000 and 10,000 trivial tasks QUEUED -> COMPLETE on Slurm, one job each,
             vs a raw sbatch loop of the same worker jobs (1,000 of them); that loop vs
             one of the bare container call; submission rate; reconciler CPU and
             scheduler calls per tick at 10,000 in flight; server RSS during the run
  worker     worker peak RSS while an executor writes 100 MB to stdout
  images     cold pull + unpack of the test image vs `skopeo copy` + `umoci unpack`; warm
             start of a trivial executor vs bare bwrap on the same root
  storage    S3 500 x 1 MB up + down, 8 at once vs one at a time and vs raw boto3 with 8
             threads (moto); 1 GiB local stage-in (hard link; reflink or copy) vs `cp`;
             1 GiB and 10 GiB inputs bound in place (bind_inputs) vs `cp`, from
             another file system;
             GS 200 MB up and down vs the raw google-cloud-storage client (emulator)
  worker     also: worker CPU for 100 MB of stdout with live logs on vs off
  events     event recording rate with sinks draining vs none; delivery latency (commit ->
             webhook, -> Redis reader); the 1,000-task Slurm run with webhook + Redis
             sinks vs without, same run
  reconciler idle tick CPU at 1k / 10k / 100k tasks in flight (simulated backend, in
             process); the tick with 1,000 tasks all sending live logs; the tick with
             1k / 10k QUEUED tasks whose owners are all at limits.per_owner
  replicas   failover gap after kill -9 of the lease holder vs the lease; create rate with
             2 replicas on PostgreSQL vs 1
  local      the local backend with 20,000 tasks queued through the API: hand-over time,
             idle tick CPU and server share of a core, disk per queued task (absolute
             bounds of issue 27); 200 trivial tasks to COMPLETE in the same run
  instances  1,000 tasks split over Slurm and Grid Engine at once: the gateway's CPU per
             task vs each half alone on its one instance (issue 28: <= 1.1x), and vs all
             on one Slurm instance
  tes        1,000 trivial tasks through a funnel-hpc forwarding to another (the tes
             backend) vs the same sent straight to such a server (tes_forward_bench.py)
  arrays     job arrays on Slurm (slurm_arrays.py): submission of 10,000 held tasks vs a
             one-sbatch-per-job loop and vs a raw sbatch --array; slurmctld RPCs (sdiag)
             for 1,000 tasks submitted and polled vs one job per task; 10,000 tasks
             QUEUED -> COMPLETE vs a raw array of the same worker jobs
  rest       Slurm REST mode (slurm_rest_poll.py): the reconciler's tick CPU (process +
             children) with 10,000 held tasks in flight submitted with arrays, mode rest
             vs mode cli in the same run (issue 29: <= 1x)
The new sections are thin calls into their own scripts' suite_rows(quick) (image_pull.py,
sandbox_start.py, storage_bench.py, events_bench.py), which also run alone.
The table is printed, written with machine facts to benchmarks/results/run-<time>.json,
and, with --update-docs (or its old name --update-readme), put between the bench
markers of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import (  # noqa: E402
    api_bench,
    bind_inputs_bench,
    events_bench,
    image_pull,
    instances_bench,
    local_bench,
    quotas_tick,
    reconciler_tick,
    replicas_bench,
    routing_bench,
    sandbox_start,
    slurm_arrays,
    slurm_bench,
    slurm_rest_poll,
    slurm_sinks,
    slurm_throughput,
    storage_bench,
    tes_forward_bench,
    worker_stdout,
)
from benchmarks.machine import machine_facts  # noqa: E402
from tests.server_helpers import DatabaseFactory  # noqa: E402

SECTIONS = ("api", "routing", "latency", "throughput", "worker", "images", "storage", "events",
            "reconciler", "replicas", "local", "instances", "tes", "arrays", "rest")
# the page whose table --update-docs rewrites, between these markers
BENCH_PAGE = REPO / "docs" / "benchmarks.md"
BENCH_START, BENCH_END = "<!-- bench:start -->", "<!-- bench:end -->"


class Table:
    """Rows of: figure, measured, reference, ratio, target, met."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, figure: str, measured: str, reference: str = "", ratio: float | None = None,
            target: str = "", met: bool | None = None) -> None:
        row = {"figure": figure, "measured": measured, "reference": reference,
               "ratio": None if ratio is None else round(ratio, 2), "target": target,
               "met": met}
        self.rows.append(row)
        print(f"  {figure}: {measured}" + (f" | ref {reference}" if reference else "")
              + (f" | ratio {ratio:.2f}" if ratio is not None else "")
              + (f" | target {target}" if target else "")
              + ("" if met is None else (": met" if met else ": MISSED")),
              flush=True)

    def markdown(self) -> str:
        lines = ["| Figure | Measured | Reference (same run) | Ratio | Target | Met |",
                 "|---|---|---|---|---|---|"]
        for r in self.rows:
            met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
            lines.append(f"| {r['figure']} | {r['measured']} | {r['reference']} | {ratio} "
                         f"| {r['target']} | {met} |")
        return "\n".join(lines)


def api_section(table: Table, results: dict, quick: bool) -> None:
    creates, stored = (1000, 20_000) if quick else (4000, 100_000)
    for db in ("sqlite", "postgres"):
        r = api_bench.measure(db, creates, stored)
        results[f"api_{db}"] = r
        table.add(f"create, 8 clients ({db})", f"{r['create_tasks_per_s']:.0f} tasks/s",
                  f"bare Flask insert {r['bare_insert_per_s']:.0f}/s", r["create_ratio"],
                  ">= 500/s" if db == "sqlite" else "",
                  r["create_tasks_per_s"] >= 500 if db == "sqlite" else None)
        for view in ("minimal", "basic"):
            p99 = r[f"list_{view}_p99_ms"]
            table.add(f"list {view.upper()} page at {stored:,} tasks ({db})",
                      f"p50 {r[f'list_{view}_p50_ms']:.1f} ms, p99 {p99:.1f} ms",
                      target="p99 < 50 ms", met=p99 < 50)
        rss = r["server_rss_mb_at_stored"]
        table.add(f"server RSS with {stored:,} tasks stored ({db})", f"{rss:.0f} MB",
                  target="< 200 MB", met=rss < 200)


def routing_section(table: Table, results: dict, quick: bool) -> None:
    add_rows(table, results, [("routing", routing_bench.suite_rows(quick))])


SCRATCH: list[Path] = []  # the running section's dirs, removed when it ends


def scratch(prefix: str) -> Path:
    """A new dir for the running section's files (task dirs, databases, job output):
    main removes it when the section ends, however it ends."""
    SCRATCH.append(Path(tempfile.mkdtemp(prefix=prefix)))
    return SCRATCH[-1]


def latency_section(table: Table, results: dict, quick: bool) -> None:
    runs = 3 if quick else 7
    tmp = scratch("funnel-latency-")
    dbs = DatabaseFactory(tmp)
    for kind, ref in (("local", "worker run directly"), ("slurm", "raw sbatch")):
        gateway = statistics.median(slurm_bench.gateway_latency(kind, tmp, dbs, runs))
        raw = statistics.median(slurm_bench.raw_latency(kind, tmp, runs))
        results[f"latency_{kind}"] = {"gateway_s": gateway, "raw_s": raw, "runs": runs}
        table.add(f"trivial task end to end ({kind}, median of {runs})",
                  f"{gateway * 1000:.0f} ms", f"{ref} {raw * 1000:.0f} ms", gateway / raw,
                  "<= 1.2x", gateway / raw <= 1.2)


def throughput_section(table: Table, results: dict, quick: bool) -> None:
    """The gateway's runs beside raw sbatch loops of the same worker jobs, which shows what
    the gateway adds (target 4), and of the bare container call, which shows what the
    worker costs a job (context). The 10,000-task run is held against the raw rate of the
    1,000-job loop: a second 10,000-job loop would take as long as the run itself, and
    the raw rate with 1,000 jobs queued is the higher one (a stricter reference)."""
    tmp = scratch("funnel-throughput-")
    dbs = DatabaseFactory(tmp)
    small, large = (300, None) if quick else (1000, 10_000)
    first = slurm_throughput.measure(small, tmp, dbs, ("worker", "container"))
    results[f"throughput_{small}"] = first
    raw, bare = first["raw"]["worker"], first["raw"]["container"]
    raw_rate, bare_rate = small / raw["seconds"], small / bare["seconds"]
    table.add(f"raw sbatch loops of {small:,} jobs: the worker vs the bare container call",
              f"worker jobs {raw_rate:.1f}/s", f"bare container jobs {bare_rate:.1f}/s",
              raw_rate / bare_rate, "context (the worker's own start)")
    runs = [(first, (f"raw sbatch loop of the same worker jobs {raw['seconds']:.0f} s, "
                     f"{raw_rate:.1f}/s"))]
    if large:
        second = slurm_throughput.measure(large, tmp, dbs, ())
        results[f"throughput_{large}"] = second
        runs.append((second, (f"raw sbatch loop of the same worker jobs, its rate on "
                              f"{small:,} jobs (above) {raw_rate:.1f}/s")))
    for r, reference in runs:
        n, g = r["tasks"], r["gateway"]
        complete, ratio = r["all_complete"], r["rate_per_s"] / raw_rate
        table.add(f"{n:,} trivial tasks QUEUED->COMPLETE on Slurm (rate)",
                  f"{g['seconds']:.0f} s, {r['rate_per_s']:.1f}/s, "
                  f"{'all' if complete else 'NOT all'} COMPLETE",
                  reference, ratio, ">= 0.8x", complete and ratio >= 0.8)
        submit_ratio = g["submit_rate_per_s"] / raw["submit_rate_per_s"]
        table.add(f"submission of {n:,} tasks (4 sbatch at once, jobs held)",
                  f"{g['submit_rate_per_s']:.0f} jobs/s",
                  f"raw sbatch loop {raw['submit_rate_per_s']:.0f} jobs/s",
                  submit_ratio, ">= 0.8x", submit_ratio >= 0.8)
        calls = g["scheduler_calls_per_tick"]
        table.add(f"reconciler tick, {n:,} jobs in flight",
                  f"CPU {g['tick_cpu_s_median'] * 1000:.0f} ms, scheduler calls {calls}",
                  target="calls constant", met=max(calls) <= 1)
        table.add(f"server RSS during the {n:,}-task run", f"{g['server_peak_rss_mb']:.0f} MB"
                  f" (reconciler process {g['reconciler_peak_rss_mb']:.0f} MB)",
                  target="< 200 MB", met=g["server_peak_rss_mb"] < 200)


STDOUT_100MB = ("i=0; while [ $i -lt 1600 ]; do head -c 65535 /dev/zero | tr '\\0' x; echo; "
                "i=$((i+1)); done")


def worker_section(table: Table, results: dict, quick: bool) -> None:
    work = scratch("funnel-worker-rss-")
    task = {"id": "rss100mb", "executors": [
        {"image": "busybox", "command": ["sh", "-c", STDOUT_100MB]}]}
    (work / "task.json").write_text(json.dumps(task))
    argv = slurm_bench.worker_argv(work / "task.json", work)
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0.0
    while proc.poll() is None:
        try:
            peak = max(peak, slurm_throughput.peak_rss_mb(proc.pid))
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    results["worker_rss_100mb_stdout_mb"] = peak
    table.add("worker peak RSS, 100 MB of stdout", f"{peak:.0f} MB (exit {proc.returncode})",
              target="< 100 MB", met=0 < peak < 100 and proc.returncode == 0)
    add_rows(table, results, [("worker_stdout", worker_stdout.suite_rows(quick))])


def add_rows(table: Table, results: dict, measured: list[tuple[str, tuple[list[dict], dict]]]
             ) -> None:
    """Rows and raw figures from scripts' suite_rows(quick)."""
    for name, (rows, raw) in measured:
        results[name] = raw
        for row in rows:
            table.add(**row)


def images_section(table: Table, results: dict, quick: bool) -> None:
    add_rows(table, results, [("image_pull", image_pull.suite_rows(quick)),
                              ("sandbox_start", sandbox_start.suite_rows(quick))])


def storage_section(table: Table, results: dict, quick: bool) -> None:
    add_rows(table, results, [("storage", storage_bench.suite_rows(quick)),
                              ("bind_inputs", bind_inputs_bench.suite_rows(quick))])


def events_section(table: Table, results: dict, quick: bool) -> None:
    add_rows(table, results, [("events", events_bench.suite_rows(quick)),
                              ("slurm_sinks", slurm_sinks.suite_rows(quick))])


def reconciler_section(table: Table, results: dict, quick: bool) -> None:
    add_rows(table, results, [("reconciler_tick", reconciler_tick.suite_rows(quick)),
                              ("quotas_tick", quotas_tick.suite_rows(quick))])


def replicas_section(table: Table, results: dict, quick: bool) -> None:
    add_rows(table, results, [("replicas", replicas_bench.suite_rows(quick))])


def local_section(table: Table, results: dict, quick: bool) -> None:
    add_rows(table, results, [("local", local_bench.suite_rows(quick))])


def instances_section(table: Table, results: dict, quick: bool) -> None:
    add_rows(table, results, [("instances", instances_bench.suite_rows(quick))])


def tes_section(table: Table, results: dict, quick: bool) -> None:
    add_rows(table, results, [("tes_forward", tes_forward_bench.suite_rows(quick))])


def arrays_section(table: Table, results: dict, quick: bool) -> None:
    """Job arrays (benchmarks/slurm_arrays.py); the 10,000-task run is also held against
    the throughput section's one-job-per-task run of as many tasks, when it ran."""
    n = 1000 if quick else 10_000
    per_job = results.get(f"throughput_{n}", {}).get("rate_per_s")
    add_rows(table, results, [("arrays", slurm_arrays.suite_rows(quick, per_job))])


def rest_section(table: Table, results: dict, quick: bool) -> None:
    add_rows(table, results, [("slurm_rest", slurm_rest_poll.suite_rows(quick))])


def update_page(markdown: str, facts: dict, page: Path = BENCH_PAGE) -> None:
    """Replace the table between page's bench markers with this run's."""
    text = page.read_text()
    if BENCH_START not in text or BENCH_END not in text:
        print(f"{page.relative_to(REPO)} has no bench markers; not updated")
        return
    head, rest = text.split(BENCH_START, 1)
    _, tail = rest.split(BENCH_END, 1)
    block = (f"{BENCH_START}\nMeasured by `benchmarks/run` on {facts['date'][:10]}: "
             f"{facts['cpus']} CPUs ({facts['cpu_model']}), {facts['memory_gib']} GiB, "
             f"{facts['slurm']}, {facts['postgresql']}, SQLite {facts['sqlite']}.\n\n"
             f"{markdown}\n{BENCH_END}")
    page.write_text(head + block + tail)
    print(f"table written to {page.relative_to(REPO)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes (a check that everything runs, not the figures)")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    parser.add_argument("--update-docs", "--update-readme", dest="update_docs",
                        action="store_true",
                        help="rewrite the table in docs/benchmarks.md with this run's")
    args = parser.parse_args()
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
    facts = machine_facts()
    table, results, timings = Table(), {}, {}
    started = time.monotonic()
    for name, section in (("api", api_section), ("routing", routing_section),
                          ("latency", latency_section),
                          ("throughput", throughput_section), ("worker", worker_section),
                          ("images", images_section), ("storage", storage_section),
                          ("events", events_section), ("reconciler", reconciler_section),
                          ("replicas", replicas_section), ("local", local_section),
                          ("instances", instances_section), ("tes", tes_section),
                          ("arrays", arrays_section), ("rest", rest_section)):
        if name in args.skip:
            continue
        print(f"== {name}", flush=True)
        t0 = time.monotonic()
        try:
            section(table, results, args.quick)
        finally:
            while SCRATCH:
                shutil.rmtree(SCRATCH.pop(), ignore_errors=True)
        timings[name] = round(time.monotonic() - t0, 1)
    timings["total"] = round(time.monotonic() - started, 1)
    markdown = table.markdown()
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = out_dir / f"run-{stamp}{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps({"machine": facts, "quick": args.quick, "seconds": timings,
                               "table": table.rows, "results": results}, indent=2,
                              default=str))
    print()
    print(markdown)
    print(f"\nsections took {timings} s; written to {out.relative_to(REPO)}")
    if args.update_docs and not args.quick:
        update_page(markdown, facts)


if __name__ == "__main__":
    main()
