"""SQL persistence: tables, engine set-up (SQLite WAL or PostgreSQL), migrations.

Tasks are ordered by ``seq``, an integer that grows with creation; listing pages
by keyset on it (``WHERE seq < :last ORDER BY seq DESC``), so a page costs the
same at task 10 and at task 100,000. Tags live in their own table keyed by
(task_seq, key): a tag filter is an EXISTS probe on that primary key.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Connection, Engine

from funnel_hpc.core import json_text

metadata = MetaData()

# BigInteger on PostgreSQL, INTEGER PRIMARY KEY (the rowid) on SQLite.
SeqType = BigInteger().with_variant(Integer(), "sqlite")

tasks = Table(
    "tasks", metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("state", String(16), nullable=False),
    Column("name", Text, nullable=True),
    Column("owner", String(256), nullable=True),
    Column("creation_time", String(40), nullable=False),
    # The validated task document as created (no id/state/logs/creation_time).
    Column("spec", JSON, nullable=False),
    # TES logs: one tesTaskLog per attempt.
    Column("logs", JSON, nullable=False),
    Column("backend", String(64), nullable=True),
    Column("job_id", String(256), nullable=True),
    Column("attempt", Integer, nullable=False, default=0),
    # Last worker event sequence number applied (events.jsonl / event endpoint).
    Column("event_seq", Integer, nullable=False, default=0),
    Column("updated_at", String(40), nullable=False),
    # resources.cpu_cores as created (NULL: 1; gateway/store/owner_counts.py sums it)
    Column("cpu_cores", Integer, nullable=True),
)
Index("ix_tasks_state_seq", tasks.c.state, tasks.c.seq)
Index("ix_tasks_owner_seq", tasks.c.owner, tasks.c.seq)
Index("ix_tasks_updated_at", tasks.c.updated_at)

task_tags = Table(
    "task_tags", metadata,
    Column("task_seq", SeqType, ForeignKey("tasks.seq", ondelete="CASCADE"), primary_key=True),
    Column("key", String(1024), primary_key=True),
    Column("value", Text, nullable=False),
)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL; None for other databases and in-memory SQLite."""
    if not url.startswith("sqlite") or "///" not in url:
        return None
    path = url.split("///", 1)[1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def make_engine(url: str, busy_timeout_s: float = 30) -> Engine:
    """Create an engine; SQLite gets WAL, a busy timeout and explicit BEGIN. JSON columns
    go through core/json_text.py (orjson, the standard library where it would differ)."""
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False,
                                                  "timeout": busy_timeout_s},
                               json_serializer=json_text.dumps,
                               json_deserializer=json_text.loads)

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_conn, _record):  # pragma: no cover - driver hook
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection):  # pragma: no cover - driver hook
            # Writers take the lock up front so two writers never deadlock
            # on a lock upgrade; readers use a plain (deferred) BEGIN.
            immediate = conn.get_execution_options().get("sqlite_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20,
                         json_serializer=json_text.dumps, json_deserializer=json_text.loads)


@contextlib.contextmanager
def writing(engine: Engine) -> Iterator[Connection]:
    """A write transaction: committed on success, rolled back on any error."""
    with engine.connect() as conn:
        conn = conn.execution_options(sqlite_write=True)
        with conn.begin():
            yield conn


@contextlib.contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        with conn.begin():
            yield conn


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to the newest migration, or to revision (Alembic)."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        if conn.in_transaction():
            conn.commit()
