"""An index on tasks.updated_at: the reconciler reads the rows changed since its last tick
(gateway/reconcile/index.py) with one range read on it, not every active row.

Revision ID: 0006_tasks_updated_at
Revises: 0005_backend_health
"""
from alembic import op

revision = "0006_tasks_updated_at"
down_revision = "0005_backend_health"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_updated_at", "tasks", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_updated_at", table_name="tasks")
