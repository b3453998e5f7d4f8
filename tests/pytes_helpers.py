"""A task document setting every field of the TES 1.1 model, shared by the py-tes, gRPC
and conformance tests."""

from __future__ import annotations

from typing import Any

EVERY_FIELD: dict[str, Any] = {
    "name": "every-field",
    "description": "a task that sets every field of the TES 1.1 model",
    "inputs": [
        {"name": "in1", "description": "a url input", "url": "s3://bucket/in1.txt",
         "path": "/data/in1.txt", "type": "FILE", "streamable": True},
        {"name": "in2", "description": "inline content", "content": "hello\n",
         "path": "/data/in2.txt", "type": "FILE", "streamable": False},
        {"name": "dir", "description": "a directory", "url": "file:///srv/refs",
         "path": "/data/refs", "type": "DIRECTORY"},
    ],
    "outputs": [
        {"name": "out1", "description": "a file", "url": "s3://bucket/out1.txt",
         "path": "/data/out1.txt", "type": "FILE"},
        {"name": "many", "description": "wildcards", "url": "s3://bucket/many/",
         "path": "/data/out/*.txt", "path_prefix": "/data/out/", "type": "FILE"},
        {"name": "outdir", "url": "file:///srv/results", "path": "/data/outdir",
         "type": "DIRECTORY"},
    ],
    "resources": {"cpu_cores": 4, "preemptible": True, "ram_gb": 8.5, "disk_gb": 40.0,
                  "zones": ["debug", "long"], "backend_parameters": {"queue": "fast"},
                  "backend_parameters_strict": True},
    "executors": [
        {"image": "busybox", "command": ["/bin/sh", "-c", "cat /data/in2.txt"],
         "workdir": "/data", "stdin": "/data/in1.txt", "stdout": "/data/stdout.txt",
         "stderr": "/data/stderr.txt", "env": {"A": "1", "B_2": "two"}, "ignore_error": True},
        {"image": "busybox:1.36", "command": ["echo", "second"]},
    ],
    "volumes": ["/vol/shared", "/vol/scratch"],
    "tags": {"WORKFLOW_ID": "cwl-01234", "PROJECT_GROUP": "alice-lab", "empty": ""},
}
