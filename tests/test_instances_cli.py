"""`funnel reconcile` with several backend instances: all of them, or `--backend NAME`'s
only; an unknown name is refused naming the instances."""

from __future__ import annotations

import subprocess

import yaml

from tests.server_helpers import clean_env, funnel_argv
from tests.waiting import wait_for


def write_config(tmp_path) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "funnel.yaml"
    path.write_text(yaml.safe_dump({
        "work_dir": str(tmp_path / "work"),
        "database": {"url": f"sqlite:///{tmp_path / 'funnel.db'}"},
        "backend": {"name": "local"},
        "backends": {"a": {"kind": "local"}, "b": {"kind": "local"}},
        "reconciler": {"interval_seconds": 0.5}}))
    return str(path)


def test_an_unknown_instance_is_refused_naming_the_instances(tmp_path):
    done = subprocess.run(funnel_argv("reconcile", "--config", write_config(tmp_path),
                                      "--backend", "nosuch"),
                          env=clean_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "no backend instance 'nosuch' (instances: a, b)" in done.stderr


def run_reconcile(tmp_path, expected: list[str], *args: str) -> str:
    """The log of `funnel reconcile` once the reconcilers of `expected` have started; it
    is stopped then."""
    config = write_config(tmp_path)
    log = tmp_path / "reconcile.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(funnel_argv("reconcile", "--config", config, *args),
                                env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: all(f"reconciler started: backend={name} " in log.read_text()
                                 for name in expected), 60,
                     "the reconcilers to start", detail=log.read_text)
            assert proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(30)
    return log.read_text()


def test_reconcile_runs_every_instance_or_the_one_named(tmp_path):
    run_reconcile(tmp_path / "all", ["a", "b"])
    one = run_reconcile(tmp_path / "one", ["b"], "--backend", "b")
    assert "backend=a " not in one
