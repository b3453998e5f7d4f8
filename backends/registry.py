"""Backend names -> implementing classes, loaded on demand."""

from __future__ import annotations

import importlib

from backends.base import Backend

BACKENDS: dict[str, str] = {
    "local": "backends.local:LocalBackend",
    "slurm": "backends.slurm:SlurmBackend",
    "aws-batch": "backends.awsbatch:AwsBatchBackend",
    "htcondor": "backends.htcondor:HTCondorBackend",
}


def backend_class(name: str) -> type[Backend]:
    try:
        module_name, class_name = BACKENDS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown backend {name!r} (known: {', '.join(sorted(BACKENDS))})") from None
    return getattr(importlib.import_module(module_name), class_name)


def load_backend(config: dict) -> Backend:
    name = config["backend"]["name"]
    cls = backend_class(name)
    return cls(config["backend"].get(name) or {}, config)
