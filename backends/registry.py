"""Backend names -> implementing classes, loaded on demand."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from funnel_hpc.backends.base import Backend
from funnel_hpc.core.config import BackendSection

BACKENDS: dict[str, str] = {
    "local": "funnel_hpc.backends.local:LocalBackend",
    "slurm": "funnel_hpc.backends.slurm:SlurmBackend",
    "aws-batch": "funnel_hpc.backends.awsbatch:AwsBatchBackend",
    "htcondor": "funnel_hpc.backends.htcondor:HTCondorBackend",
    "gridengine": "funnel_hpc.backends.gridengine:GridEngineBackend",
    "tes": "funnel_hpc.backends.tes:TesBackend",
}


def backend_class(name: str) -> type[Backend]:
    try:
        module_name, class_name = BACKENDS[name].split(":")
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ValueError(f"unknown backend {name!r} (known: {known})") from None
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls


def section_name(name: str) -> str:
    """The config section of a backend: backend.<name>, '-' written '_' (aws_batch)."""
    return name.replace("-", "_")


def load_backend(section: BackendSection, work_dir: str | Path,
                 on_change: Callable[[], None] | None = None) -> Backend:
    """The configured backend, given its own section, the work dir and what it calls
    when it learns by itself that a job ended (Backend.on_change)."""
    cls = backend_class(section.name)
    options = section.options()
    assert options is not None  # every backend of BACKENDS has its section
    return cls(options, Path(work_dir), on_change)
