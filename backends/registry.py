"""Backend kinds -> implementing classes, loaded on demand; load_backend makes one
configured instance (backends.<name>) of its kind."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from funnel_hpc.backends.base import Backend
from funnel_hpc.core.config import BackendSection, Instance

BACKENDS: dict[str, str] = {
    "local": "funnel_hpc.backends.local:LocalBackend",
    "slurm": "funnel_hpc.backends.slurm:SlurmBackend",
    "aws-batch": "funnel_hpc.backends.awsbatch:AwsBatchBackend",
    "htcondor": "funnel_hpc.backends.htcondor:HTCondorBackend",
    "gridengine": "funnel_hpc.backends.gridengine:GridEngineBackend",
    "tes": "funnel_hpc.backends.tes:TesBackend",
    "pbs": "funnel_hpc.backends.pbs:PbsBackend",
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


def load_backend(instance: Instance | BackendSection, work_dir: str | Path,
                 on_change: Callable[[], None] | None = None) -> Backend:
    """The backend of one configured instance (config.instance(name)), named after it,
    given the work dir and what it calls when it learns by itself that a job ended
    (Backend.on_change). A BackendSection (the single `backend:` form, as older callers
    pass it) is the instance named after its kind."""
    if isinstance(instance, BackendSection):
        instance = Instance(name=instance.name, kind=instance.name,
                            options=instance.options())
    cls = backend_class(instance.kind)
    assert instance.options is not None  # every kind of BACKENDS has its section
    return cls(instance.options, Path(work_dir), on_change, name=instance.name)
