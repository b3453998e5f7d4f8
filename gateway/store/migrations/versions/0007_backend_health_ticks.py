"""Backend health counts failed scheduler polls and notes each reconciler's last tick
(gateway/store/backend_health.py): every replica's /metrics shows the count, and /readyz
says not ready when the lease holder has stopped ticking.

Revision ID: 0007_backend_health_ticks
Revises: 0006_tasks_updated_at
"""
import sqlalchemy as sa
from alembic import op

revision = "0007_backend_health_ticks"
down_revision = "0006_tasks_updated_at"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("backend_health", sa.Column("poll_errors", sa.BigInteger, nullable=False,
                                              server_default="0"))
    op.add_column("backend_health", sa.Column("last_tick_at", sa.Float, nullable=True))


def downgrade() -> None:
    op.drop_column("backend_health", "last_tick_at")
    op.drop_column("backend_health", "poll_errors")
