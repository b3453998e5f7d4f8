"""JSON text of the database's JSON columns and task.json (core/json_text.py): orjson's
speed, with every value read back as the standard library reads it, on SQLite and on
PostgreSQL."""

from __future__ import annotations

import json
import math

import pytest
from sqlalchemy import JSON, Column, Integer, MetaData, Table, insert, select

from funnel_hpc.core import json_text
from funnel_hpc.gateway.store import db

BIG = 123456789012345678901234567890
SURROGATE = "\ud800 lone"


def deep(levels: int) -> list:
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


# values orjson writes itself, and those it refuses (the standard library writes them)
VALUES = [
    {"id": "t1", "executors": [{"image": "busybox", "command": ["echo", "é ☃"]}]},
    {"exit_code": BIG, "negative": -BIG, "edge": 2**64, "i64": -(2**63)},
    {1: "a key that is not a string"},
    {"text": SURROGATE},
    deep(300),  # deeper than orjson writes
    [0.1, 1e300, -0.0, 18446744073709551615, 9223372036854775807],
]


@pytest.mark.parametrize("value", VALUES)
def test_a_value_reads_back_as_the_standard_library_reads_it(value):
    text = json_text.dumps(value)
    assert json_text.loads(text) == json.loads(json.dumps(value))
    assert json_text.loads(text.encode("utf-8", "surrogatepass")) == json.loads(text)


def test_text_is_compact_json_and_big_integers_stay_exact():
    assert json_text.dumps({"a": [1, 2], "b": "é"}) == '{"a":[1,2],"b":"é"}'
    assert json_text.loads('{"exit_code": 123456789012345678901234567890}') == {
        "exit_code": BIG}  # orjson alone reads a float
    assert json_text.loads('"a string 1234567890123456789012"') == \
        "a string 1234567890123456789012"


def test_nan_is_written_as_null_and_a_nan_written_before_still_reads():
    assert json_text.dumps({"ram_gb": math.nan, "x": math.inf}) == '{"ram_gb":null,"x":null}'
    read = json_text.loads('{"ram_gb": NaN, "x": Infinity}')  # the standard library wrote
    assert math.isnan(read["ram_gb"]) and read["x"] == math.inf


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres",
                                                          marks=pytest.mark.postgres)])
def test_json_columns_keep_every_value(kind, databases):
    """The engine's JSON columns (task documents, logs) write and read through json_text:
    a worker-reported exit code of 30 digits, a lone surrogate, deep nesting come back
    as written."""
    engine = db.make_engine(databases.new(kind))
    table = Table("docs", MetaData(), Column("n", Integer, primary_key=True),
                  Column("doc", JSON))
    table.create(engine)
    stored = [{"exit_code": BIG, "text": "é ☃"}, {"n": [deep(300)]},
              {"metadata": {"count": 2**63 - 1}}]
    if kind == "sqlite":  # PostgreSQL's text refuses lone surrogates itself
        stored.append({"text": SURROGATE})
    with db.writing(engine) as conn:
        conn.execute(insert(table), [{"n": i, "doc": doc} for i, doc in enumerate(stored)])
    with db.reading(engine) as conn:
        read = [row.doc for row in conn.execute(select(table).order_by(table.c.n))]
    assert read == stored
    engine.dispose()
