"""Cold image pull + unpack through funnel_hpc.worker.images vs skopeo + umoci.

Run: .venv/bin/python benchmarks/image_pull.py [--runs 11] [--big-mb 0]
(needs scripts/setup/45-registry.sh: the registry on 127.0.0.1:5055 and its CA).

For each image, median of --runs cold runs (empty cache each time) of:
- ours, as a process: `python -c "ensure_rootfs(...)"` (interpreter start, imports, pull, unpack);
- ours, in process: ensure_rootfs timed inside that process (what a running worker pays,
  the first import of the registry client, http.client and ssl included);
- the reference: `skopeo copy docker://... oci:DIR:tag` then `umoci unpack --rootless`
  (skopeo with --src-tls-verify=false: it reads CAs only from *.crt files in a directory).
Runs alternate in pairs, ours first in one pair and second in the next (ABBA), so that a
load change on the machine hits both sides alike. Each figure comes with its spread: the
quartiles of its runs, and of the per-pair ratios, so that one noisy run cannot decide the
row. CPU seconds (user + system of the child processes) are reported beside the wall times
as a less load-sensitive check. Ratios > 1 mean ours is slower. --big-mb N also
builds and pushes an image with an N MB layer (funnel/bench-big:N) to compare throughput
rather than fixed costs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REGISTRY = "127.0.0.1:5055"
BASE = Path("/var/lib/funnel-test/registry")
CA_FILE = BASE / "tls" / "cert.pem"
PULL = """
import sys, time, json
start = time.perf_counter()
from funnel_hpc.worker.images import ensure_rootfs
root = ensure_rootfs(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
cold = time.perf_counter() - start
start = time.perf_counter()
ensure_rootfs(sys.argv[1], sys.argv[2], {})
print(json.dumps({"in_process": cold, "warm": time.perf_counter() - start}))
"""


def timed(argv: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, proc.stdout


def cpu_seconds() -> float:
    """User + system CPU time of all waited-for child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def with_cpu(run, *args) -> tuple:
    before = cpu_seconds()
    result = run(*args)
    return result, cpu_seconds() - before


def ours(image: str, tmp: Path) -> dict:
    cache = tmp / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    settings = json.dumps({REGISTRY: {"ca_file": str(CA_FILE)}})
    seconds, out = timed([sys.executable, "-c", PULL, image, str(cache), settings])
    return {"process": seconds, **json.loads(out.strip().splitlines()[-1])}


def reference(image: str, tmp: Path) -> float:
    layout, bundle = tmp / "layout", tmp / "bundle"
    for path in (layout, bundle):
        shutil.rmtree(path, ignore_errors=True)
    tag = image.rsplit(":", 1)[1]
    first, _ = timed(["skopeo", "copy", "-q", "--src-tls-verify=false",
                      f"docker://{image}", f"oci:{layout}:{tag}"])
    second, _ = timed(["umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}", str(bundle)])
    return first + second


def python_start() -> float:
    return timed([sys.executable, "-c", "pass"])[0]


def build_big(megabytes: int) -> str:
    """Push funnel/bench-big:N: busybox plus an N MB file (half random, half text)."""
    image = f"{REGISTRY}/funnel/bench-big:{megabytes}"
    with tempfile.TemporaryDirectory() as tmp:
        layout, bundle = Path(tmp) / "layout", Path(tmp) / "bundle"
        shutil.copytree(BASE / "oci" / "busybox", layout)
        subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:latest",
                        str(bundle)], check=True, capture_output=True)
        with open(bundle / "rootfs" / "big.bin", "wb") as out:
            line = b"funnel benchmark line of fairly compressible text\n"
            for _ in range(megabytes // 2):
                out.write(os.urandom(1 << 20))
                out.write(line * ((1 << 20) // len(line)))
        subprocess.run(["umoci", "repack", "--image", f"{layout}:latest", str(bundle)],
                       check=True, capture_output=True)
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                        f"oci:{layout}:latest", f"docker://{image}"], check=True)
    return image


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); all three the value itself for one run."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    low, middle, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, middle, high


def measure(image: str, runs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="image-bench-") as tmp:
        ours(image, Path(tmp))  # warm the page cache and the registry for both sides
        reference(image, Path(tmp))
        mine, theirs = [], []
        for index in range(runs):  # alternating, see the module docstring
            sides = [("ours", ours), ("reference", reference)]
            for side, run in sides if index % 2 == 0 else sides[::-1]:
                result, cpu = with_cpu(run, image, Path(tmp))
                if side == "ours":
                    mine.append({**result, "cpu": cpu})
                else:
                    theirs.append({"wall": result, "cpu": cpu})
    figures = {f"ours_{key}": quartiles([run[key] for run in mine]) for key in mine[0]}
    figures["reference"] = quartiles([run["wall"] for run in theirs])
    figures["reference_cpu"] = quartiles([run["cpu"] for run in theirs])
    pair_ratios = quartiles([a["process"] / b["wall"] for a, b in zip(mine, theirs, strict=True)])
    median = {key: value[1] for key, value in figures.items()}
    return {"image": image, "runs": runs,
            "ours_process_s": round(median["ours_process"], 4),
            "ours_in_process_s": round(median["ours_in_process"], 4),
            "ours_warm_s": round(median["ours_warm"], 6),
            "reference_s": round(median["reference"], 4),
            "ratio_process": round(median["ours_process"] / median["reference"], 3),
            "ratio_in_process": round(median["ours_in_process"] / median["reference"], 3),
            "ours_cpu_s": round(median["ours_cpu"], 4),
            "reference_cpu_s": round(median["reference_cpu"], 4),
            "ratio_cpu": round(median["ours_cpu"] / median["reference_cpu"], 3),
            "pair_ratio_quartiles": [round(value, 3) for value in pair_ratios],
            "quartiles_s": {key: [round(v, 4) for v in value] for key, value in figures.items()}}


def suite_rows(quick: bool) -> tuple[list[dict], dict]:
    """benchmarks/suite.py's `images` rows (the test image, cold) and the raw figures."""
    r = measure(f"{REGISTRY}/funnel/testimage:1", 3 if quick else 11)
    ours_q, ref_q = r["quartiles_s"]["ours_process"], r["quartiles_s"]["reference"]
    low, _, high = r["pair_ratio_quartiles"]
    row = {"figure": f"cold pull + unpack of the test image (median of {r['runs']}, "
                     "ABBA pairs)",
           "measured": f"{r['ours_process_s'] * 1000:.0f} ms as a process "
                       f"(IQR {ours_q[0] * 1000:.0f}-{ours_q[2] * 1000:.0f}; "
                       f"{r['ours_in_process_s'] * 1000:.0f} ms in process; "
                       f"CPU {r['ours_cpu_s']:.2f} s)",
           "reference": f"skopeo copy + umoci unpack {r['reference_s'] * 1000:.0f} ms "
                        f"(IQR {ref_q[0] * 1000:.0f}-{ref_q[2] * 1000:.0f}; "
                        f"CPU {r['reference_cpu_s']:.2f} s); per-pair ratio IQR "
                        f"{low:.2f}-{high:.2f}",
           "ratio": round(r["ratio_process"], 2), "target": "<= 1.2x",
           "met": r["ratio_process"] <= 1.2}
    return [row], r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--big-mb", type=int, default=0)
    parser.add_argument("--image", default=f"{REGISTRY}/funnel/testimage:1")
    args = parser.parse_args()
    images = [args.image] + ([build_big(args.big_mb)] if args.big_mb else [])
    results = {"python_start_s": round(statistics.median(python_start() for _ in range(5)), 4),
               "target_ratio": 1.2, "images": [measure(image, args.runs) for image in images]}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
