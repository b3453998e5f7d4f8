"""INSERTs of the create path, compiled once per dialect and run as driver SQL.

``conn.execute(insert(table), values)`` costs about 50 µs of SQLAlchemy work per call on
top of the database's own (the compiled-cache lookup, bind processors, result set-up);
a task create makes three (task, tags, outbox event). ``PreparedInsert`` compiles its
statement for the connection's dialect at first use and then runs the SQL text with
``exec_driver_sql``: errors are still wrapped as SQLAlchemy's (so a locked SQLite is the
API's 503), the transaction is still the caller's. JSON columns are encoded here with
``json.dumps``, as SQLAlchemy's JSON type does (values read back are the same).
Cost: about 15 µs of SQLAlchemy work per call instead of 50-60 µs (SQLite); a create
costs 30-70 µs less CPU of about 750 µs in-process (benchmarks/api_bench.py's server
CPU per create does not show it apart from its noise).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import JSON, Column, Table, insert
from sqlalchemy.engine import Connection, CursorResult


class PreparedInsert:
    """One INSERT of fixed columns into ``table``, optionally RETURNING one column."""

    def __init__(self, table: Table, columns: Sequence[str], returning: Column | None = None):
        statement = insert(table)
        self.statement = statement if returning is None else statement.returning(returning)
        self.columns = list(columns)
        self.json_columns = frozenset(c.name for c in table.c
                                      if isinstance(c.type, JSON) and c.name in columns)
        self._compiled: dict[str, tuple[str, tuple[str, ...] | None]] = {}

    def _sql(self, conn: Connection) -> tuple[str, tuple[str, ...] | None]:
        """The SQL text in the driver's parameter style, and the parameter order
        (None: the driver takes named parameters)."""
        name = conn.dialect.name
        found = self._compiled.get(name)
        if found is None:
            compiled = self.statement.compile(dialect=conn.dialect, column_keys=self.columns)
            order = compiled.positiontup
            found = self._compiled[name] = (str(compiled), tuple(order) if order else None)
        return found

    def _params(self, row: Mapping[str, Any], order: tuple[str, ...] | None) -> Any:
        values = {key: json.dumps(row[key]) if key in self.json_columns else row[key]
                  for key in self.columns}
        return values if order is None else tuple(values[key] for key in order)

    def execute(self, conn: Connection, row: Mapping[str, Any]) -> CursorResult:
        sql, order = self._sql(conn)
        return conn.exec_driver_sql(sql, self._params(row, order))

    def execute_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        sql, order = self._sql(conn)
        conn.exec_driver_sql(sql, [self._params(row, order) for row in rows])
