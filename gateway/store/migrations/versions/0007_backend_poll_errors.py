"""Backend health counts failed scheduler polls (gateway/store/backend_health.py), for the
server's /metrics: an alert on a rate of errors, on whichever replica is scraped.

Revision ID: 0007_backend_poll_errors
Revises: 0006_tasks_updated_at
"""
import sqlalchemy as sa
from alembic import op

revision = "0007_backend_poll_errors"
down_revision = "0006_tasks_updated_at"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("backend_health", sa.Column("poll_errors", sa.BigInteger, nullable=False,
                                              server_default="0"))


def downgrade() -> None:
    op.drop_column("backend_health", "poll_errors")
