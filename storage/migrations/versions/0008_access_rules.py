"""The people an admin allowed (`/allow`) or denied (`/deny`), on top of YANRAY_ALLOWED_USERS.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 06:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
# the lead's plan says "0006" and re-chains at merge; on this branch it follows 0007 so that
# the branch has one head and `upgrade head` works
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "access_rules",
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=64), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("set_by", sa.String(length=128), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("platform", "user_id"),
    )


def downgrade() -> None:
    op.drop_table("access_rules")
