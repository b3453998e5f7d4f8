"""Staging throughput of the worker's storage layer, each beside its raw reference.

Run: .venv/bin/python benchmarks/worker_staging.py [--local-mb 1024] [--s3-mb 200]

- a 1 GiB local file staged in through file:// (worker.storage.LocalStore) vs `cp`;
- 200 MB uploaded and downloaded through s3:// (worker.storage.S3Store) vs raw boto3,
  against a moto server on 127.0.0.1.
Ratios > 1 mean the worker is slower than the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import boto3  # noqa: E402
import requests  # noqa: E402

from funnel_hpc.core.config import load as load_config  # noqa: E402
from funnel_hpc.worker.storage import LocalStore, S3Store  # noqa: E402
from tests.server_helpers import free_port  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def local(tmp: Path, mb: int) -> dict:
    src = tmp / "big.bin"
    with src.open("wb") as fh:
        block = os.urandom(1 << 20)
        for _ in range(mb):
            fh.write(block)
    os.sync()
    store = LocalStore([str(tmp)])
    cp_runs, worker_runs = [], []
    for _ in range(3):  # alternate, keep the best of each: page cache and writeback even out
        cp_runs.append(timed(lambda: subprocess.run(["cp", str(src), str(tmp / "cp.bin")],
                                                    check=True)))
        drop(tmp / "cp.bin")
        worker_runs.append(timed(lambda: store.get(f"file://{src}", tmp / "staged" / "big.bin")))
        drop(tmp / "staged")
        os.sync()
    cp_s, worker_s = min(cp_runs), min(worker_runs)
    src.unlink()
    return {"local_mb": mb, "cp_s": cp_s, "worker_s": worker_s, "local_ratio": worker_s / cp_s}


def s3(tmp: Path, mb: int) -> dict:
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                          "AWS_DEFAULT_REGION")})
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                requests.get(endpoint, timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        src = tmp / "s3.bin"
        with src.open("wb") as fh:
            block = os.urandom(1 << 20)
            for _ in range(mb):
                fh.write(block)
        raw = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        raw.create_bucket(Bucket="bench")
        store = S3Store(load_config(environ={}, overrides={"storage": {"s3": {
            "endpoint_url": endpoint, "region": "us-east-1"}}}).storage.s3)
        raw_up = timed(lambda: raw.upload_file(str(src), "bench", "raw.bin"))
        worker_up = timed(lambda: store.put(src, "s3://bench/worker.bin"))
        raw_down = timed(lambda: raw.download_file("bench", "raw.bin", str(tmp / "raw.out")))
        worker_down = timed(lambda: store.get("s3://bench/worker.bin", tmp / "w.out"))
        return {"s3_mb": mb, "boto3_up_s": raw_up, "worker_up_s": worker_up,
                "boto3_down_s": raw_down, "worker_down_s": worker_down,
                "s3_up_ratio": worker_up / raw_up, "s3_down_ratio": worker_down / raw_down}
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-mb", type=int, default=1024)
    parser.add_argument("--s3-mb", type=int, default=200)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="funnel-staging-", dir="/var/tmp"))
    try:
        results = {**local(tmp, args.local_mb), **s3(tmp, args.s3_mb)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out_dir = REPO / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC)
    out = out_dir / f"staging-{stamp:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"date": stamp.isoformat(), "cpus": os.cpu_count(),
                               "results": results}, indent=2))
    r = results
    print("Worker staging benchmark")
    print(f"  local {r['local_mb']} MiB: worker {r['worker_s']:.2f}s  cp {r['cp_s']:.2f}s  "
          f"ratio {r['local_ratio']:.2f}")
    print(f"  s3 {r['s3_mb']} MiB up:   worker {r['worker_up_s']:.2f}s  "
          f"boto3 {r['boto3_up_s']:.2f}s  ratio {r['s3_up_ratio']:.2f}")
    print(f"  s3 {r['s3_mb']} MiB down: worker {r['worker_down_s']:.2f}s  "
          f"boto3 {r['boto3_down_s']:.2f}s  ratio {r['s3_down_ratio']:.2f}")
    print(f"  written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
