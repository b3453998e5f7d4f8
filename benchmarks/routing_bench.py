"""Routing at POST: the cost of Router.route() with 50 rules (issue 28: <= 0.05 ms a rule).

50 rules of every `when` kind (tags, backend_parameters, resources ranges and zones,
owner, group), in process; the task is a realistic validated TES document (10 tags, 3
backend_parameters, 2 inputs) that only the last rule accepts, so every rule is tried.
Also timed: a task no rule accepts (every rule tried, then the 400 text built). The
reference, in the same run and process, is the create path's own validation of the same
document: the TES schema (load_task_lenient) and Admission's checks. Each figure is the
median of --rounds rounds of --calls calls, the three alternating round by round.

Usage: .venv/bin/python benchmarks/routing_bench.py [--rounds 7] [--calls 2000]
Results go to benchmarks/results/routing-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from funnel_hpc.core import config  # noqa: E402
from funnel_hpc.core.routing import Router, Unroutable, parse_rules  # noqa: E402
from funnel_hpc.gateway.store.admission import Admission  # noqa: E402
from funnel_hpc.gateway.store.tes_schemas import load_task_lenient  # noqa: E402

RULES = 50
TARGET_MS_PER_RULE = 0.05
INSTANCES = ["here", "gpu", "big", "partner"]


def rules() -> list[dict]:
    """49 rules the task misses, each after a condition or two it meets, then its rule."""
    out: list[dict] = []
    for n in range(10):
        out.append({"when": {"tags": {"project": "any", "site": f"partner-{n}"}},
                     "backend": "partner"})
        out.append({"when": {"backend_parameters": {"queue": f"q-{n}"}}, "backend": "gpu",
                     "overflow": ["here"], "max_queue_wait": "30m"})
        out.append({"when": {"resources": {"cpu_cores": {"min": 2, "max": 64},
                                           "zones": ["eu-1", "eu-2"],
                                           "ram_gb": {"min": 64 + n}}}, "backend": "big"})
        out.append({"when": {"owner": [f"user{n}", f"other{n}"]}, "backend": "here"})
        if n < 9:
            out.append({"when": {"group": [f"team{n}", "gpu-users"]}, "backend": "gpu"})
    out.append({"when": {"tags": {"project": "any"}, "resources": {"cpu_cores": {"max": 8}}},
                "backend": "here"})
    assert len(out) == RULES
    return out


def document(project: bool = True) -> dict:
    tags = {f"tag{n}": f"value-{n}" for n in range(9)}
    if project:
        tags["project"] = "genomes"
    return {
        "name": "align sample 17",
        "inputs": [{"url": f"s3://bucket/in/{n}.fastq", "path": f"/data/{n}.fastq"}
                   for n in range(2)],
        "outputs": [{"url": "s3://bucket/out/aligned.bam", "path": "/data/aligned.bam"}],
        "executors": [{"image": "busybox", "command": ["sh", "-c", "cat /data/*.fastq | wc"],
                       "env": {"SAMPLE": "17"}}],
        "resources": {"cpu_cores": 4, "ram_gb": 8, "disk_gb": 20, "zones": ["eu-1"],
                      "backend_parameters": {"Queue": "normal", "account": "lab",
                                             "gpus": "0"}},
        "tags": tags,
    }


def per_call_ms(action: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        action()
    return (time.perf_counter() - started) / calls * 1000


def measure(rounds: int = 7, calls: int = 2000) -> dict:
    router = Router(parse_rules(rules(), INSTANCES), INSTANCES[0])
    task, lost = document(), document(project=False)
    groups = frozenset({"staff", "users"})
    assert router.route(task, "alice", groups).rule == RULES - 1

    def refuse() -> None:
        try:
            router.route(lost, "alice", groups)
        except Unroutable:
            return
        raise AssertionError("a task no rule accepts was routed")

    with tempfile.TemporaryDirectory(prefix="funnel-routing-bench-") as work:
        admission = Admission(config.load(environ={}, overrides={"work_dir": work}))

        def validate() -> None:
            spec, _ = load_task_lenient(task)
            admission.check_task(spec)
            admission.admit_backend_parameters(spec)

        validate()
        route_ms, refuse_ms, validate_ms = [], [], []
        for _ in range(rounds):
            route_ms.append(per_call_ms(lambda: router.route(task, "alice", groups), calls))
            refuse_ms.append(per_call_ms(refuse, calls))
            validate_ms.append(per_call_ms(validate, max(1, calls // 10)))
    route, refused = statistics.median(route_ms), statistics.median(refuse_ms)
    validation = statistics.median(validate_ms)
    return {"rules": RULES, "rounds": rounds, "calls": calls,
            "route_ms": route, "route_ms_per_rule": route / RULES,
            "unroutable_ms": refused, "unroutable_ms_per_rule": refused / RULES,
            "validation_ms": validation, "route_ms_runs": route_ms,
            "unroutable_ms_runs": refuse_ms, "validation_ms_runs": validate_ms}


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's `routing` row and the raw figures."""
    r = measure(3 if quick else 7, 500 if quick else 2000)
    worst = max(r["route_ms_per_rule"], r["unroutable_ms_per_rule"])
    low, high = (ms * 1000 / RULES for ms in (min(r["route_ms_runs"]), max(r["route_ms_runs"])))
    row = {"figure": f"routing at POST, {RULES} rules (the last one matches)",
           "measured": f"{r['route_ms_per_rule'] * 1000:.2f} us a rule (rounds {low:.2f}-"
                       f"{high:.2f}; {r['route_ms']:.3f} ms a task; refused by all, with the "
                       f"400 text: {r['unroutable_ms_per_rule'] * 1000:.2f} us a rule)",
           "reference": f"the create path's validation of the same task "
                        f"{r['validation_ms']:.3f} ms",
           "ratio": r["route_ms"] / r["validation_ms"],
           "target": f"<= {TARGET_MS_PER_RULE} ms a rule",
           "met": worst <= TARGET_MS_PER_RULE}
    return [row], r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    r = measure(args.rounds, args.calls)
    print(f"{RULES} rules, the last one matching: {r['route_ms']:.4f} ms a task, "
          f"{r['route_ms_per_rule'] * 1000:.2f} us a rule (target {TARGET_MS_PER_RULE} ms)")
    print(f"refused by all {RULES}, the 400 text built: {r['unroutable_ms']:.4f} ms a task, "
          f"{r['unroutable_ms_per_rule'] * 1000:.2f} us a rule")
    print(f"the create path's validation of the same task: {r['validation_ms']:.4f} ms "
          f"(routing is {r['route_ms'] / r['validation_ms']:.2f} of it)")
    out = REPO / "benchmarks" / "results" / f"routing-{int(time.time())}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(r, indent=2))
    print(f"  written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
