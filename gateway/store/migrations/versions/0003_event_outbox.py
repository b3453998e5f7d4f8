"""The event outbox and its sinks' cursors (gateway/store/outbox.py).

Revision ID: 0003_event_outbox
Revises: 0002_web_sessions
"""
import sqlalchemy as sa
from alembic import op

revision = "0003_event_outbox"
down_revision = "0002_web_sessions"
branch_labels = None
depends_on = None

OutboxId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "event_outbox",
        sa.Column("id", OutboxId, primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(256), nullable=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("time", sa.String(40), nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_event_outbox_owner_id", "event_outbox", ["owner", "id"])
    op.create_index("ix_event_outbox_task_id", "event_outbox", ["task_id", "id"])
    op.create_table(
        "event_cursors",
        sa.Column("sink", sa.String(128), primary_key=True),
        sa.Column("position", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("event_cursors")
    op.drop_table("event_outbox")
