"""Fixtures for the Grid Engine backend tests: the real single-host cell
(options and requests: tests/backend_helpers.py)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest

from funnel_hpc.backends.gridengine import GridEngineBackend
from tests.backend_helpers import NO_WORK_DIR, backend_options
from tests.components import GRIDENGINE, need
from tests.gridengine_helpers import TEST_PARAMETERS


@pytest.fixture(scope="session")
def gridengine() -> None:
    """The real single-host Grid Engine of scripts/setup/50-gridengine.sh.

    Skipped only where Grid Engine is not installed at all; installed but not
    answering is a failure (CI runs the set-up script first).
    """
    if not shutil.which("qstat"):
        need(GRIDENGINE, False, "not installed (scripts/setup/50-gridengine.sh)")
    for _ in range(30):
        done = subprocess.run(["qstat", "-f"], capture_output=True, text=True)
        if done.returncode == 0 and "all.q@" in done.stdout:
            return
        time.sleep(1)
    pytest.fail(f"Grid Engine is installed but not answering (qstat -f: {done.stdout.strip()}"
                f"{done.stderr.strip()}); run scripts/setup/50-gridengine.sh")


@pytest.fixture(scope="module")
def drmaa_backend(gridengine) -> Iterator[GridEngineBackend]:
    backend = GridEngineBackend(backend_options("gridengine", mode="drmaa",
                                                backend_parameters=TEST_PARAMETERS), NO_WORK_DIR)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def cli_backend(gridengine) -> Iterator[GridEngineBackend]:
    backend = GridEngineBackend(backend_options("gridengine", mode="cli",
                                                backend_parameters=TEST_PARAMETERS), NO_WORK_DIR)
    yield backend
    backend.close()
