"""Requests remember the platform messages that show them (a queue notice, a partial answer);
a message is found by its platform id quickly (a resent update is recognised).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 01:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shown", sa.JSON(), nullable=True))
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.create_index("ix_messages_conversation_external", ["conversation_id", "external_id"])


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_conversation_external")
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_column("shown")
