"""The platform messages that show each answer, so that a reaction on one finds the answer
it rates (`requests.shown` is JSON, which no index can look up by message).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 06:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "answer_messages",
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("chat_id", sa.String(length=64), nullable=False),
        sa.Column("message_id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["request_id"], ["requests.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("platform", "chat_id", "message_id"),
    )
    with op.batch_alter_table("answer_messages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_answer_messages_request_id"), ["request_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("answer_messages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_answer_messages_request_id"))
    op.drop_table("answer_messages")
