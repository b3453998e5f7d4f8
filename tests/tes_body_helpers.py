"""Schema-valid CreateTask bodies, generated from the official TES 1.1 document
(tests/tes_schema/tes-1.1.json) with a fixed seed, and the rules the server adds to it.

``bodies(count, seed)`` walks ``tesTask``'s JSON Schema: required properties always,
optional ones at random, and now and then a property the schema does not name (TES
allows additional properties: a later TES version's field, a vendor's). Strings come
from a pool of plausible values (absolute paths, URLs of stores the test server has)
mixed with random text, so that most bodies pass the server's own rules as well; each
body is checked against the schema before it is returned.

``SERVER_RULES`` names each rule the server adds to the schema (docs/reference.md lists
them) with the pattern of its HTTP 400 message.
"""

from __future__ import annotations

import functools
import json
import random
import re
from typing import Any

from tests.tes_schema_helpers import SCHEMA_FILE, errors

PATHS = ["/data/in.txt", "/data/out", "/work/a/b", "/tmp/x", "/data/*.txt", "data/rel",
         "/data/../etc", "/"]
URLS = ["file:///srv/data/in.txt", "s3://bucket/key", "/srv/data/x", "gs://b/o",
        "nosuch://x"]
PATH_FIELDS = {"path", "workdir", "stdin", "stdout", "stderr", "path_prefix", "volumes"}
WORDS = ["busybox", "echo", "x", "", "hello world", "\u00fcn\u00efcode", "a=b", "FILE"]
IMAGES = ["busybox", "ubuntu:22.04", "quay.io/biocontainers/samtools:1.17--h00cdaf9_0",
          "registry.example.org:5000/lab/tool@sha256:" + "0" * 64, "hello world", "x\ny"]
UNKNOWN_NAMES = ["x_vendor", "future_field", "priority", "retries", "ignoreError"]

# rule -> the pattern of the message of the 400 that applies it (flattened "field: why")
SERVER_RULES = {
    "absolute container paths": r"must be an absolute path",
    "no '..' in container paths": r"must not contain '\.\.'",
    "no control characters in container paths": r"must not contain control characters",
    "wildcards only in output paths": r"wildcards are only allowed in output paths",
    "the container root cannot be bound": r"container's root directory cannot be bound",
    "an input has url or content": r"one of url or content is required",
    "content inputs are FILE": r"content inputs must be of type FILE",
    "a wildcard output has path_prefix": r"path_prefix: (required when path contains "
                                         r"wildcards|must be a prefix of path)",
    "non-empty lists and strings": r"Length must be between 1 and",
    "lengths and counts (limits.*)": r"(Longer than maximum|exceed limits\.)",
    "environment variable names": r"invalid environment variable name",
    "URL schemes with a store": r"no storage for URL scheme",
    "non-negative resources": r"Must be greater than or equal to 0",
    "resources within resources.max_*": r"exceeds the largest this server runs",
    "backend_parameters values on one line": r"resources\.backend_parameters",
    "valid Unicode (no lone surrogates)": r"lone surrogate",
    "image references": r"is not an image reference",
    "no NUL characters": r"holds a NUL character",
    "type is FILE or DIRECTORY": r"Must be one of: FILE, DIRECTORY",
}


@functools.cache
def _definitions() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())["$defs"]


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = _definitions()[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _string(rng: random.Random, name: str) -> str:
    """Mostly what a client would send in this field; now and then anything at all."""
    if rng.random() < 0.02:
        return "".join(rng.choice("abc/._-* \u00e9\t") for _ in range(rng.randint(0, 12)))
    pool = (PATHS if name in PATH_FIELDS else URLS if name == "url"
            else IMAGES if name == "image" else WORDS)
    # the first of a pool most often: a valid value, so that most bodies pass every rule
    return pool[0] if rng.random() < 0.85 else rng.choice(pool)


def _value(rng: random.Random, schema: dict, name: str, depth: int) -> Any:
    schema = _resolve(schema)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type", "object")
    if kind == "object":
        return _object(rng, schema, depth)
    if kind == "array":
        return [_value(rng, schema.get("items", {}), name, depth + 1)
                for _ in range(rng.choice([0, 1, 1, 1, 1, 1, 2]))]
    if kind == "string":
        return _string(rng, name)
    if kind == "integer":
        return rng.choice([0, 1, 2, 64, 1, 1, 1, 1, -1, 2**31 - 1])
    if kind == "number":
        return rng.choice([0, 0.5, 1, 8.0, 1, 1, 1, 1e6, -1.5])
    if kind == "boolean":
        return rng.choice([True, False])
    raise AssertionError(f"no generator for {schema}")


def _object(rng: random.Random, schema: dict, depth: int) -> dict:
    out: dict[str, Any] = {}
    required = set(schema.get("required", []))
    for name, sub in schema.get("properties", {}).items():
        if name in required or rng.random() < 0.5:
            out[name] = _value(rng, sub, name, depth + 1)
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):  # a map (env, tags, backend_parameters)
        for _ in range(rng.randint(0, 2)):
            out[rng.choice(["A", "key", "x_1", "PATH"])] = _value(rng, extra, "", depth + 1)
    elif extra is not False and rng.random() < 0.25:
        out[rng.choice(UNKNOWN_NAMES)] = rng.choice([1, "v", True, {"k": []}])
    return out


def bodies(count: int, seed: int = 30) -> list[dict]:
    """`count` schema-valid tesTask bodies (read-only fields left out, as clients do)."""
    rng = random.Random(seed)
    task = _resolve({"$ref": "#/$defs/tesTask"})
    out: list[dict] = []
    while len(out) < count:
        body = _object(rng, task, 0)
        for read_only in ("id", "state", "logs", "creation_time"):
            body.pop(read_only, None)
        if not errors("tesTask", body):
            out.append(body)
    return out


def broken_rules(message: str) -> list[str]:
    """The server rules a 400 message names (empty: a refusal no rule explains)."""
    return [rule for rule, pattern in SERVER_RULES.items() if re.search(pattern, message)]
