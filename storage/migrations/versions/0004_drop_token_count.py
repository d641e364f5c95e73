"""Messages no longer store a token count: nothing read it (the context is counted afresh
from the text, by the engine's own tokenizer).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 02:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("token_count")


def downgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("token_count", sa.Integer(), nullable=True))
