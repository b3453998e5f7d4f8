"""Looking straight into a test server's database."""

from __future__ import annotations

from sqlalchemy import create_engine, func, select

from funnel_hpc.gateway.store import db


def row_count(server) -> int:
    engine = create_engine(server.db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(db.tasks)).scalar_one()
    finally:
        engine.dispose()
