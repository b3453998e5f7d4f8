"""Real components (PostgreSQL, Slurm, Grid Engine, bwrap and its busybox root, the OCI
registries, Redis...): one rule for a test that needs one that is missing. Under CI (the
environment variable CI set) the test fails, since CI installs every component and a
missing one is a broken set-up; elsewhere (a laptop) it is skipped, with the reason.

`need(component, reachable, reason)` applies the rule inside a test or fixture;
`needs(...)` is the same rule as a marker (tests/conftest.py applies it before the test
runs). The probes that several test modules share live here too. Cost: each probe is one
short command or connection, run when called (markers: once, at collection).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.waiting import wait_for

# busybox-static unpacked by scripts/setup/40-worker.sh
BUSYBOX_ROOT = Path("/var/lib/funnel/rootfs/busybox")
NEEDS_MARKER = "needs"


def under_ci() -> bool:
    return bool(os.environ.get("CI"))


def need(component: str, reachable: bool, reason: str) -> None:
    """Fail (under CI) or skip (elsewhere) the running test unless reachable; the message
    names the component and the reason (what is wrong, which set-up script fixes it)."""
    if reachable:
        return
    message = f"{component} is missing: {reason}"
    if under_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def needs(component: str, reachable: bool, reason: str) -> pytest.MarkDecorator:
    """need() as a marker, for a test, a class or a module's pytestmark."""
    return getattr(pytest.mark, NEEDS_MARKER)(component, reachable, reason)


def slurm_ready() -> bool:
    if not shutil.which("sinfo"):
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


def slurm_answers(timeout: float = 180) -> bool:
    """Whether Slurm answers within timeout seconds: another test may be restarting
    slurmctld (tests/test_faults.py stops it for a minute). False at once where Slurm is
    not installed."""
    if not shutil.which("sinfo"):
        return False
    try:
        return wait_for(slurm_ready, timeout, "Slurm to answer", interval=1)
    except AssertionError:
        return False


def gridengine_ready() -> bool:
    if not shutil.which("qstat"):
        return False
    result = subprocess.run(["qstat", "-f"], capture_output=True, text=True)
    return result.returncode == 0 and "all.q@" in result.stdout


def bwrap_ready() -> bool:
    return shutil.which("bwrap") is not None and (BUSYBOX_ROOT / "bin" / "busybox").exists()


SLURM = "Slurm"
SLURM_REASON = "sinfo does not answer (scripts/setup/30-slurm.sh starts the cluster)"
GRIDENGINE = "Grid Engine"
GRIDENGINE_REASON = "qstat -f lists no all.q (scripts/setup/50-gridengine.sh starts it)"
BWRAP = "bwrap"
BWRAP_REASON = "bwrap or the busybox root missing (scripts/setup/40-worker.sh)"
POSTGRES = "PostgreSQL"
POSTGRES_REASON = "not reachable (scripts/setup/20-postgres.sh starts it)"
POSTGRES_BINARIES_REASON = "initdb/pg_ctl not installed (scripts/setup/20-postgres.sh)"
