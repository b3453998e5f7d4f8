"""Backend names -> implementing classes, loaded on demand."""

from __future__ import annotations

import importlib
from typing import Any

from funnel_hpc.backends.base import Backend

BACKENDS: dict[str, str] = {
    "local": "funnel_hpc.backends.local:LocalBackend",
    "slurm": "funnel_hpc.backends.slurm:SlurmBackend",
    "aws-batch": "funnel_hpc.backends.awsbatch:AwsBatchBackend",
    "htcondor": "funnel_hpc.backends.htcondor:HTCondorBackend",
    "gridengine": "funnel_hpc.backends.gridengine:GridEngineBackend",
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


def backend_options(config: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    name = name or config["backend"]["name"]
    options: dict[str, Any] = config["backend"].get(section_name(name)) or {}
    return options


def load_backend(config: dict[str, Any]) -> Backend:
    name = config["backend"]["name"]
    cls = backend_class(name)
    return cls(backend_options(config, name), config)
