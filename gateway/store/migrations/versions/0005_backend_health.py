"""Backend health: each backend's last scheduler poll and error (gateway/store/backend_health.py).

Revision ID: 0005_backend_health
Revises: 0004_reconciler_leases
"""
import sqlalchemy as sa
from alembic import op

revision = "0005_backend_health"
down_revision = "0004_reconciler_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backend_health",
        sa.Column("backend", sa.String(64), primary_key=True),
        sa.Column("last_poll_at", sa.Float, nullable=True),
        sa.Column("last_ok_at", sa.Float, nullable=True),
        sa.Column("failing_since", sa.Float, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("last_error_at", sa.Float, nullable=True),
        sa.Column("reporter", sa.String(256), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("backend_health")
