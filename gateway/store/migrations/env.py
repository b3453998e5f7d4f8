"""Alembic environment: runs migrations on the connection gateway.db.upgrade passes in."""

from alembic import context

from funnel_hpc.gateway.store.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - offline use (alembic CLI) is not supported
    raise RuntimeError("run migrations through gateway.db.upgrade()")

context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
