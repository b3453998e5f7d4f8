"""JSON text for the gateway's hot paths: the JSON columns of the database (task documents,
logs, events) and each task dir's task.json. orjson where it can (about ten times the
standard library's speed: a tick of 10,000 submissions encodes and decodes 30,000
documents), the standard library wherever orjson would refuse or differ, so every
document reads back as the standard library would read it:

- written: an integer beyond 64 bits, a key that is not a string, a lone surrogate or
  nesting deeper than orjson's 254 levels go the standard library's way. NaN and the
  infinities are written as null (the standard library's NaN token is not JSON, and
  PostgreSQL refuses it).
- read: text with a run of 19 digits or more (a number orjson would read as a float, or
  may read inexactly) or that orjson refuses (the NaN tokens of rows written before) is
  read by the standard library.

Text written is compact and not ASCII-escaped; readers of JSON see no difference.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_LONG_NUMBER = re.compile(r"[0-9]{19}")
_LONG_NUMBER_BYTES = re.compile(rb"[0-9]{19}")


def dumps(value: Any) -> str:
    """`value` as JSON text (see the module's docstring)."""
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # a TypeError: see the module's docstring
        return json.dumps(value)


def loads(text: str | bytes) -> Any:
    """`text` as the standard library's json.loads reads it (str, or UTF-8 bytes as
    PostgreSQL's driver hands them over)."""
    long_number = (_LONG_NUMBER.search(text) if isinstance(text, str)
                   else _LONG_NUMBER_BYTES.search(text))
    if long_number is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text)
