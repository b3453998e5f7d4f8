"""Dashboard sign-in sessions (gateway/web/sessions.py): revocable on every replica.

Revision ID: 0002_web_sessions
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002_web_sessions"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("user", sa.String(256), nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_web_sessions_expires_at", "web_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_table("web_sessions")
