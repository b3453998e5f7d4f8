"""The reconciler lease per backend (gateway/store/leases.py).

Revision ID: 0004_reconciler_leases
Revises: 0003_event_outbox
"""
import sqlalchemy as sa
from alembic import op

revision = "0004_reconciler_leases"
down_revision = "0003_event_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reconciler_leases",
        sa.Column("backend", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(256), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("renewed_at", sa.Float, nullable=False),
        sa.Column("acquired_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("reconciler_leases")
