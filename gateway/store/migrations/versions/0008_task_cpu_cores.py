"""tasks.cpu_cores: the task's resources.cpu_cores (1 when unset), so what each owner has in
flight, in tasks and cores, is one grouped query without decoding task documents
(gateway/store/owner_counts.py, limits.per_owner).

Existing rows are filled from their documents when the database can read JSON in SQL
(SQLite's json_extract, PostgreSQL's ->>); a row left NULL counts as 1 core.

Revision ID: 0008_task_cpu_cores
Revises: 0007_backend_health_ticks
"""
import sqlalchemy as sa
from alembic import op

revision = "0008_task_cpu_cores"
down_revision = "0007_backend_health_ticks"
branch_labels = None
depends_on = None

# only the tasks not yet ended matter to the counts: the others are left NULL
_ACTIVE = "('QUEUED', 'INITIALIZING', 'RUNNING', 'PAUSED', 'CANCELING')"
_BACKFILL = {
    "sqlite": "UPDATE tasks SET cpu_cores = CAST(json_extract(spec, '$.resources.cpu_cores')"
              f" AS INTEGER) WHERE state IN {_ACTIVE} AND json_type(spec,"
              " '$.resources.cpu_cores') = 'integer'",
    "postgresql": "UPDATE tasks SET cpu_cores = (spec::jsonb #>> '{resources,cpu_cores}')::int"
                  f" WHERE state IN {_ACTIVE} AND jsonb_typeof(spec::jsonb #> "
                  "'{resources,cpu_cores}') = 'number'",
}


def upgrade() -> None:
    op.add_column("tasks", sa.Column("cpu_cores", sa.Integer, nullable=True))
    backfill = _BACKFILL.get(op.get_bind().dialect.name)
    if backfill is not None:
        op.execute(backfill)


def downgrade() -> None:
    op.drop_column("tasks", "cpu_cores")
